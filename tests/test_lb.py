"""Service VIPs through the datapath: ARP, round-robin DNAT, replies, scale-down, timeouts."""

import copy

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from dpkit import Wire
from tapnet.model import format_mac
from tapnet.stack import load_stack

STACK = """
x-tapnet:
  nodes: [node1, node2]
  placement:
    client: node1
services:
  web:
    deploy: {replicas: 3}
    networks: [app]
  client:
    networks: [app]
networks:
  app:
    driver: overlay
    ipam: {config: [{subnet: 10.10.0.0/24}]}
"""
BROADCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture
def wire():
    return Wire(load_stack(STACK))


def vip(wire):
    return str(wire.cluster.services["web"].vips["app"])


def vip_mac(wire):
    return format_mac(b"\x02\x42" + wire.cluster.services["web"].vips["app"].packed)


def task_ips(wire):
    return {str(s.endpoint_on("app").ip): name for name, s in wire.cluster.sandboxes.items() if s.service == "web"}


def syn(wire, sport, flags="S"):
    return (
        Ether(src=wire.mac("client.1", "app"), dst=vip_mac(wire))
        / IP(src=wire.ip("client.1", "app"), dst=vip(wire))
        / TCP(sport=sport, dport=80, flags=flags, seq=1000)
    )


def deliver_everywhere(wire, result, depth=3):
    """Follow frames through tunnels until they reach sandbox ports; return (port name, frame) pairs."""
    out = []
    for emit in result.emits:
        port = wire.fabric.ports[emit.port]
        if port.kind == "vxlan" and depth:
            dst = Ether(emit.frame)[IP].dst
            node = next(n.name for n in wire.cluster.nodes if str(n.underlay_ip) == dst)
            again = wire.send([(wire.fabric.port_id(f"{node}/vxlan"), emit.frame)])
            out += deliver_everywhere(wire, again, depth - 1)
        else:
            out.append((port.name, Ether(emit.frame)))
    return out


def checksums_valid(packet) -> bool:
    copy_ = Ether(bytes(packet))
    sums = (copy_[IP].chksum, copy_[IP].payload.chksum)
    del copy_[IP].chksum
    del copy_[IP].payload.chksum
    rebuilt = Ether(bytes(copy_))
    return sums == (rebuilt[IP].chksum, rebuilt[IP].payload.chksum)


def test_vip_answers_arp_on_every_node(wire):
    request = Ether(src=wire.mac("client.1", "app"), dst=BROADCAST) / ARP(
        op=1, hwsrc=wire.mac("client.1", "app"), psrc=wire.ip("client.1", "app"), pdst=vip(wire)
    )
    result = wire.send([(wire.port("client.1", "app"), request)])
    replies = [f for _, f in wire.out(result) if f.haslayer(ARP) and f[ARP].op == 2]
    assert [r[ARP].hwsrc for r in replies] == [vip_mac(wire)]
    web = next(s for s in wire.cluster.sandboxes.values() if s.service == "web" and s.node == "node2")
    other = Ether(src=format_mac(web.endpoints[0].mac), dst=BROADCAST) / ARP(
        op=1, psrc=str(web.endpoints[0].ip), pdst=vip(wire)
    )
    result = wire.send([(wire.fabric.port_id(f"node2/{web.name}/eth0"), other)])
    assert any(f.haslayer(ARP) and f[ARP].op == 2 for _, f in wire.out(result))


def test_vip_spreads_new_connections_round_robin(wire):
    chosen = []
    for sport in range(40000, 40006):
        delivered = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, sport))]))
        [(port, frame)] = delivered
        chosen.append(task_ips(wire)[frame[IP].dst])
        assert port.endswith(f"/{chosen[-1]}/eth0")
    assert set(chosen) == set(task_ips(wire).values())
    assert chosen[:3] == chosen[3:]


def test_vip_dnat_keeps_checksums_valid(wire):
    [(_, frame)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 41000) / b"hello")]))
    assert frame[IP].dst in task_ips(wire)
    assert frame[TCP].dport == 80
    assert frame.dst == format_mac(b"\x02\x42" + bytes(int(x) for x in frame[IP].dst.split(".")))
    assert checksums_valid(frame)


def _reply_from_task(wire, frame, flags="SA"):
    task = task_ips(wire)[frame[IP].dst]
    sandbox = wire.cluster.sandboxes[task]
    reply = (
        Ether(src=format_mac(sandbox.endpoints[0].mac), dst=frame.src)
        / IP(src=frame[IP].dst, dst=frame[IP].src)
        / TCP(sport=80, dport=frame[TCP].sport, flags=flags, seq=5000, ack=1001)
    )
    port = wire.fabric.port_id(f"{sandbox.node}/{task}/eth0")
    return deliver_everywhere(wire, wire.send([(port, reply)]))


def test_reply_is_translated_back_to_vip(wire):
    for sport in (42000, 42001, 42002):
        [(_, frame)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, sport))]))
        [(port, back)] = _reply_from_task(wire, frame)
        assert port == "node1/client.1/eth0"
        assert back[IP].src == vip(wire)
        assert back[TCP].sport == 80
        assert back[TCP].dport == sport
        assert checksums_valid(back)


def test_established_flow_stays_on_its_task(wire):
    [(_, first)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 43000))]))
    _reply_from_task(wire, first)
    for _ in range(4):
        [(_, later)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 43000, flags="A"))]))
        assert later[IP].dst == first[IP].dst


def test_segment_without_connection_is_dropped(wire):
    result = wire.send([(wire.port("client.1", "app"), syn(wire, 44000, flags="A"))])
    assert result.emits == []
    assert result.records[0].reason == "vip-no-connection"


def test_vip_answers_ping(wire):
    ping = Ether(src=wire.mac("client.1", "app"), dst=vip_mac(wire)) / IP(src=wire.ip("client.1", "app"), dst=vip(wire)) / ICMP(id=9)
    [(port, reply)] = wire.out(wire.send([(wire.port("client.1", "app"), ping)]))
    assert port == wire.port("client.1", "app")
    assert reply[IP].src == vip(wire)
    assert reply[ICMP].type == 0


def test_udp_to_vip_is_translated(wire):
    datagram = Ether(src=wire.mac("client.1", "app"), dst=vip_mac(wire)) / IP(
        src=wire.ip("client.1", "app"), dst=vip(wire)
    ) / UDP(sport=5353, dport=53) / b"q"
    [(_, frame)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), datagram)]))
    assert frame[IP].dst in task_ips(wire)
    assert checksums_valid(frame)


def test_scale_down_sends_no_new_connection_to_removed_task(wire):
    [(_, first)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 45000))]))
    _reply_from_task(wire, first)
    removed = task_ips(wire)[first[IP].dst]
    changed = copy.deepcopy(wire.cluster)
    del changed.sandboxes[removed]
    changed.services["web"].replicas = 2
    wire.fabric.update_cluster(changed)
    wire.cluster = changed

    later = wire.send([(wire.port("client.1", "app"), syn(wire, 45000, flags="A"))])
    assert later.records[0].reason == "backend-gone"
    for sport in range(46000, 46006):
        [(_, frame)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, sport))]))
        assert frame[IP].dst != str(first[IP].dst)


@pytest.mark.parametrize("idle, survives", [(899.0, True), (901.0, False)])
def test_established_tcp_timeout_900_seconds(wire, idle, survives):
    [(_, first)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 47000))], now=0.0))
    _reply_from_task(wire, first)
    wire.send([(wire.port("client.1", "app"), syn(wire, 47000, flags="A"))], now=1.0)
    later = wire.send([(wire.port("client.1", "app"), syn(wire, 47000, flags="A"))], now=1.0 + idle)
    if survives:
        assert later.records[0].verdict == "deliver"
    else:
        assert later.records[0].reason == "vip-no-connection"


@pytest.mark.parametrize("idle, survives", [(299.0, True), (301.0, False)])
def test_udp_timeout_300_seconds(wire, idle, survives):
    datagram = Ether(src=wire.mac("client.1", "app"), dst=vip_mac(wire)) / IP(
        src=wire.ip("client.1", "app"), dst=vip(wire)
    ) / UDP(sport=5000, dport=53)
    wire.send([(wire.port("client.1", "app"), datagram)], now=0.0)
    later = wire.send([(wire.port("client.1", "app"), datagram)], now=idle)
    events = [e.decision for e in later.records[0].events if e.stage == "conntrack"]
    assert events == (["hit"] if survives else ["new"])


def test_syn_flood_keeps_table_bounded_and_established_flow(wire):
    lb = wire.fabric.nodes["node1"].lb
    lb.ct = type(lb.ct)(max_entries=64)
    [(_, first)] = deliver_everywhere(wire, wire.send([(wire.port("client.1", "app"), syn(wire, 48000))], now=0.0))
    _reply_from_task(wire, first)
    flood = [(wire.port("client.1", "app"), syn(wire, sport)) for sport in range(20000, 20640)]
    for start in range(0, len(flood), 64):
        wire.send(flood[start : start + 64], now=1.0, trace=False)
    assert len(lb.ct) <= 64
    assert lb.ct.evictions > 0
    later = wire.send([(wire.port("client.1", "app"), syn(wire, 48000, flags="A"))], now=2.0)
    assert later.records[0].verdict == "deliver"
