"""Captures: frames where they enter and leave tapnet, as pcapng that tshark reads without complaint."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tapnet.capture import CaptureEntry, CaptureWriter, capture_form, comment_for
from tapnet.pcapio import open_capture
from tapnet.stack import load_stack
from tracekit import WALL_OFFSET, Traced

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")

BROADCAST = "ff:ff:ff:ff:ff:ff"
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
NEEDS_CSUM = 1
GSO_TCPV4 = 1


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def partial(packet: Ether, gso_size: int = 0) -> tuple[bytes, bytes]:
    """The frame and virtio-net header a sandbox kernel hands over with checksum offload (and TSO when gso_size).

    The L4 checksum field contains the folded pseudo-header sum over the whole L4
    length, not complemented, as Linux's tcp_v4_send_check leaves it.
    """
    frame = bytearray(bytes(packet))
    packet = Ether(bytes(frame))  # fills in ihl, lengths and dataofs
    ip = packet[IP]
    l4 = 14 + ip.ihl * 4
    l4_len = len(frame) - l4
    is_tcp = TCP in packet
    offset = 16 if is_tcp else 6
    pseudo = bytes(frame[26:34]) + struct.pack("!BBH", 0, 6 if is_tcp else 17, l4_len)
    frame[l4 + offset : l4 + offset + 2] = struct.pack("!H", ones_sum(pseudo))
    gso_type = GSO_TCPV4 if gso_size else 0
    header_len = l4 + packet[TCP].dataofs * 4 if is_tcp else l4 + 8
    return bytes(frame), struct.pack("<BBHHHH", NEEDS_CSUM, gso_type, header_len, gso_size, l4, offset)


def valid_l4_checksum(frame: bytes) -> bool:
    packet = Ether(frame)
    layer = packet[TCP] if TCP in packet else packet[UDP]
    sent = layer.chksum
    del layer.chksum
    return Ether(bytes(packet))[type(layer)].chksum == sent


@pytest.fixture
def bridge():
    wire = Traced()
    # app.1 announces itself, so frames to its MAC are unicast.
    hello = Ether(src=wire.mac("app.1", "front"), dst=BROADCAST) / ARP(psrc=wire.ip("app.1", "front"))
    wire.run([(wire.port("app.1", "front"), hello)], now=0.5)
    return wire


def _proxy_to_app(wire, layer) -> Ether:
    return Ether(src=wire.mac("proxy.1", "front"), dst=wire.mac("app.1", "front")) / IP(src=wire.ip("proxy.1", "front"), dst=wire.ip("app.1", "front")) / layer


def _write(entries: list[CaptureEntry], path) -> None:
    with open(path, "wb") as stream:
        CaptureWriter(stream).write(entries)


def _captured(wire, subscriber, now: float = 2.0) -> list[CaptureEntry]:
    return [CaptureEntry.from_wire(item) for item in wire.watch.poll(subscriber.id, now)["items"]]


def tshark_problems(path) -> str:
    completed = subprocess.run(
        [
            "tshark", "-r", str(path),
            "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
            "-Y", "_ws.malformed || _ws.expert.severity >= error",
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def tshark_fields(path, *fields: str) -> list[list[str]]:
    arguments = ["tshark", "-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-T", "fields", "-E", "separator=\t"]
    for name in fields:
        arguments += ["-e", name]
    completed = subprocess.run(arguments, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return [line.split("\t") for line in completed.stdout.splitlines()]


# ---- what the capture records ------------------------------------------------------------


def test_frame_recorded_where_it_enters_and_leaves(bridge):
    subscriber = bridge.subscribe("udp", kind="capture")
    bridge.run([(bridge.port("proxy.1", "front"), _proxy_to_app(bridge, UDP(sport=5000, dport=9) / Raw(b"hi")))], now=2.0)

    entry_in, entry_out = _captured(bridge, subscriber)
    assert entry_in.port == "node1/proxy.1/eth0"
    assert entry_out.port == "node1/app.1/eth0"
    assert entry_in.frame == entry_out.frame
    assert entry_in.time == WALL_OFFSET + 2.0
    assert entry_in.comment.startswith("trace 1 in node1/proxy.1/eth0 | switch: learn (")
    assert entry_out.comment.startswith("trace 1 out node1/app.1/eth0 | ")
    assert entry_out.comment.endswith("| verdict: deliver to node1/app.1/eth0")


def test_dropped_frame_recorded_once_with_reason(bridge):
    subscriber = bridge.subscribe("icmp", kind="capture")
    gateway_mac = bridge.gateway("front")[1]
    frame = Ether(src=bridge.mac("proxy.1", "front"), dst=gateway_mac) / IP(src=bridge.ip("proxy.1", "front"), dst="172.21.0.5") / ICMP()
    bridge.run([(bridge.port("proxy.1", "front"), frame)], now=2.0)

    [entry] = _captured(bridge, subscriber)
    assert entry.port == "node1/proxy.1/eth0"
    assert entry.comment.endswith("| verdict: drop reason=isolation")


def test_partial_checksum_is_completed(bridge):
    subscriber = bridge.subscribe("tcp", kind="capture")
    frame, vnet = partial(_proxy_to_app(bridge, TCP(sport=40000, dport=8080, flags="PA") / Raw(b"GET / HTTP/1.1\r\n\r\n")))
    assert not valid_l4_checksum(frame)
    bridge.run([(bridge.port("proxy.1", "front"), frame, vnet)], now=2.0)

    entries = _captured(bridge, subscriber)
    assert len(entries) == 2
    for entry in entries:
        # The datapath finishes partial checksums of non-GSO frames before its
        # stages run, so both the ingress and the egress entry are complete.
        assert valid_l4_checksum(entry.frame)


def test_superframe_kept_whole_and_noted(bridge):
    subscriber = bridge.subscribe("tcp", kind="capture")
    frame, vnet = partial(_proxy_to_app(bridge, TCP(sport=40000, dport=8080, flags="A") / Raw(bytes(range(256)) * 20)), gso_size=1448)
    bridge.run([(bridge.port("proxy.1", "front"), frame, vnet)], now=2.0)

    entries = _captured(bridge, subscriber)
    assert [len(e.frame) for e in entries] == [len(frame), len(frame)]
    assert all(valid_l4_checksum(e.frame) for e in entries)
    assert all(f"GSO superframe of {len(frame)} bytes kept whole (TCPv4, gso_size 1448)" in e.comment for e in entries)


def test_invalid_vnet_header_leaves_frame_and_says_why():
    frame = bytes(Ether(src="02:42:ac:14:00:04", dst="02:42:ac:14:00:05") / IP() / UDP())
    shown, notes = capture_form(frame, struct.pack("<BBHHHH", NEEDS_CSUM, 0, 0, 0, 500, 6))
    assert shown == frame
    assert notes[0].startswith("checksum left partial: invalid virtio-net header")


def test_vxlan_frame_on_four_ports():
    wire = Traced(load_stack(TWO_NODES))
    subscriber = wire.subscribe("tcp port 6379", kind="capture")
    frame = Ether(src=wire.mac("a.1", "vote"), dst=wire.mac("a.2", "vote")) / IP(src=wire.ip("a.1", "vote"), dst=wire.ip("a.2", "vote")) / TCP(dport=6379, flags="S")
    wire.carry(wire.run([(wire.port("a.1", "vote"), frame)], now=2.0), now=2.001)

    entries = _captured(wire, subscriber, now=2.002)
    assert [e.port for e in entries] == ["node1/a.1/eth0", "node1/vxlan", "node2/vxlan", "node2/a.2/eth0"]
    assert [e.comment.split(" | ")[0] for e in entries] == [
        "trace 1 in node1/a.1/eth0",
        "trace 1 out node1/vxlan",
        "trace 1 hop 2 (record 2) in node2/vxlan",
        "trace 1 hop 2 (record 2) out node2/a.2/eth0",
    ]
    assert entries[1].frame == entries[2].frame
    assert entries[3].frame == bytes(frame)


def test_comment_names_record_of_later_hop():
    class Record:
        id, events, verdict, reason, egress = 9, [], "deliver", None, ["node2/a.2/eth0"]

    assert comment_for(4, 2, Record(), "in", "node2/vxlan", []) == "trace 4 hop 2 (record 9) in node2/vxlan | no stage ran | verdict: deliver to node2/a.2/eth0"


# ---- the file ---------------------------------------------------------------------------


def _mixed_capture(tmp_path):
    """A capture of ARP, ICMP, UDP, partial-checksum TCP, a superframe and a VXLAN crossing, written to a file."""
    bridge = Traced()
    subscriber = bridge.subscribe(kind="capture")
    proxy = bridge.port("proxy.1", "front")
    gateway_ip, gateway_mac = bridge.gateway("front")
    bridge.run([(bridge.port("app.1", "front"), Ether(src=bridge.mac("app.1", "front"), dst=BROADCAST) / ARP(psrc=bridge.ip("app.1", "front"), pdst=gateway_ip))], now=1.0)
    bridge.run([(proxy, Ether(src=bridge.mac("proxy.1", "front"), dst=gateway_mac) / IP(src=bridge.ip("proxy.1", "front"), dst=gateway_ip) / ICMP(id=1, seq=1))], now=1.1)
    bridge.run([(proxy, _proxy_to_app(bridge, UDP(sport=5000, dport=9) / Raw(b"x" * 30)))], now=1.2)
    bridge.run([(proxy, *partial(_proxy_to_app(bridge, TCP(sport=40000, dport=8080, flags="PA") / Raw(b"hello"))))], now=1.3)
    bridge.run([(proxy, *partial(_proxy_to_app(bridge, UDP(sport=5001, dport=9) / Raw(b"y" * 100))))], now=1.4)
    bridge.run([(proxy, *partial(_proxy_to_app(bridge, TCP(sport=40000, dport=8080, flags="A") / Raw(bytes(5000))), gso_size=1448))], now=1.5)
    entries = _captured(bridge, subscriber, now=1.6)

    overlay = Traced(load_stack(TWO_NODES))
    capturing = overlay.subscribe(kind="capture")
    frame = Ether(src=overlay.mac("a.1", "vote"), dst=overlay.mac("a.2", "vote")) / IP(src=overlay.ip("a.1", "vote"), dst=overlay.ip("a.2", "vote")) / TCP(dport=6379, flags="S")
    overlay.carry(overlay.run([(overlay.port("a.1", "vote"), frame)], now=1.7), now=1.701)
    entries += _captured(overlay, capturing, now=1.8)

    path = tmp_path / "mixed.pcapng"
    _write(entries, path)
    return path, entries


def test_file_keeps_one_interface_per_port(tmp_path):
    path, entries = _mixed_capture(tmp_path)
    capture = open_capture(path)
    assert len(capture) == len(entries)
    assert {i.name for i in capture.interfaces} == {e.port for e in entries}
    assert [capture.interface_name(i) for i in range(len(capture))] == [e.port for e in entries]
    assert [capture.comment(i) for i in range(len(capture))] == [e.comment for e in entries]
    assert [capture.frame(i) for i in range(len(capture))] == [e.frame for e in entries]


@needs_tshark
def test_tshark_reports_no_malformed_or_checksum_errors(tmp_path):
    path, _ = _mixed_capture(tmp_path)
    assert tshark_problems(path) == ""


@needs_tshark
def test_tshark_shows_comments_and_interfaces(tmp_path):
    path, entries = _mixed_capture(tmp_path)
    rows = tshark_fields(path, "frame.interface_name", "frame.comment", "tcp.checksum.status", "udp.checksum.status")
    assert [row[0] for row in rows] == [e.port for e in entries]
    assert [row[1] for row in rows] == [e.comment for e in entries]
    # Wireshark's checksum status: 0 bad, 1 good, 3 not present (the outer UDP checksum of VXLAN is zero).
    statuses = [status for row in rows for status in row[2:] if status]
    assert statuses.count("1") >= 10
    assert set(statuses) <= {"1", "3"}
