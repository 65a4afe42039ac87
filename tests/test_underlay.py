"""The nodes' UDP-socket ports (tapnet/underlay.py), on real loopback sockets and the real datapath.

The cluster's underlay is 127.77.0.0/24, so node1's VTEP socket and a
stand-in for node2's VTEP both live on loopback; nothing leaves the machine.
No root is needed.
"""

from __future__ import annotations

import select
import socket
import time
from collections import Counter

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from tapnet import vxlan
from tapnet.datapath import Fabric
from tapnet.model import VXLAN_PORT, mac_for_ip
from tapnet.stack import load_stack_text
from tapnet.underlay import DROP_TX_ERROR, UPSTREAM_MAPPING_SECONDS, SocketPorts, UdpPort

NODE1 = "127.77.0.2"
NODE2 = "127.77.0.3"
UPSTREAM = "127.77.0.9"
STACK = f"""
x-tapnet:
  nodes: [node1, node2]
  underlay: 127.77.0.0/24
  placement:
    a: node1
    b: node2
  dns_upstreams: [{UPSTREAM}]
services:
  a:
    networks: [ov]
  b:
    networks: [ov]
networks:
  ov:
    driver: overlay
    ipam:
      config:
        - subnet: 10.77.1.0/24
"""


def address_value(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


class Written:
    """A stand-in for the runtime's writer: sends frames for socket ports, records (port, frame) for the others."""

    def __init__(self):
        self.frames: list[tuple[int, bytes]] = []
        self.ports: SocketPorts | None = None

    def __call__(self, port: int, frame: bytes, vnet: bytes | None) -> None:
        if self.ports is not None and self.ports.owns(port):
            self.ports.send(port, frame)
        else:
            self.frames.append((port, frame))


@pytest.fixture
def node1():
    """node1's VTEP and upstream sockets on loopback, wired to a real Fabric."""
    cluster = load_stack_text(STACK)
    fabric = Fabric(cluster)
    opened = []

    def udp_port(kind: str) -> UdpPort:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((NODE1, 0))
        sock.setblocking(False)
        opened.append(sock)
        name = f"node1/{kind}"
        # The VTEP's frames name port 4789, as in the runtime, whatever port the test socket got.
        local_port = VXLAN_PORT if kind == "vxlan" else sock.getsockname()[1]
        return UdpPort(fabric.port_id(name), name, "node1", kind, sock, address_value(NODE1), local_port)

    written = Written()
    ports = SocketPorts(fabric, [udp_port("vxlan"), udp_port("upstream")], np.random.default_rng(0), written, Counter())
    written.ports = ports
    yield cluster, fabric, ports, written
    for sock in opened:
        sock.close()


@pytest.fixture
def peer_socket():
    """A UDP socket on loopback standing in for another host on the underlay."""
    created = []

    def make(address: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.settimeout(2)
        created.append(sock)
        return sock

    yield make
    for sock in created:
        sock.close()


def bound_port(udp: UdpPort) -> int:
    return udp.sock.getsockname()[1]


def wait_readable(sock: socket.socket) -> None:
    ready, _, _ = select.select([sock], [], [], 2)
    assert ready, "no datagram arrived within 2 s"


def test_datagram_from_remote_vtep_reaches_local_endpoint(node1, peer_socket):
    cluster, fabric, ports, written = node1
    vtep = ports.ports[0]
    a = cluster.sandboxes["a.1"].endpoints[0]
    b = cluster.sandboxes["b.1"].endpoints[0]
    inner = bytes(Ether(src=mac_for_ip(b.ip), dst=mac_for_ip(a.ip)) / IP(src=str(b.ip), dst=str(a.ip)) / ICMP(id=7, seq=1))
    outer = vxlan.encapsulate(inner, 4097, address_value(NODE2), address_value(NODE1), 0, 0, 1)
    sender = peer_socket(NODE2)

    sender.sendto(outer[42:], (NODE1, bound_port(vtep)))
    wait_readable(vtep.sock)
    count = ports.forward_from(vtep, now=1.0)

    assert count == 1
    assert written.frames == [(fabric.port_id("node1/a.1/eth0"), inner)]


def test_received_datagram_framed_like_wrap_datagram(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    vtep = ports.ports[0]
    sender = peer_socket(NODE2)
    payload = bytes(range(200))

    sender.sendto(payload, (NODE1, bound_port(vtep)))
    wait_readable(vtep.sock)
    ports.forward_from(vtep, now=1.0)

    expected = vxlan.wrap_datagram(payload, address_value(NODE2), sender.getsockname()[1], address_value(NODE1), vtep.local_port)
    assert ports.batch.frame(0) == expected


def test_datagram_from_unknown_vtep_dropped(node1, peer_socket):
    _cluster, fabric, ports, written = node1
    vtep = ports.ports[0]
    stranger = peer_socket("127.77.0.99")

    stranger.sendto(vxlan.encapsulate(bytes(60), 4097, 1, 2, 0, 0, 1)[42:], (NODE1, bound_port(vtep)))
    wait_readable(vtep.sock)
    ports.forward_from(vtep, now=1.0)

    assert written.frames == []
    assert fabric.drops_by_reason() == {"vxlan-unknown-vtep": 1}


def test_emitted_frame_sent_to_its_destination(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    vtep = ports.ports[0]
    receiver = peer_socket(NODE2)
    payload = b"\x08\x00\x00\x00\x00\x10\x01\x00" + bytes(50)
    frame = vxlan.wrap_datagram(payload, address_value(NODE1), 45000, address_value(NODE2), receiver.getsockname()[1])

    ports.send(vtep.port, frame)
    data, source = receiver.recvfrom(2048)

    assert data == payload
    assert source == (NODE1, bound_port(vtep))
    assert ports.sent == 1


def test_send_failure_counted(node1):
    _cluster, _fabric, ports, _written = node1
    vtep = ports.ports[0]
    # UDP port 0 is not a valid destination: sendto fails with EINVAL.
    frame = vxlan.wrap_datagram(b"x", address_value(NODE1), 45000, address_value(NODE2), 0)

    ports.send(vtep.port, frame)

    assert ports.drops[("node1/vxlan", DROP_TX_ERROR)] == 1
    assert ports.sent == 0


def upstream_query(ports: SocketPorts, server: socket.socket, source_port: int, query_id: bytes) -> None:
    """Send a DNS-shaped query as the DNS stage would emit it on node1/upstream."""
    upstream = ports.ports[1]
    payload = query_id + bytes(10)
    frame = vxlan.wrap_datagram(payload, address_value(NODE1), source_port, address_value(UPSTREAM), server.getsockname()[1])
    ports.send(upstream.port, frame)


def reply_destination_port(ports: SocketPorts, server: socket.socket, query_id: bytes, now: float) -> int:
    """Reply from `server` to the last query with `query_id`; return the UDP destination port of the frame the datapath gets."""
    upstream = ports.ports[1]
    _query, client = server.recvfrom(2048)
    server.sendto(query_id + bytes(10), client)
    wait_readable(upstream.sock)
    ports.forward_from(upstream, now=now)
    return int(UDP(bytes(ports.batch.frame(0))[34:42]).dport)


def test_upstream_reply_addressed_to_query_source_port(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    server = peer_socket(UPSTREAM)

    upstream_query(ports, server, 40001, b"\x12\x34")

    assert reply_destination_port(ports, server, b"\x12\x34", now=1.0) == 40001


def test_upstream_reply_with_unknown_id_keeps_socket_port(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    server = peer_socket(UPSTREAM)
    upstream_query(ports, server, 40001, b"\x12\x34")

    port = reply_destination_port(ports, server, b"\x99\x99", now=1.0)

    assert port == ports.ports[1].local_port


def test_upstream_mapping_expires(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    server = peer_socket(UPSTREAM)
    ports.now = 100.0
    upstream_query(ports, server, 40001, b"\x12\x34")

    ports.expire(100.0 + UPSTREAM_MAPPING_SECONDS + 1)

    assert reply_destination_port(ports, server, b"\x12\x34", now=200.0) == ports.ports[1].local_port


def test_drain_reads_burst_in_one_batch(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    vtep = ports.ports[0]
    sender = peer_socket(NODE2)
    for i in range(10):
        sender.sendto(bytes([i]) * 20, (NODE1, bound_port(vtep)))
    time.sleep(0.05)

    count = ports.forward_from(vtep, now=1.0)

    assert count == 10
    assert [ports.batch.frame(i)[42] for i in range(10)] == list(range(10))


def test_large_datagrams_end_drain_early_untruncated(node1, peer_socket):
    _cluster, _fabric, ports, _written = node1
    vtep = ports.ports[0]
    vtep.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender = peer_socket(NODE2)
    size = 60000
    for i in range(20):
        sender.sendto(bytes([i]) * size, (NODE1, bound_port(vtep)))
    time.sleep(0.05)

    first = ports.forward_from(vtep, now=1.0)
    lengths = [int(ports.batch.lengths[i]) for i in range(first)]
    rest = ports.forward_from(vtep, now=1.0)

    assert first < 20
    assert first + rest == 20
    assert lengths == [42 + size] * first
