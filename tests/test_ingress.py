"""The ingress routing mesh in the datapath: gwbridge to any task and back."""

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from dpkit import Wire
from test_lb import checksums_valid, deliver_everywhere
from tapnet.stack import load_stack

STACK = """
x-tapnet:
  nodes: [node1, node2]
services:
  web:
    deploy: {replicas: 2}
    ports: ["3000:80"]
    networks: [app]
networks:
  app:
    driver: overlay
    ipam: {config: [{subnet: 10.10.0.0/24}]}
"""
HOST_GW_MAC = "02:42:ac:12:00:01"
SBOX_GW_MAC = "02:42:ac:12:00:02"
CLIENT = "198.51.100.77"


@pytest.fixture
def wire():
    return Wire(load_stack(STACK))


def ingress_tasks(wire):
    return {str(s.endpoint_on("ingress").ip): name for name, s in wire.cluster.sandboxes.items()}


def from_client(wire, sport, flags="S", node="node1"):
    frame = (
        Ether(src=HOST_GW_MAC, dst=SBOX_GW_MAC)
        / IP(src=CLIENT, dst="172.18.0.2")
        / TCP(sport=sport, dport=3000, flags=flags, seq=77)
    )
    return wire.send([(wire.fabric.port_id(f"{node}/gwbridge"), frame)])


def test_gwbridge_arp_for_ingress_sandbox(wire):
    request = Ether(src=HOST_GW_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=HOST_GW_MAC, psrc="172.18.0.1", pdst="172.18.0.2")
    [(port, reply)] = wire.out(wire.send([(wire.fabric.port_id("node1/gwbridge"), request)]))
    assert wire.fabric.port_names[port] == "node1/gwbridge"
    assert reply[ARP].hwsrc == SBOX_GW_MAC


def test_published_port_reaches_every_task_with_snat(wire):
    seen = set()
    sbox_ip = str(wire.cluster.ingress_sbox_ips["node1"])
    for sport in range(50000, 50004):
        [(port, frame)] = deliver_everywhere(wire, from_client(wire, sport))
        assert frame[IP].src == sbox_ip
        assert frame[TCP].dport == 80
        assert checksums_valid(frame)
        seen.add(ingress_tasks(wire)[frame[IP].dst])
        assert port.endswith(f"/{ingress_tasks(wire)[frame[IP].dst]}/eth0")
    assert seen == set(ingress_tasks(wire).values())


def test_reply_returns_on_gwbridge_as_published_port(wire):
    for sport in (51000, 51001):
        [(_, frame)] = deliver_everywhere(wire, from_client(wire, sport))
        task = wire.cluster.sandboxes[ingress_tasks(wire)[frame[IP].dst]]
        reply = (
            Ether(src=frame.dst, dst=frame.src)
            / IP(src=frame[IP].dst, dst=frame[IP].src)
            / TCP(sport=80, dport=frame[TCP].sport, flags="SA", seq=9, ack=78)
        )
        result = wire.send([(wire.fabric.port_id(f"{task.node}/{task.name}/eth0"), reply)])
        [(port, back)] = deliver_everywhere(wire, result)
        assert port == "node1/gwbridge"
        assert back[IP].src == "172.18.0.2"
        assert back[TCP].sport == 3000
        assert back[IP].dst == CLIENT
        assert back[TCP].dport == sport
        assert back.dst == HOST_GW_MAC
        assert checksums_valid(back)


def test_unpublished_port_is_dropped(wire):
    frame = Ether(src=HOST_GW_MAC, dst=SBOX_GW_MAC) / IP(src=CLIENT, dst="172.18.0.2") / TCP(sport=1, dport=3001, flags="S")
    result = wire.send([(wire.fabric.port_id("node1/gwbridge"), frame)])
    assert result.records[0].reason == "vip-no-service"


def test_task_accepts_only_target_port_on_ingress_address(wire):
    tasks = list(wire.cluster.sandboxes.values())
    first = tasks[0]
    second = next(t for t in tasks if t.node == first.node and t is not first) if sum(t.node == first.node for t in tasks) > 1 else tasks[1]
    src_ep, dst_ep = first.endpoint_on("ingress"), second.endpoint_on("ingress")
    frame = (
        Ether(src="02:42:" + src_ep.ip.packed.hex(":"), dst="02:42:" + dst_ep.ip.packed.hex(":"))
        / IP(src=str(src_ep.ip), dst=str(dst_ep.ip))
        / TCP(sport=40000, dport=22, flags="S")
    )
    result = wire.send([(wire.fabric.port_id(f"{first.node}/{first.name}/eth0"), frame)])
    assert result.records[0].reason == "ingress-port-closed"
