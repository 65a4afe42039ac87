"""Ports published in host mode: nftables rules on the task's node only, untranslated delivery and replies on gwbridge."""

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from dpkit import Wire
from tapnet import mesh
from tapnet.model import format_mac
from tapnet.stack import load_stack

STACK = """
x-tapnet:
  nodes: [node1, node2]
  placement:
    web: node1
services:
  web:
    ports:
      - {target: 80, published: 8080, mode: host}
    networks: [app]
  client:
    networks: [app]
networks:
  app:
    driver: overlay
    ipam: {config: [{subnet: 10.10.0.0/24}]}
"""
HOST_GW_MAC = "02:42:ac:12:00:01"
SBOX_GW_MAC = "02:42:ac:12:00:02"
CLIENT = "198.51.100.77"
OUTSIDE = "203.0.113.9"


@pytest.fixture
def wire():
    return Wire(load_stack(STACK))


def web_task(wire):
    return wire.cluster.sandboxes["web.1"]


def from_client(wire, sport, flags="S", dport=80, node="node1"):
    frame = (
        Ether(src=HOST_GW_MAC, dst=SBOX_GW_MAC)
        / IP(src=CLIENT, dst=wire.ip("web.1", "app"))
        / TCP(sport=sport, dport=dport, flags=flags, seq=77)
    )
    return wire.send([(wire.fabric.port_id(f"{node}/gwbridge"), frame)])


def reply_from_task(wire, sport, dst=CLIENT, dport=None):
    _, gateway_mac = wire.gateway("app")
    frame = (
        Ether(src=wire.mac("web.1", "app"), dst=gateway_mac)
        / IP(src=wire.ip("web.1", "app"), dst=dst)
        / TCP(sport=80, dport=dport if dport is not None else sport, flags="SA", seq=9, ack=78)
    )
    return wire.send([(wire.port("web.1", "app"), frame)])


def test_task_placed_on_node1(wire):
    assert web_task(wire).node == "node1"


def test_syn_reaches_task_with_client_address(wire):
    result = from_client(wire, 50000)

    [(port, frame)] = wire.out(result)
    assert wire.fabric.port_names[port] == "node1/web.1/eth0"
    assert frame[IP].src == CLIENT
    assert frame[IP].dst == wire.ip("web.1", "app")
    assert frame[TCP].sport == 50000
    assert frame[TCP].dport == 80
    assert frame.dst == wire.mac("web.1", "app")
    assert frame.src == wire.gateway("app")[1]
    assert result.records[0].verdict == "deliver"


def test_reply_goes_back_out_on_gwbridge(wire):
    from_client(wire, 50001)

    result = reply_from_task(wire, 50001)

    [(port, frame)] = wire.out(result)
    assert wire.fabric.port_names[port] == "node1/gwbridge"
    assert frame.dst == HOST_GW_MAC
    assert frame.src == SBOX_GW_MAC
    assert frame[IP].src == wire.ip("web.1", "app")
    assert frame[IP].dst == CLIENT
    assert frame[TCP].sport == 80
    assert frame[TCP].dport == 50001
    assert result.records[0].verdict == "deliver"


def test_connection_is_tracked_untranslated(wire):
    from_client(wire, 50002)
    task_ip = wire.ip("web.1", "app")

    [row] = wire.fabric.nodes["node1"].lb.conntrack_rows(0.0)

    assert row["orig"] == {"src": CLIENT, "dst": task_ip, "sport": 50002, "dport": 80}
    assert row["reply"] == {"src": task_ip, "dst": CLIENT, "sport": 80, "dport": 50002}


def test_unrelated_reply_to_outside_is_no_egress(wire):
    result = reply_from_task(wire, 50003, dst=OUTSIDE)

    assert wire.out(result) == []
    assert result.records[0].reason == "no-egress"


def test_untracked_reply_to_client_is_no_egress(wire):
    result = reply_from_task(wire, 50004)

    assert result.records[0].reason == "no-egress"


def test_other_task_to_outside_is_no_egress(wire):
    _, gateway_mac = wire.gateway("app")
    frame = (
        Ether(src=wire.mac("client.1", "app"), dst=gateway_mac)
        / IP(src=wire.ip("client.1", "app"), dst=OUTSIDE)
        / UDP(sport=4000, dport=53)
    )
    result = wire.send([(wire.port("client.1", "app"), frame)])

    assert result.records[0].reason == "no-egress"


def test_unpublished_port_of_task_is_dropped(wire):
    result = from_client(wire, 50005, dport=22)

    assert wire.out(result) == []
    assert result.records[0].reason == "vip-no-service"


def test_ack_without_connection_is_dropped(wire):
    result = from_client(wire, 50006, flags="A")

    assert result.records[0].reason == "vip-no-connection"


def test_node_without_task_does_not_deliver(wire):
    result = from_client(wire, 50007, node="node2")

    assert wire.out(result) == []
    assert result.records[0].reason == "gateway-no-service"


def test_ruleset_only_on_node_with_task(wire):
    cluster = wire.cluster
    texts = {
        node.name: mesh.nft_ruleset(node.underlay_ip, mesh.ingress_ports(cluster), mesh.host_ports(cluster, node.name))
        for node in cluster.nodes
    }
    node1_ip = cluster.nodes[0].underlay_ip
    rule = f"ip daddr {node1_ip} tcp dport 8080 dnat to {wire.ip('web.1', 'app')}:80"

    assert texts["node1"].count(rule) == 2
    assert "8080" not in texts["node2"]


def test_host_ports_use_default_gateway_network(wire):
    [port] = mesh.host_ports(wire.cluster, "node1")

    assert port == mesh.HostPort("tcp", 8080, ipaddress.IPv4Address(wire.ip("web.1", "app")), 80, "web.1")
    assert mesh.host_ports(wire.cluster, "node2") == []


def test_host_mode_task_has_no_ingress_endpoint(wire):
    assert web_task(wire).endpoint_on("ingress") is None
