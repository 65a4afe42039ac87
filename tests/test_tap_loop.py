"""`TapLoop`: frames from ready TAP fds through the real datapath and back out.

Each TAP is stood in for by one end of a Unix SOCK_SEQPACKET socket pair,
which keeps frame boundaries as a TAP fd does, so the tests need no root.
The test writes a virtio-net header plus a frame into the peer end, as a
sandbox's kernel would, and reads what tapnet wrote from the peer end.
The datapath is a real `Fabric` of a two-sandbox stack. tests/live runs
the same loop on real TAP devices.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from tapnet.batch import MAX_FRAME, VNET_HDR_LEN
from tapnet.datapath import Fabric
from tapnet.model import format_mac
from tapnet.runtime import DROP_RX_SHORT, DROP_TX_FULL, JOIN_MAX_FRAME, TapLoop
from tapnet.stack import load_stack

STACK = """
services:
  a:
    networks: [bench]
  b:
    networks: [bench]
networks:
  bench:
    driver: bridge
    ipam: {config: [{subnet: 10.77.3.0/24}]}
"""
PORT_A = "node1/a.1/eth0"
PORT_B = "node1/b.1/eth0"
ZERO_VNET = bytes(VNET_HDR_LEN)
NOW = 5.0
BAD_FD = -1  # never open: reads fail with EBADF


@dataclass
class SocketTap:
    """What TapLoop uses of a `netns.Tap`: the datapath port name and the fd."""

    port: str
    fd: int


@dataclass
class Rig:
    loop: TapLoop
    tap_a: socket.socket
    peer_a: socket.socket
    tap_b: socket.socket
    peer_b: socket.socket
    frames: dict


@pytest.fixture
def rig():
    cluster = load_stack(STACK)
    a, b = (cluster.sandboxes[name].endpoints[0] for name in ("a.1", "b.1"))
    sockets = []
    for _ in range(2):
        tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap.setblocking(False)
        peer.setblocking(False)
        sockets += [tap, peer]
    tap_a, peer_a, tap_b, peer_b = sockets
    loop = TapLoop(Fabric(cluster), [SocketTap(PORT_A, tap_a.fileno()), SocketTap(PORT_B, tap_b.fileno())], np.random.default_rng(1))

    mac_a, mac_b = format_mac(a.mac), format_mac(b.mac)
    frames = {
        "arp_from_a": bytes(Ether(src=mac_a, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac_a, psrc=str(a.ip), pdst=str(b.ip))),
        "arp_from_b": bytes(Ether(src=mac_b, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac_b, psrc=str(b.ip), pdst=str(a.ip))),
        "udp_a_to_b": bytes(Ether(src=mac_a, dst=mac_b) / IP(src=str(a.ip), dst=str(b.ip)) / UDP(sport=40000, dport=9000) / (b"x" * 500)),
    }
    yield Rig(loop, tap_a, peer_a, tap_b, peer_b, frames)
    for sock in sockets:
        sock.close()


def received(peer: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(peer.recv(MAX_FRAME))
        except BlockingIOError:
            return out


def test_broadcast_reaches_other_tap(rig):
    rig.peer_a.send(ZERO_VNET + rig.frames["arp_from_a"])

    count = rig.loop.forward_ready([rig.tap_a.fileno()], NOW)

    assert count == 1
    assert received(rig.peer_b) == [ZERO_VNET + rig.frames["arp_from_a"]]
    assert received(rig.peer_a) == []


def test_ready_taps_share_one_batch(rig):
    rig.peer_a.send(ZERO_VNET + rig.frames["arp_from_a"])
    rig.peer_b.send(ZERO_VNET + rig.frames["arp_from_b"])

    count = rig.loop.forward_ready([rig.tap_a.fileno(), rig.tap_b.fileno()], NOW)

    assert count == 2
    assert rig.loop.batches == 1
    assert received(rig.peer_b) == [ZERO_VNET + rig.frames["arp_from_a"]]
    assert received(rig.peer_a) == [ZERO_VNET + rig.frames["arp_from_b"]]


def test_large_frames_keep_their_order(rig):
    small = rig.frames["udp_a_to_b"]
    large = small[:-500] + b"L" * (JOIN_MAX_FRAME + 1000)
    sent = [small, large, small[:-1] + b"z", large, small]
    for frame in sent:
        rig.peer_a.send(ZERO_VNET + frame)

    rig.loop.forward_ready([rig.tap_a.fileno()], NOW)

    assert received(rig.peer_b) == [ZERO_VNET + frame for frame in sent]


def test_full_tap_queue_counts_tx_full(rig):
    rig.tap_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 100
    for _ in range(sent):
        rig.peer_a.send(ZERO_VNET + rig.frames["udp_a_to_b"])

    rig.loop.forward_ready([rig.tap_a.fileno()], NOW)

    delivered = len(received(rig.peer_b))
    full = rig.loop.counters()[PORT_B]["drops"].get(DROP_TX_FULL, 0)
    assert 0 < delivered < sent
    assert full == sent - delivered


def test_short_read_is_counted(rig):
    rig.peer_a.send(b"short")

    count = rig.loop.forward_ready([rig.tap_a.fileno()], NOW)

    assert count == 0
    assert rig.loop.counters()[PORT_A]["drops"] == {DROP_RX_SHORT: 1}


def test_failed_read_stops_reading_fd(rig, caplog):
    rig.loop.port_by_fd[BAD_FD] = rig.loop.port_by_fd[rig.tap_a.fileno()]

    with caplog.at_level(logging.ERROR, logger="tapnet.runtime"):
        first = rig.loop.forward_ready([BAD_FD], NOW)
    second = rig.loop.forward_ready([BAD_FD], NOW)

    assert first == 0
    assert second == 0
    assert rig.loop.dead_fds == {BAD_FD}
    assert f"reading TAP of {PORT_A} failed" in caplog.text


def test_run_forwards_until_cancelled(rig):
    async def scenario() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.loop.run)
            await trio.sleep(0.05)
            rig.peer_a.send(ZERO_VNET + rig.frames["arp_from_a"])
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(rig.peer_b)
            nursery.cancel_scope.cancel()
        return received(rig.peer_b)

    assert trio.run(scenario) == [ZERO_VNET + rig.frames["arp_from_a"]]
