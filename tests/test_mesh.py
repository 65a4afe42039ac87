"""Routing-mesh pieces that need no root: the nftables text, relay listeners and copying, and the load-balancer views."""

from __future__ import annotations

import ipaddress
import socket
from functools import partial
from types import SimpleNamespace

import pytest
import trio
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from dpkit import Wire
from tapnet import mesh, servicectl
from tapnet.datapath import Fabric
from tapnet.model import format_mac, mac_for_ip
from tapnet.stack import load_stack

STACK = """
x-tapnet:
  nodes: [node1, node2]
services:
  web:
    deploy: {replicas: 2}
    ports:
      - "3000:80"
      - {target: 53, published: 5353, protocol: udp}
      - {target: 81, published: 8081, mode: host}
    networks: [app]
  client:
    networks: [app]
networks:
  app:
    driver: overlay
    ipam: {config: [{subnet: 10.10.0.0/24}]}
"""


@pytest.fixture
def cluster():
    return load_stack(STACK)


def test_ingress_ports_skip_host_mode(cluster):
    assert mesh.ingress_ports(cluster) == [("tcp", 3000), ("udp", 5353)]


def test_ruleset_dnats_each_port_in_both_chains(cluster):
    text = mesh.nft_ruleset(ipaddress.IPv4Address("198.51.100.2"), mesh.ingress_ports(cluster))

    assert text.count("ip daddr 198.51.100.2 tcp dport 3000 dnat to 172.18.0.2:3000") == 2
    assert text.count("ip daddr 198.51.100.2 udp dport 5353 dnat to 172.18.0.2:5353") == 2
    assert "type nat hook prerouting priority dstnat;" in text
    assert "type nat hook output priority -100;" in text
    assert "8081" not in text


def test_install_rules_rejects_foreign_namespace():
    with pytest.raises(ValueError, match="not a tapnet namespace"):
        mesh.install_rules("other", "table ip x {}\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_relays_listen_on_tcp_ports_only(cluster):
    port = free_port()
    cluster.relay_ports[3000] = port

    relays = mesh.open_relays(cluster)
    try:
        assert [(r.published, r.loopback) for r in relays] == [(3000, port)]
        assert relays[0].listener.getsockname() == ("127.0.0.1", port)
    finally:
        for relay in relays:
            relay.close()


def test_relay_port_in_use_names_port(cluster):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cluster.relay_ports[3000] = taken.getsockname()[1]

        with pytest.raises(mesh.RelayPortInUse, match=f"127.0.0.1:{taken.getsockname()[1]} for published port 3000"):
            mesh.open_relays(cluster)


async def _echo_upper(stream):
    async with stream:
        async for data in stream:
            await stream.send_all(data.upper())


def test_relay_copies_both_ways_and_half_close(monkeypatch):
    # The relay's outgoing socket normally comes from a host namespace; here it is a plain
    # socket, and both ends stay on loopback.
    monkeypatch.setattr(mesh, "_socket_in", lambda namespace: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    async def main():
        with trio.fail_after(10):
            return await exchange()

    async def exchange():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, _echo_upper, 0, host="127.0.0.1"))
            target_port = listeners[0].socket.getsockname()[1]
            relay = mesh.Relay(target_port, 0, socket.socket(), namespace="tn-unused", target="127.0.0.1")
            client, relay_side = await _socket_pair()
            nursery.start_soon(mesh.relay_connection, relay, relay_side)

            await client.send_all(b"hello relay")
            received = b""
            while len(received) < len(b"hello relay"):
                received += await client.receive_some(100)
            await client.send_eof()
            rest = await client.receive_some(100)
            relay.close()
            nursery.cancel_scope.cancel()
        return received, rest

    received, rest = trio.run(main)

    assert received == b"HELLO RELAY"
    assert rest == b""


async def _socket_pair():
    first, second = trio.socket.socketpair()
    return trio.SocketStream(first), trio.SocketStream(second)


def test_size_conntrack_shares_table_with_ingress(cluster):
    fabric = Fabric(cluster)

    servicectl.size_conntrack(fabric, 8, seed=3)

    for datapath in fabric.nodes.values():
        assert datapath.lb.ct.capacity == 8
        assert datapath.ingress.ct is datapath.lb.ct
    assert fabric.nodes["node1"].lb.ct is not fabric.nodes["node2"].lb.ct


def test_views_after_vip_connection(cluster):
    wire = Wire(cluster)
    servicectl.size_conntrack(wire.fabric, 16, seed=1)
    instance = SimpleNamespace(name="unit", fabric=wire.fabric)
    client = cluster.sandboxes["client.1"]
    vip = cluster.services["web"].vips["app"]
    syn = (
        Ether(src=wire.mac("client.1", "app"), dst=format_mac(mac_for_ip(vip)))
        / IP(src=wire.ip("client.1", "app"), dst=str(vip))
        / TCP(sport=40000, dport=80, flags="S")
    )
    wire.send([(wire.port("client.1", "app"), syn)], now=0.5)

    conntrack = servicectl.conntrack_view(instance, client.node, now=1.0)[client.node]
    lb = servicectl.lb_view(instance, client.node, now=1.0, service="web")[client.node]
    text = servicectl.format_conntrack({client.node: conntrack})
    table = servicectl.format_lb({client.node: lb})

    assert conntrack["count"] == 1
    assert conntrack["max"] == 16
    assert conntrack["entries"][0]["orig"]["dst"] == str(vip)
    assert f"dst={vip} sport=" in text
    assert "# 1 of 16 entries; evictions 0" in text
    assert [row["service"] for row in lb] == ["web"]
    assert sum(b["active"] for b in lb[0]["backends"]) == 1
    assert f"VIP  {vip}:* rr" in table


def test_views_reject_unknown_node(cluster):
    instance = SimpleNamespace(name="unit", fabric=Fabric(cluster))

    with pytest.raises(ValueError, match="no node named 'node9'"):
        servicectl.conntrack_view(instance, "node9", now=0.0)
