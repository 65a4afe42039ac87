"""VXLAN in the datapath: encapsulation, decapsulation, ARP suppression, bad datagrams."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from dpkit import Wire
from tapnet import reasons
from tapnet.model import ExternalPeer, mac_for_ip
from tapnet.stack import load_stack

TWO_NODES = """
x-tapnet:
  nodes: [node1, node2]
  peers:
    - {network: vote, ip: 10.0.0.200, vtep: 198.51.100.50}
services:
  a:
    deploy: {replicas: 2}
    networks: [vote]
  b:
    deploy: {replicas: 2}
    networks: [other]
networks:
  vote:
    driver: overlay
    ipam: {config: [{subnet: 10.0.0.0/24}]}
  other:
    driver: overlay
    ipam: {config: [{subnet: 10.0.1.0/24}]}
"""
BROADCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture
def wire():
    return Wire(load_stack(TWO_NODES))


def _nodes(wire, *sandboxes):
    return [wire.cluster.sandboxes[s].node for s in sandboxes]


def _pair(wire):
    """a.1 and a.2 must sit on different nodes for these tests to mean anything."""
    first, second = _nodes(wire, "a.1", "a.2")
    assert first != second
    return first, second


def _underlay(wire, node):
    return str(wire.cluster.node(node).underlay_ip)


def _frame_a1_to_a2(wire):
    return (
        Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.2", "vote"))
        / IP(src=wire.ip("a.1", "vote"), dst=wire.ip("a.2", "vote"))
        / TCP(sport=43000, dport=6379, flags="S")
    )


def test_unicast_to_remote_endpoint_is_encapsulated(wire):
    node1, node2 = _pair(wire)
    inner = _frame_a1_to_a2(wire)
    result = wire.send([(wire.port("a.1", "vote"), inner)])
    [(port, outer)] = wire.out(result)
    assert wire.fabric.port_names[port] == f"{node1}/vxlan"
    assert outer[IP].src == _underlay(wire, node1)
    assert outer[IP].dst == _underlay(wire, node2)
    assert outer[UDP].dport == 4789
    assert 32768 <= outer[UDP].sport <= 60999
    assert outer[UDP].chksum == 0
    assert outer[VXLAN].flags == 0x08
    assert outer[VXLAN].vni == wire.cluster.networks["vote"].vni
    assert bytes(outer[VXLAN].payload) == bytes(inner)


def test_outer_ipv4_checksum_is_valid(wire):
    result = wire.send([(wire.port("a.1", "vote"), _frame_a1_to_a2(wire))])
    outer = Ether(result.emits[0].frame)
    sent = outer[IP].chksum
    del outer[IP].chksum
    assert Ether(bytes(outer))[IP].chksum == sent


def test_source_port_is_stable_per_flow(wire):
    first = wire.send([(wire.port("a.1", "vote"), _frame_a1_to_a2(wire))])
    second = wire.send([(wire.port("a.1", "vote"), _frame_a1_to_a2(wire))])
    assert Ether(first.emits[0].frame)[UDP].sport == Ether(second.emits[0].frame)[UDP].sport


def test_decapsulated_frame_reaches_local_endpoint(wire):
    node1, node2 = _pair(wire)
    inner = _frame_a1_to_a2(wire)
    outer = wire.send([(wire.port("a.1", "vote"), inner)]).emits[0].frame
    result = wire.send([(wire.fabric.port_id(f"{node2}/vxlan"), outer)])
    [(port, delivered)] = wire.out(result)
    assert port == wire.port("a.2", "vote")
    assert bytes(delivered) == bytes(inner)
    assert result.records[0].verdict == "deliver"


def test_arp_for_remote_endpoint_is_suppressed(wire):
    request = Ether(src=wire.mac("a.1", "vote"), dst=BROADCAST) / ARP(
        op=1, hwsrc=wire.mac("a.1", "vote"), psrc=wire.ip("a.1", "vote"), pdst=wire.ip("a.2", "vote")
    )
    result = wire.send([(wire.port("a.1", "vote"), request)])
    names = [wire.fabric.port_names[e.port] for e in result.emits]
    assert not any(name.endswith("/vxlan") for name in names)
    [reply] = [f for p, f in wire.out(result) if f.haslayer(ARP) and f[ARP].op == 2]
    assert reply[ARP].hwsrc == wire.mac("a.2", "vote")
    assert reply[ARP].psrc == wire.ip("a.2", "vote")


def test_arp_for_external_peer_is_suppressed(wire):
    request = Ether(src=wire.mac("a.1", "vote"), dst=BROADCAST) / ARP(
        op=1, hwsrc=wire.mac("a.1", "vote"), psrc=wire.ip("a.1", "vote"), pdst="10.0.0.200"
    )
    result = wire.send([(wire.port("a.1", "vote"), request)])
    [reply] = [f for p, f in wire.out(result) if f.haslayer(ARP) and f[ARP].op == 2]
    assert reply[ARP].hwsrc == "02:42:0a:00:00:c8"


def test_unicast_to_external_peer_goes_to_its_vtep(wire):
    frame = Ether(src=wire.mac("a.1", "vote"), dst="02:42:0a:00:00:c8") / IP(
        src=wire.ip("a.1", "vote"), dst="10.0.0.200"
    ) / ICMP()
    [(_, outer)] = wire.out(wire.send([(wire.port("a.1", "vote"), frame)]))
    assert outer[IP].dst == "198.51.100.50"


def test_broadcast_does_not_cross_the_tunnel(wire):
    frame = Ether(src=wire.mac("a.1", "vote"), dst=BROADCAST) / ARP(pdst="10.0.0.99")
    result = wire.send([(wire.port("a.1", "vote"), frame)])
    assert not any(wire.fabric.ports[e.port].kind == "vxlan" for e in result.emits)


def test_unknown_unicast_does_not_cross_the_tunnel(wire):
    frame = Ether(src=wire.mac("a.1", "vote"), dst="02:42:0a:00:00:63") / IP() / UDP()
    result = wire.send([(wire.port("a.1", "vote"), frame)])
    assert not any(wire.fabric.ports[e.port].kind == "vxlan" for e in result.emits)


def _datagram(wire, node_from, node_to, inner, vni=None, flags=0x08):
    vni = wire.cluster.networks["vote"].vni if vni is None else vni
    return (
        Ether(src=str(mac_for_ip(wire.cluster.node(node_from).underlay_ip).hex(":")), dst="02:42:c6:33:64:03")
        / IP(src=_underlay(wire, node_from), dst=_underlay(wire, node_to))
        / UDP(sport=40000, dport=4789, chksum=0)
        / VXLAN(flags=flags, vni=vni)
        / inner
    )


def _bad_cases(wire):
    node1, node2 = _pair(wire)
    good_inner = Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.2", "vote")) / IP() / UDP()
    other_vni = wire.cluster.networks["other"].vni
    stranger = _datagram(wire, node1, node2, good_inner)
    stranger[IP].src = "198.51.100.99"
    return [
        ("unknown VTEP", stranger, "vxlan-unknown-vtep"),
        ("I flag clear", _datagram(wire, node1, node2, good_inner, flags=0x00), "vxlan-i-flag-clear"),
        ("unknown VNI", _datagram(wire, node1, node2, good_inner, vni=9999), "vxlan-unknown-vni"),
        ("inner MAC on another network", _datagram(wire, node1, node2, good_inner, vni=other_vni), "vxlan-unknown-mac"),
        (
            "inner MAC unknown",
            _datagram(wire, node1, node2, Ether(src=wire.mac("a.1", "vote"), dst="02:42:0a:00:00:63") / IP()),
            "vxlan-unknown-mac",
        ),
        ("inner broadcast", _datagram(wire, node1, node2, Ether(src=wire.mac("a.1", "vote"), dst=BROADCAST) / ARP()), "vxlan-broadcast"),
        ("not VXLAN", Ether(src="02:42:c6:33:64:02", dst="02:42:c6:33:64:03") / IP(src=_underlay(wire, node1)) / UDP(dport=53), "not-vxlan"),
        ("truncated VXLAN header", bytes(_datagram(wire, node1, node2, good_inner))[:50], None),
        ("inner frame malformed", _datagram(wire, node1, node2, Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.2", "vote")) / IP(len=900)), "malformed-ipv4"),
    ]


CASE_NAMES = [
    "unknown VTEP", "I flag clear", "unknown VNI", "inner MAC on another network", "inner MAC unknown",
    "inner broadcast", "not VXLAN", "truncated VXLAN header", "inner frame malformed",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_datagrams_are_dropped_with_reason(wire, name):
    cases = {case[0]: case for case in _bad_cases(wire)}
    _, frame, reason = cases[name]
    _, node2 = _pair(wire)
    port = wire.fabric.port_id(f"{node2}/vxlan")
    result = wire.send([(port, frame)])
    assert result.emits == []
    record = result.records[0]
    assert record.verdict == "drop"
    if reason is None:
        assert record.reason.startswith("malformed-")
    else:
        assert record.reason == reason
    assert sum(wire.fabric.drops.values()) == 1


def test_moved_task_follows_cluster_change(wire):
    node1, node2 = _pair(wire)
    # a.2 leaves node2; a new task takes its address on node1, next to a.1.
    changed = copy.deepcopy(wire.cluster)
    moved = changed.sandboxes.pop("a.2")
    moved.name, moved.slot, moved.node = "a.3", 3, node1
    changed.sandboxes["a.3"] = moved
    wire.fabric.update_cluster(changed)
    wire.cluster = changed
    hello = Ether(src=wire.mac("a.3", "vote"), dst=BROADCAST) / ARP(psrc=wire.ip("a.3", "vote"))
    wire.send([(wire.port("a.3", "vote"), hello)])
    result = wire.send([(wire.port("a.1", "vote"), _frame_a1_to_a2_moved(wire))])
    assert [wire.fabric.port_names[e.port] for e in result.emits] == [f"{node1}/a.3/eth0"]


def _frame_a1_to_a2_moved(wire):
    return Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.3", "vote")) / IP(
        src=wire.ip("a.1", "vote"), dst=wire.ip("a.3", "vote")
    ) / UDP()


def test_removed_task_port_counts_unknown_port(wire):
    changed = copy.deepcopy(wire.cluster)
    port = wire.port("a.1", "vote")
    del changed.sandboxes["a.1"]
    wire.fabric.update_cluster(changed)
    result = wire.send([(port, Ether(src="02:42:0a:00:00:02", dst=BROADCAST) / ARP())])
    assert result.records[0].reason == "unknown-port"


def test_remote_endpoint_moving_away_leaves_no_stale_fdb(wire):
    node1, node2 = _pair(wire)
    changed = copy.deepcopy(wire.cluster)
    changed.external_peers.append(ExternalPeer("vote", changed.sandboxes["a.1"].endpoints[0].ip, mac_for_ip(changed.sandboxes["a.1"].endpoints[0].ip), changed.node(node2).underlay_ip))
    # a.1's own node learns a.1 first; then a.1 becomes an external peer elsewhere.
    wire.send([(wire.port("a.1", "vote"), Ether(src=wire.mac("a.1", "vote"), dst=BROADCAST) / ARP())])
    mac = int(wire.mac("a.1", "vote").replace(":", ""), 16)
    assert mac in wire.fabric.nodes[node1].networks["vote"].bridge.fdb
    del changed.sandboxes["a.1"]
    wire.fabric.update_cluster(changed)
    assert mac not in wire.fabric.nodes[node1].networks["vote"].bridge.fdb


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 200), st.integers(0, 255))
def test_mutated_datagrams_never_raise(noise, position, value):
    wire = Wire(load_stack(TWO_NODES))
    node1, node2 = _pair(wire)
    frame = bytearray(bytes(_datagram(wire, node1, node2, _frame_a1_to_a2(wire))) + noise)
    if position < len(frame):
        frame[position] = value
    result = wire.send([(wire.fabric.port_id(f"{node2}/vxlan"), bytes(frame))])
    record = result.records[0]
    assert record.verdict in {"deliver", "drop"}
    if record.verdict == "drop":
        assert record.reason in reasons.BY_CODE
    for emit in result.emits:
        assert wire.fabric.ports[emit.port].network == "vote"
