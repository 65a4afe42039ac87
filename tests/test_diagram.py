"""Diagrams: the demo stack renders to SVG with every node, network and sandbox; a trace's path is drawn on it."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ElementTree

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tapnet import diagram, stack
from tracekit import Traced

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz dot")

TWO_NODES = """
x-tapnet:
  nodes: [node1, node2]
services:
  a:
    deploy: {replicas: 2}
    networks: [vote]
networks:
  vote:
    driver: overlay
    ipam: {config: [{subnet: 10.0.7.0/24}]}
"""


@pytest.fixture(scope="module")
def demo():
    return stack.load_demo(root_networks=())


def _svg_text(path) -> str:
    """All text the SVG shows, one string per <text> element."""
    root = ElementTree.parse(path).getroot()
    return "\n".join("".join(element.itertext()) for element in root.iter("{http://www.w3.org/2000/svg}text"))


@needs_dot
def test_demo_svg_names_every_node_network_and_sandbox(demo, tmp_path):
    path = diagram.render(diagram.cluster_dot(demo, "demo"), tmp_path / "demo.svg")
    text = _svg_text(path)
    for node in demo.nodes:
        assert f"{node.name} (underlay {node.underlay_ip})" in text
    for network in demo.networks.values():
        assert network.name in text.splitlines()
    for sandbox in demo.sandboxes.values():
        assert sandbox.name in text.splitlines()


@needs_dot
def test_demo_svg_shows_vnis_vips_and_ingress(demo, tmp_path):
    text = _svg_text(diagram.render(diagram.cluster_dot(demo), tmp_path / "demo.svg"))
    vnis = sorted(n.vni for n in demo.networks.values() if n.vni is not None)
    assert "VXLAN VNI " + ", ".join(map(str, vnis)) in text
    for network in demo.networks.values():
        if network.vni is not None:
            assert f"VNI {network.vni}" in text
    for service in demo.services.values():
        for vip in service.vips.values():
            assert f"VIP {vip}" in text
    assert "ingress-sbox" in text
    assert "published 3000->web:80/tcp" in text


def test_every_endpoint_joins_its_network(demo):
    source = diagram.cluster_dot(demo)
    for sandbox in demo.sandboxes.values():
        for endpoint in sandbox.endpoints:
            assert f'"sandbox/{sandbox.name}":"{endpoint.ifname}" -> "network/{endpoint.network}";' in source


def test_trace_path_drawn_through_tunnel(tmp_path):
    wire = Traced(stack.load_stack(TWO_NODES))
    subscriber = wire.subscribe()
    frame = Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.2", "vote")) / IP(src=wire.ip("a.1", "vote"), dst=wire.ip("a.2", "vote")) / TCP(dport=6379, flags="S")
    wire.carry(wire.run([(wire.port("a.1", "vote"), frame)], now=1.0), now=1.01)
    story = wire.only_story(subscriber, now=1.02)

    source = diagram.cluster_dot(wire.cluster, story=story)
    red = [line.strip() for line in source.splitlines() if diagram.COLOUR_PATH in line and "->" in line]
    assert red == [
        '"sandbox/a.1":"eth0" -> "network/vote" [' + _path_style() + ', label="1"];',
        '"network/vote" -> "host/node1":eth0 [' + _path_style() + ', label="1 deliver"];',
        '"host/node1":eth0 -> "host/node2":eth0 [' + _path_style() + ', style=dashed, label="VXLAN"];',
        '"host/node2":eth0 -> "network/vote" [' + _path_style() + ', label="2"];',
        '"network/vote" -> "sandbox/a.2":"eth0" [' + _path_style() + ', label="2 deliver"];',
    ]
    assert 'label="trace 1: IP 10.0.7.3.20 > 10.0.7.4.6379: Flags [S], length 0"' in source


def _path_style() -> str:
    return f'color="{diagram.COLOUR_PATH}", fontcolor="{diagram.COLOUR_PATH}", penwidth=2.5, dir=forward, constraint=false'


def test_dropped_trace_ends_in_reason_octagon():
    wire = Traced()
    subscriber = wire.subscribe()
    gateway_mac = wire.gateway("front")[1]
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=gateway_mac) / IP(src=wire.ip("proxy.1", "front"), dst="172.21.0.5") / TCP()
    wire.run([(wire.port("proxy.1", "front"), frame)], now=1.0)
    story = wire.only_story(subscriber, now=1.0)

    source = diagram.cluster_dot(wire.cluster, story=story)
    assert '"drop/1/1" [shape=octagon' in source
    assert 'label="drop: isolation"' in source
    assert '"network/front" -> "drop/1/1"' in source


def test_port_names_map_to_diagram_nodes(demo):
    assert diagram.port_endpoint("node1/redis.1/eth0", demo) == '"sandbox/redis.1":"eth0"'
    assert diagram.port_endpoint("node2/vxlan", demo) == '"host/node2":eth0'
    assert diagram.port_endpoint("node1/gwbridge", demo) == '"host/node1":gwbridge'
    assert diagram.port_endpoint("node1/ingress-sbox", demo) == '"ingress-sbox/node1"'
    assert diagram.port_endpoint("node9/vxlan", demo) is None


def test_names_with_quotes_are_escaped():
    assert diagram._q('a "b"\nc') == '"a \\"b\\"\\nc"'


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(diagram.DiagramError, match="unsupported diagram format '.txt'"):
        diagram.render("digraph {}", tmp_path / "x.txt")


def test_dot_file_written_as_source(tmp_path):
    path = diagram.render("digraph { a -> b }\n", tmp_path / "x.dot")
    assert path.read_text() == "digraph { a -> b }\n"
