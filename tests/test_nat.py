"""Conntrack and NAT (tapnet.nat): checksums against scapy, ICMP errors, timeouts, TCP states, limits.

Frames are built with scapy, with both MACs set so that scapy never resolves
one, and located with tapnet's parser. Nothing is sent anywhere. Addresses are in 10.0.1.0/24 and 10.255.0.0/16, apart from the
root namespace's addresses.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from tapnet import nat
from tapnet.batch import FrameBatch
from tapnet.parse import NEEDS_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM, parse_batch


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def eth() -> Ether:
    """An Ethernet header with both MACs set, so scapy never resolves one (which could send ARP)."""
    return Ether(src="02:42:0a:00:01:02", dst="02:42:0a:00:01:01")


CLIENT = ip("10.0.1.2")
VIP = ip("10.0.1.254")
BACKEND = ip("10.0.1.5")
INGRESS_VIP = ip("10.255.0.3")
INGRESS_SBOX = ip("10.255.0.2")

SYN = nat.TCP_SYN
SYNACK = nat.TCP_SYN | nat.TCP_ACK
ACK = nat.TCP_ACK
FINACK = nat.TCP_FIN | nat.TCP_ACK
FIN = nat.TCP_FIN
RST = nat.TCP_RST
ORIG = nat.ORIGINAL
REPLY = nat.REPLY


def parsed(frame: bytes, vnet: bytes | None = None):
    """Return tapnet's parser record of one frame."""
    batch = FrameBatch(capacity_frames=4, capacity_bytes=1 << 17)
    batch.append(0, frame, vnet)
    record = parse_batch(batch)[0]
    assert record["status"] == 0, f"parser rejected the test frame: status {record['status']}"
    return record


def rewrite_frame(frame: bytes, translation, partial: bool = False, vnet: bytes | None = None) -> bytearray:
    record = parsed(frame, vnet)
    out = bytearray(frame)
    nat.rewrite(out, int(record["l3_off"]), int(record["l4_off"]), int(record["ip_proto"]), *translation, partial)
    return out


def recomputed(frame: bytes) -> Ether:
    """The frame with every IP, TCP, UDP and ICMP checksum computed afresh by scapy."""
    packet = Ether(bytes(frame))
    for layer in (IP, TCP, UDP, ICMP):
        if packet.haslayer(layer):
            del packet[layer].chksum
    return Ether(bytes(packet))


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header_sum(src: int, dst: int, proto: int, l4_length: int) -> int:
    return ones_complement_sum(struct.pack("!IIBBH", src, dst, 0, proto, l4_length))


def with_partial_checksum(frame: bytes, l4_off: int, csum_field: int, src: int, dst: int, proto: int) -> bytes:
    """Put the folded pseudo-header sum in the checksum field, as Linux hands over a NEEDS_CSUM frame."""
    out = bytearray(frame)
    partial = pseudo_header_sum(src, dst, proto, len(frame) - l4_off)
    struct.pack_into("!H", out, l4_off + csum_field, partial)
    return bytes(out)


def complete_checksum(frame: bytes, l4_off: int, csum_field: int) -> bytes:
    """Finish a partial checksum the way a NIC does: sum from the L4 header to the end, complement."""
    out = bytearray(frame)
    checksum = ~ones_complement_sum(bytes(out[l4_off:])) & 0xFFFF
    struct.pack_into("!H", out, l4_off + csum_field, checksum)
    return bytes(out)


def vnet_header(csum_start: int, csum_offset: int, gso_type: int = 0, gso_size: int = 0, hdr_len: int = 0) -> bytes:
    """A virtio-net header with NEEDS_CSUM, as a TAP with IFF_VNET_HDR delivers it."""
    return struct.pack(
        "<BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, csum_offset
    )


PAYLOAD = b"tapnet conntrack test payload, odd length: 45"

# (name, frame, translation): DNAT of a client packet to a backend, the
# reverse for its reply, SNAT with a new source port, and special layouts.
REWRITE_CASES = [
    (
        "tcp-dnat",
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=40000, dport=80, flags="S") / PAYLOAD,
        (CLIENT, 40000, BACKEND, 8080),
    ),
    (
        "tcp-reply-un-dnat",
        eth() / IP(src="10.0.1.5", dst="10.0.1.2") / TCP(sport=8080, dport=40000, flags="SA") / PAYLOAD,
        (VIP, 80, CLIENT, 40000),
    ),
    (
        "tcp-snat-and-dnat",
        eth() / IP(src="10.0.1.2", dst="10.255.0.3") / TCP(sport=51000, dport=3000, flags="A") / PAYLOAD,
        (INGRESS_SBOX, 33333, BACKEND, 80),
    ),
    (
        "tcp-with-ip-options",
        eth() / IP(src="10.0.1.2", dst="10.0.1.254", options=b"\x01\x01\x01\x00") / TCP(sport=1, dport=80) / PAYLOAD,
        (CLIENT, 1, BACKEND, 8080),
    ),
    (
        "tcp-behind-vlan-tag",
        eth() / Dot1Q(vlan=7) / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=65535, dport=80) / PAYLOAD,
        (CLIENT, 65535, BACKEND, 0),
    ),
    (
        "udp-dnat",
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=5000, dport=53) / PAYLOAD,
        (CLIENT, 5000, BACKEND, 5353),
    ),
    (
        "udp-snat",
        eth() / IP(src="10.0.1.2", dst="10.255.0.3") / UDP(sport=5000, dport=3000) / PAYLOAD,
        (INGRESS_SBOX, 45678, BACKEND, 53),
    ),
    (
        "udp-empty-payload",
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=7, dport=7),
        (CLIENT, 7, BACKEND, 9),
    ),
    (
        "icmp-echo-dnat",
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / ICMP(type=8, id=0x1234, seq=1) / PAYLOAD,
        (CLIENT, 0x1234, BACKEND, 0x1234),
    ),
    (
        "icmp-echo-snat-new-id",
        eth() / IP(src="10.0.1.2", dst="10.255.0.3") / ICMP(type=8, id=0x1234, seq=9) / PAYLOAD,
        (INGRESS_SBOX, 40001, BACKEND, 40001),
    ),
    (
        "icmp-echo-reply-back",
        eth() / IP(src="10.0.1.5", dst="10.255.0.2") / ICMP(type=0, id=40001, seq=9) / PAYLOAD,
        (INGRESS_VIP, 0x1234, CLIENT, 0x1234),
    ),
]


@pytest.mark.parametrize("name, packet, translation", REWRITE_CASES, ids=[case[0] for case in REWRITE_CASES])
def test_rewrite_complete_checksums_match_scapy(name, packet, translation):
    out = rewrite_frame(bytes(packet), translation)

    expected = recomputed(out)
    got = Ether(bytes(out))
    assert got[IP].chksum == expected[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if got.haslayer(layer):
            assert got[layer].chksum == expected[layer].chksum, f"{layer.__name__} checksum"


@pytest.mark.parametrize("name, packet, translation", REWRITE_CASES, ids=[case[0] for case in REWRITE_CASES])
def test_rewrite_writes_translation(name, packet, translation):
    out = Ether(bytes(rewrite_frame(bytes(packet), translation)))
    new_src, new_sport, new_dst, new_dport = translation

    assert ip(out[IP].src) == new_src
    assert ip(out[IP].dst) == new_dst
    if out.haslayer(ICMP):
        assert out[ICMP].id == new_sport
    else:
        layer = TCP if out.haslayer(TCP) else UDP
        assert out[layer].sport == new_sport
        assert out[layer].dport == new_dport
    if name != "udp-empty-payload":
        assert bytes(out)[-len(PAYLOAD) :] == PAYLOAD


def test_rewrite_keeps_absent_udp_checksum():
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=5000, dport=53, chksum=0) / PAYLOAD
    out = Ether(bytes(rewrite_frame(bytes(packet), (CLIENT, 5000, BACKEND, 5353))))
    assert out[UDP].chksum == 0


def test_rewrite_udp_checksum_zero_sent_as_ffff():
    # Choose the last payload word (at an even offset) so that the translated
    # datagram sums to 0xFFFF: its checksum computes to zero, which UDP must
    # send as 0xFFFF.
    translated = IP(src="10.0.1.2", dst="10.0.1.5") / UDP(sport=5000, dport=5353, chksum=0) / (PAYLOAD[:-1] + b"\0\0")
    udp = bytes(translated)[20:]
    partial = ones_complement_sum(udp) + pseudo_header_sum(CLIENT, BACKEND, 17, len(udp))
    while partial >> 16:
        partial = (partial & 0xFFFF) + (partial >> 16)
    last_word = (0xFFFF - partial).to_bytes(2, "big")
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=5000, dport=53) / (PAYLOAD[:-1] + last_word)

    out = Ether(bytes(rewrite_frame(bytes(packet), (CLIENT, 5000, BACKEND, 5353))))

    assert out[UDP].chksum == 0xFFFF
    assert recomputed(bytes(out))[UDP].chksum == 0xFFFF


def test_rewrite_keeps_bad_checksum_bad():
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=40000, dport=80, chksum=0xBEEF) / PAYLOAD
    out = Ether(bytes(rewrite_frame(bytes(packet), (CLIENT, 40000, BACKEND, 8080))))
    assert out[TCP].chksum != recomputed(bytes(out))[TCP].chksum


# (name, scapy L4 layer, checksum field offset, payload length, GSO type)
PARTIAL_CASES = [
    ("tcp", TCP(sport=40000, dport=80, flags="PA"), 16, len(PAYLOAD), 0),
    ("udp", UDP(sport=5000, dport=53), 6, len(PAYLOAD), 0),
    ("tcp-superframe", TCP(sport=40000, dport=80, flags="A"), 16, 30001, 1),  # VIRTIO_NET_HDR_GSO_TCPV4
]


@pytest.mark.parametrize("name, l4, field, size, gso", PARTIAL_CASES, ids=[case[0] for case in PARTIAL_CASES])
def test_rewrite_partial_checksum_completes_to_scapy(name, l4, field, size, gso):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / l4 / Raw(payload)
    l4_off = 14 + 20
    proto = packet[IP].proto
    frame = with_partial_checksum(bytes(packet), l4_off, field, CLIENT, VIP, proto)
    vnet = vnet_header(l4_off, field, gso_type=gso, gso_size=1448 if gso else 0, hdr_len=l4_off + 20 if gso else 0)
    record = parsed(frame, vnet)
    assert record["flags"] & NEEDS_CSUM

    out = rewrite_frame(frame, (CLIENT, 40000 if proto == 6 else 5000, BACKEND, 8080), partial=True, vnet=vnet)
    completed = complete_checksum(bytes(out), l4_off, field)

    expected = recomputed(completed)
    got = Ether(completed)
    layer = TCP if proto == 6 else UDP
    assert got[IP].chksum == expected[IP].chksum
    assert got[layer].chksum == expected[layer].chksum
    assert got[layer].dport == 8080


def test_rewrite_partial_field_holds_new_pseudo_header_sum():
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=40000, dport=80) / PAYLOAD
    frame = with_partial_checksum(bytes(packet), 34, 16, CLIENT, VIP, 6)
    out = rewrite_frame(frame, (INGRESS_SBOX, 33333, BACKEND, 8080), partial=True)
    field = struct.unpack_from("!H", out, 34 + 16)[0]
    assert field == pseudo_header_sum(INGRESS_SBOX, BACKEND, 6, len(frame) - 34)


def test_rewrite_rejects_read_only_frame():
    packet = bytes(eth() / IP() / TCP())
    with pytest.raises(TypeError, match="bytearray"):
        nat.rewrite(packet, 14, 34, 6, CLIENT, 1, BACKEND, 2)


def test_rewrite_truncated_leaves_frame_unchanged():
    packet = bytearray(bytes(eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=1, dport=80)))
    truncated = packet[:40]
    before = bytes(truncated)
    with pytest.raises(ValueError, match="truncated"):
        nat.rewrite(truncated, 14, 34, 6, CLIENT, 1, BACKEND, 2)
    assert bytes(truncated) == before


# ---------------------------------------------------------------------------
# ICMP errors


def quoted(packet) -> bytes:
    return bytes(packet)


def icmp_error_frame(src: str, dst: str, icmp: ICMP, quote: bytes) -> bytes:
    return bytes(eth() / IP(src=src, dst=dst, id=77) / icmp / Raw(quote))


def dnat_conntrack():
    """A conntrack with UDP 10.0.1.2:5000 -> VIP:53 and TCP 10.0.1.2:40000 -> VIP:80, both DNATed to the backend."""
    ct = nat.Conntrack(max_entries=16)
    udp = ct.create(17, (CLIENT, 5000, VIP, 53), (BACKEND, 5353, CLIENT, 5000), now=0.0)
    tcp = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN)
    ct.update(tcp, REPLY, SYNACK, 0.0)
    ct.update(tcp, ORIG, ACK, 0.0)
    return ct, udp, tcp


def translate_error(ct, frame: bytes) -> tuple[bytearray, int, int]:
    record = parsed(frame)
    entry, direction = ct.lookup_icmp_error(frame, int(record["l4_off"]), 1.0)
    out = bytearray(frame)
    if entry >= 0:
        translation = ct.translation(entry, direction)
        nat.rewrite_icmp_error(out, int(record["l3_off"]), int(record["l4_off"]), *translation)
    return out, entry, direction


def test_icmp_port_unreachable_from_backend_translated():
    ct, udp, _ = dnat_conntrack()
    as_client_sent = IP(src="10.0.1.2", dst="10.0.1.254", id=5) / UDP(sport=5000, dport=53) / PAYLOAD
    as_backend_got = IP(src="10.0.1.2", dst="10.0.1.5", id=5) / UDP(sport=5000, dport=5353) / PAYLOAD
    frame = icmp_error_frame("10.0.1.5", "10.0.1.2", ICMP(type=3, code=3), quoted(as_backend_got))

    out, entry, direction = translate_error(ct, frame)

    expected = icmp_error_frame("10.0.1.254", "10.0.1.2", ICMP(type=3, code=3), quoted(as_client_sent))
    assert (entry, direction) == (udp, REPLY)
    assert bytes(out) == expected


def test_icmp_fragmentation_needed_from_client_translated():
    ct, _, tcp = dnat_conntrack()
    as_client_got = IP(src="10.0.1.254", dst="10.0.1.2", id=9) / TCP(sport=80, dport=40000, flags="A") / PAYLOAD
    as_backend_sent = IP(src="10.0.1.5", dst="10.0.1.2", id=9) / TCP(sport=8080, dport=40000, flags="A") / PAYLOAD
    icmp = ICMP(type=3, code=4, nexthopmtu=1400)
    frame = icmp_error_frame("10.0.1.2", "10.0.1.254", icmp, quoted(as_client_got))

    out, entry, direction = translate_error(ct, frame)

    expected = icmp_error_frame("10.0.1.2", "10.0.1.5", icmp, quoted(as_backend_sent))
    assert (entry, direction) == (tcp, ORIG)
    assert bytes(out) == expected


def test_icmp_error_with_8_byte_quote_translated():
    ct, _, tcp = dnat_conntrack()
    as_client_got = IP(src="10.0.1.254", dst="10.0.1.2", id=9) / TCP(sport=80, dport=40000) / PAYLOAD
    as_backend_sent = IP(src="10.0.1.5", dst="10.0.1.2", id=9) / TCP(sport=8080, dport=40000) / PAYLOAD
    icmp = ICMP(type=11, code=0)
    frame = icmp_error_frame("10.0.1.2", "10.0.1.254", icmp, quoted(as_client_got)[:28])

    out, entry, direction = translate_error(ct, frame)

    expected = icmp_error_frame("10.0.1.2", "10.0.1.5", icmp, quoted(as_backend_sent)[:28])
    assert (entry, direction) == (tcp, ORIG)
    assert bytes(out) == expected


def test_icmp_error_about_snat_echo_translated():
    ct = nat.Conntrack(max_entries=16)
    entry = ct.create(1, (CLIENT, 0x1234, INGRESS_VIP, 0x1234), (BACKEND, 40001, INGRESS_SBOX, 40001), now=0.0)
    as_client_sent = IP(src="10.0.1.2", dst="10.255.0.3", id=3) / ICMP(type=8, id=0x1234, seq=1) / PAYLOAD
    as_backend_would_get = IP(src="10.255.0.2", dst="10.0.1.5", id=3) / ICMP(type=8, id=40001, seq=1) / PAYLOAD
    # The backend's host answers "host unreachable" about the translated echo request.
    frame = icmp_error_frame("10.0.1.5", "10.255.0.2", ICMP(type=3, code=1), quoted(as_backend_would_get))

    out, found, direction = translate_error(ct, frame)

    expected = icmp_error_frame("10.255.0.3", "10.0.1.2", ICMP(type=3, code=1), quoted(as_client_sent))
    assert (found, direction) == (entry, REPLY)
    assert bytes(out) == expected


def test_icmp_error_checksums_match_scapy():
    ct, _, _ = dnat_conntrack()
    as_backend_got = IP(src="10.0.1.2", dst="10.0.1.5") / UDP(sport=5000, dport=5353) / PAYLOAD
    frame = icmp_error_frame("10.0.1.5", "10.0.1.2", ICMP(type=3, code=3), quoted(as_backend_got))

    out, _, _ = translate_error(ct, frame)

    got = Ether(bytes(out))
    expected = recomputed(out)
    assert got[IP].chksum == expected[IP].chksum
    assert got[ICMP].chksum == expected[ICMP].chksum


def test_icmp_error_about_unknown_flow_not_found():
    ct, _, _ = dnat_conntrack()
    stranger = IP(src="10.0.1.9", dst="10.0.1.5") / UDP(sport=1, dport=2)
    frame = icmp_error_frame("10.0.1.5", "10.0.1.9", ICMP(type=3, code=3), quoted(stranger))
    _, entry, _ = translate_error(ct, frame)
    assert entry == -1


def test_icmp_error_truncated_quote_rejected():
    frame = bytearray(icmp_error_frame("10.0.1.5", "10.0.1.2", ICMP(type=3, code=3), b"\x45\x00\x00"))
    before = bytes(frame)
    with pytest.raises(ValueError, match="truncated"):
        nat.rewrite_icmp_error(frame, 14, 34, VIP, 53, CLIENT, 5000)
    assert bytes(frame) == before


# ---------------------------------------------------------------------------
# Timeouts


# (name, proto, flags of the packets before idling, idle seconds, alive after)
TIMEOUT_CASES = [
    ("tcp-established-899", 6, [SYN, SYNACK, ACK], 899.0, True),
    ("tcp-established-901", 6, [SYN, SYNACK, ACK], 901.0, False),
    ("tcp-fin-wait-119", 6, [SYN, SYNACK, ACK, FINACK], 119.0, True),
    ("tcp-fin-wait-121", 6, [SYN, SYNACK, ACK, FINACK], 121.0, False),
    ("udp-299", 17, [0, 0], 299.0, True),
    ("udp-301", 17, [0, 0], 301.0, False),
    ("icmp-29", 1, [0, 0], 29.0, True),
    ("icmp-30", 1, [0, 0], 30.0, False),
]
DIRECTIONS = [ORIG, REPLY, ORIG, ORIG]


@pytest.mark.parametrize("name, proto, flags, idle, alive", TIMEOUT_CASES, ids=[case[0] for case in TIMEOUT_CASES])
def test_timeout_after_last_packet(name, proto, flags, idle, alive):
    ct = nat.Conntrack(max_entries=8)
    ports = (7, 7) if proto == 1 else (40000, 80)
    entry = ct.create(proto, (CLIENT, ports[0], VIP, ports[1]), (BACKEND, ports[1], CLIENT, ports[0]), 100.0, flags[0])
    for step, packet_flags in enumerate(flags[1:], start=1):
        ct.update(entry, DIRECTIONS[step], packet_flags, 100.0 + step)
    last = 100.0 + len(flags) - 1

    found = ct.lookup(proto, CLIENT, ports[0], VIP, ports[1], last + idle)
    assert (found[0] == entry) is alive


def test_expire_removes_only_timed_out_entries():
    ct = nat.Conntrack(max_entries=8)
    udp = ct.create(17, (CLIENT, 1, VIP, 53), (BACKEND, 53, CLIENT, 1), now=0.0)
    icmp = ct.create(1, (CLIENT, 9, VIP, 9), (BACKEND, 9, CLIENT, 9), now=0.0)

    removed = ct.expire(now=31.0)

    assert removed == 1
    assert ct.lookup(1, CLIENT, 9, VIP, 9, 0.0) == (-1, 0)
    assert ct.lookup(17, CLIENT, 1, VIP, 53, 31.0) == (udp, ORIG)
    assert len(ct) == 1
    assert ct.expired == 1
    assert icmp != udp


def test_expire_in_slices_covers_the_table():
    ct = nat.Conntrack(max_entries=64)
    for port in range(40):
        ct.create(17, (CLIENT, port, VIP, 53), (BACKEND, 53, CLIENT, port), now=0.0)
    removed = sum(ct.expire(now=400.0, max_scan=10) for _ in range(7))
    assert removed == 40
    assert len(ct) == 0


def test_timeouts_override_like_ipvsadm_set():
    ct = nat.Conntrack(max_entries=8, timeouts={"udp": 10})
    ct.create(17, (CLIENT, 1, VIP, 53), (BACKEND, 53, CLIENT, 1), now=0.0)
    assert ct.lookup(17, CLIENT, 1, VIP, 53, 10.5) == (-1, 0)


def test_unknown_timeout_name_rejected():
    with pytest.raises(ValueError, match="unknown timeout"):
        nat.Conntrack(max_entries=8, timeouts={"sctp": 10})


# ---------------------------------------------------------------------------
# TCP states


# (name, [(direction, flags), ...] after the first SYN, expected states after each packet)
TCP_SEQUENCES = [
    ("handshake", [(REPLY, SYNACK), (ORIG, ACK)], ["SYN_RECV", "ESTABLISHED"]),
    (
        "client-closes",
        [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FINACK), (REPLY, ACK), (REPLY, FINACK), (ORIG, ACK)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT"],
    ),
    (
        "server-closes",
        [(REPLY, SYNACK), (ORIG, ACK), (REPLY, FINACK), (ORIG, ACK), (ORIG, FINACK), (REPLY, ACK)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT"],
    ),
    (
        "fin-answered-by-fin",
        [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, FINACK), (ORIG, ACK)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "LAST_ACK", "TIME_WAIT"],
    ),
    (
        "closer-acks-do-not-advance",
        [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FINACK), (ORIG, ACK), (REPLY, FINACK), (REPLY, ACK)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "FIN_WAIT", "LAST_ACK", "LAST_ACK"],
    ),
    ("rst-answers-syn", [(REPLY, RST | ACK)], ["CLOSE"]),
    ("rst-in-established", [(REPLY, SYNACK), (ORIG, ACK), (ORIG, RST)], ["SYN_RECV", "ESTABLISHED", "CLOSE"]),
    (
        "rst-in-fin-wait",
        [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, RST)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE"],
    ),
    ("syn-retransmitted", [(ORIG, SYN), (REPLY, SYNACK)], ["SYN_SENT", "SYN_RECV"]),
    ("data-without-flags", [(REPLY, SYNACK), (ORIG, ACK), (ORIG, 0x08)], ["SYN_RECV", "ESTABLISHED", "ESTABLISHED"]),
    (
        "reopen-after-time-wait",
        [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, FINACK), (ORIG, ACK), (ORIG, SYN)],
        ["SYN_RECV", "ESTABLISHED", "FIN_WAIT", "LAST_ACK", "TIME_WAIT", "SYN_SENT"],
    ),
    ("fin-in-syn-sent-ignored", [(ORIG, FIN), (REPLY, SYNACK)], ["SYN_SENT", "SYN_RECV"]),
]


@pytest.mark.parametrize("name, packets, states", TCP_SEQUENCES, ids=[case[0] for case in TCP_SEQUENCES])
def test_tcp_state_sequence(name, packets, states):
    ct = nat.Conntrack(max_entries=8)
    entry = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN)
    seen = [ct.update(entry, direction, flags, float(t)) for t, (direction, flags) in enumerate(packets, start=1)]
    assert seen == states


@pytest.mark.parametrize("state", nat.TCP_STATES)
def test_tcp_state_timeout_from_table(state):
    """Each state's timeout is the one TCP_STATE_TIMEOUTS names, counted from the last packet."""
    paths = {
        "NONE": (0, []),
        "SYN_SENT": (SYN, []),
        "SYN_RECV": (SYN, [(REPLY, SYNACK)]),
        "ESTABLISHED": (SYN, [(REPLY, SYNACK), (ORIG, ACK)]),
        "FIN_WAIT": (SYN, [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN)]),
        "CLOSE_WAIT": (SYN, [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, ACK)]),
        "LAST_ACK": (SYN, [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, FIN)]),
        "TIME_WAIT": (SYN, [(REPLY, SYNACK), (ORIG, ACK), (ORIG, FIN), (REPLY, FIN), (ORIG, ACK)]),
        "CLOSE": (SYN, [(REPLY, RST)]),
    }
    first, packets = paths[state]
    ct = nat.Conntrack(max_entries=8)
    entry = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=first)
    for direction, flags in packets:
        ct.update(entry, direction, flags, 5.0)
    assert ct.state(entry) == state
    assert ct.expires_at(entry) == 5.0 * bool(packets) + nat.TCP_STATE_TIMEOUTS[state]


def test_tcp_rst_closes_every_state():
    for state in nat.TCP_STATES:
        sides = ("closer", "peer") if state in nat.CLOSING_STATES else ("original", "reply")
        for side in sides:
            assert nat.TCP_TRANSITIONS[(state, side, "RST")] == "CLOSE", (state, side)


def test_reply_marks_seen_reply():
    ct = nat.Conntrack(max_entries=8)
    entry = ct.create(17, (CLIENT, 1, VIP, 53), (BACKEND, 53, CLIENT, 1), now=0.0)
    assert not ct.seen_reply(entry)
    ct.update(entry, REPLY, 0, 1.0)
    assert ct.seen_reply(entry)


# ---------------------------------------------------------------------------
# Table limits


def udp_flow(ct, port: int, now: float) -> int:
    return ct.create(17, (CLIENT, port, VIP, 53), (BACKEND, 53, CLIENT, port), now=now)


def test_full_table_evicts_oldest_unreplied():
    ct = nat.Conntrack(max_entries=4)
    first = udp_flow(ct, 1, 0.0)
    others = [udp_flow(ct, port, float(port)) for port in (2, 3, 4)]

    newest = udp_flow(ct, 5, 5.0)

    assert newest >= 0
    assert ct.evictions == 1
    assert ct.lookup(17, CLIENT, 1, VIP, 53, 5.0) == (-1, 0)
    assert [ct.lookup(17, CLIENT, port, VIP, 53, 5.0)[0] for port in (2, 3, 4)] == others
    assert newest == first  # the evicted entry's id is reused


def test_full_table_evicts_unreplied_before_replied():
    ct = nat.Conntrack(max_entries=3)
    replied = udp_flow(ct, 1, 0.0)
    ct.update(replied, REPLY, 0, 0.5)
    udp_flow(ct, 2, 1.0)
    udp_flow(ct, 3, 2.0)

    udp_flow(ct, 4, 3.0)

    assert ct.lookup(17, CLIENT, 1, VIP, 53, 3.0) == (replied, ORIG)
    assert ct.lookup(17, CLIENT, 2, VIP, 53, 3.0) == (-1, 0)


def test_full_table_of_replied_rejects_new_flow():
    ct = nat.Conntrack(max_entries=4)
    entries = [udp_flow(ct, port, 0.0) for port in range(4)]
    for entry in entries:
        ct.update(entry, REPLY, 0, 1.0)

    rejected = udp_flow(ct, 99, 2.0)

    assert rejected == nat.REJECTED_FULL
    assert ct.overflows == 1
    assert ct.evictions == 0
    assert [ct.lookup(17, CLIENT, port, VIP, 53, 2.0)[0] for port in range(4)] == entries


def test_full_table_reclaims_expired_replied_entries():
    ct = nat.Conntrack(max_entries=2)
    for port in range(2):
        ct.update(udp_flow(ct, port, 0.0), REPLY, 0, 0.0)

    created = udp_flow(ct, 99, 400.0)

    assert created >= 0
    assert ct.overflows == 0
    assert ct.expired == 2


def test_overflow_logged_once_per_interval(caplog):
    ct = nat.Conntrack(max_entries=1)
    ct.update(udp_flow(ct, 1, 0.0), REPLY, 0, 0.0)
    with caplog.at_level("WARNING", logger="tapnet.nat"):
        for port in range(2, 12):
            udp_flow(ct, port, 1.0)
    assert len(caplog.records) == 1
    assert "conntrack table full" in caplog.records[0].getMessage()


def test_syn_flood_keeps_memory_and_established_flow():
    capacity = 1000
    ct = nat.Conntrack(max_entries=capacity)
    sizes = (ct.slots.shape, ct.table.shape, ct.nbytes)
    established = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN)
    ct.update(established, REPLY, SYNACK, 0.0)
    ct.update(established, ORIG, ACK, 0.0)

    rng = np.random.default_rng(7)
    sources = rng.integers(ip("10.255.0.0"), ip("10.255.255.255"), size=10 * capacity)
    ports = rng.integers(1024, 65536, size=10 * capacity)
    rejected = 0
    for k, (source, port) in enumerate(zip(sources.tolist(), ports.tolist())):
        now = 1.0 + k * 0.001
        entry = ct.create(6, (source, port, VIP, 80), (BACKEND, 8080, source, port), now=now, tcp_flags=SYN)
        rejected += entry < 0

    assert (ct.slots.shape, ct.table.shape, ct.nbytes) == sizes
    assert len(ct) == capacity
    assert rejected == ct.clashes
    assert ct.evictions == 10 * capacity - (capacity - 1) - ct.clashes
    assert ct.lookup(6, BACKEND, 8080, CLIENT, 40000, 20.0) == (established, REPLY)
    ct.check_invariants()


def test_clash_with_live_reply_tuple_rejected():
    ct = nat.Conntrack(max_entries=8)
    ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN)
    other_client = ip("10.0.1.3")
    clash = ct.create(6, (other_client, 1, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=1.0, tcp_flags=SYN)
    assert clash == nat.REJECTED_CLASH
    assert ct.clashes == 1


def test_clash_with_expired_entry_replaces_it():
    ct = nat.Conntrack(max_entries=8)
    old = udp_flow(ct, 1, 0.0)
    new = ct.create(17, (CLIENT, 1, VIP, 53), (BACKEND, 5353, CLIENT, 1), now=301.0)
    assert new >= 0
    assert ct.lookup(17, BACKEND, 5353, CLIENT, 1, 301.0) == (new, REPLY)
    assert ct.lookup(17, BACKEND, 53, CLIENT, 1, 0.0) == (-1, 0)
    assert old == new  # the freed entry is reused first


def test_create_rejects_untracked_protocol():
    ct = nat.Conntrack(max_entries=8)
    with pytest.raises(ValueError, match="proto"):
        ct.create(47, (CLIENT, 0, VIP, 0), (BACKEND, 0, CLIENT, 0), now=0.0)


def test_create_rejects_port_out_of_range():
    ct = nat.Conntrack(max_entries=8)
    with pytest.raises(ValueError, match="sport 70000"):
        ct.create(6, (CLIENT, 70000, VIP, 80), (BACKEND, 80, CLIENT, 1), now=0.0)


def test_lookup_untracked_protocol_finds_nothing():
    ct = nat.Conntrack(max_entries=8)
    assert ct.lookup(47, CLIENT, 0, VIP, 0, 0.0) == (-1, 0)


def test_update_removed_entry_rejected():
    ct = nat.Conntrack(max_entries=8)
    entry = udp_flow(ct, 1, 0.0)
    ct.remove(entry)
    with pytest.raises(ValueError, match="not in use"):
        ct.update(entry, REPLY, 0, 1.0)


def test_bytes_per_entry_under_300():
    ct = nat.Conntrack(max_entries=1 << 16)
    assert ct.nbytes / ct.capacity < 300


# ---------------------------------------------------------------------------
# Listing


def test_entries_shaped_like_conntrack_list():
    ct = nat.Conntrack(max_entries=8)
    tcp = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN, backend=2)
    ct.update(tcp, REPLY, SYNACK, 0.0)
    ct.update(tcp, ORIG, ACK, 0.0)
    udp_flow(ct, 5000, 0.0)

    lines = [entry["line"] for entry in ct.entries(now=100.0)]

    assert lines == [
        "tcp      6 800 ESTABLISHED src=10.0.1.2 dst=10.0.1.254 sport=40000 dport=80 "
        "src=10.0.1.5 dst=10.0.1.2 sport=8080 dport=40000 [ASSURED]",
        "udp      17 200 src=10.0.1.2 dst=10.0.1.254 sport=5000 dport=53 [UNREPLIED] "
        "src=10.0.1.5 dst=10.0.1.2 sport=53 dport=5000",
    ]


def test_entries_skip_expired():
    ct = nat.Conntrack(max_entries=8)
    udp_flow(ct, 5000, 0.0)
    assert list(ct.entries(now=300.0)) == []


# ---------------------------------------------------------------------------
# SNAT ports


def test_snat_ports_same_seed_same_ports():
    def ports(seed: int) -> list[int]:
        ct = nat.Conntrack(max_entries=64)
        rng = np.random.default_rng(seed)
        chosen = []
        for client_port in range(10):
            port = ct.pick_snat_port(6, BACKEND, 80, INGRESS_SBOX, rng, now=0.0)
            ct.create(6, (CLIENT, client_port, INGRESS_VIP, 3000), (BACKEND, 80, INGRESS_SBOX, port), now=0.0)
            chosen.append(port)
        return chosen

    assert ports(42) == ports(42)
    assert ports(42) != ports(43)
    assert all(nat.SNAT_PORT_MIN <= port <= nat.SNAT_PORT_MAX for port in ports(42))


def test_snat_port_skips_port_in_use():
    ct = nat.Conntrack(max_entries=8)
    drawn = int(np.random.default_rng(5).integers(nat.SNAT_PORT_MIN, nat.SNAT_PORT_MAX + 1))
    ct.create(6, (CLIENT, 1, INGRESS_VIP, 3000), (BACKEND, 80, INGRESS_SBOX, drawn), now=0.0)

    port = ct.pick_snat_port(6, BACKEND, 80, INGRESS_SBOX, np.random.default_rng(5), now=0.0)

    assert port == (drawn + 1 if drawn < nat.SNAT_PORT_MAX else nat.SNAT_PORT_MIN)


def test_snat_port_none_free_in_range():
    ct = nat.Conntrack(max_entries=8)
    for port in (40000, 40001):
        ct.create(17, (CLIENT, port, INGRESS_VIP, 53), (BACKEND, 53, INGRESS_SBOX, port), now=0.0)
    rng = np.random.default_rng(0)
    assert ct.pick_snat_port(17, BACKEND, 53, INGRESS_SBOX, rng, now=0.0, low=40000, high=40001) == -1


# ---------------------------------------------------------------------------
# Batch path: parser records in, frames rewritten in the batch buffer


def test_batch_lookup_update_rewrite():
    ct = nat.Conntrack(max_entries=64)
    entry = ct.create(6, (CLIENT, 40000, VIP, 80), (BACKEND, 8080, CLIENT, 40000), now=0.0, tcp_flags=SYN)
    packets = [
        eth() / IP(src="10.0.1.5", dst="10.0.1.2") / TCP(sport=8080, dport=40000, flags="SA"),
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=40000, dport=80, flags="A") / PAYLOAD,
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / TCP(sport=40001, dport=80, flags="S"),
        eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=40000, dport=80),
    ]
    batch = FrameBatch(capacity_frames=8, capacity_bytes=1 << 16)
    for packet in packets:
        batch.append(0, bytes(packet))
    records = parse_batch(batch)

    ids, directions = ct.lookup_records(records, now=1.0)
    states = ct.update_records(records, ids, directions, now=1.0)
    statuses = ct.rewrite_batch(batch, records, ids, directions)

    assert ids.tolist() == [entry, entry, -1, -1]
    assert directions.tolist()[:2] == [REPLY, ORIG]
    assert [nat.TCP_STATES[s] for s in states[:2]] == ["SYN_RECV", "ESTABLISHED"]
    assert statuses.tolist() == [nat.REWRITE_OK, nat.REWRITE_OK, -1, -1]
    reply = Ether(batch.frame(0))
    assert (reply[IP].src, reply[TCP].sport) == ("10.0.1.254", 80)
    forward = Ether(batch.frame(1))
    assert (forward[IP].dst, forward[TCP].dport) == ("10.0.1.5", 8080)
    assert forward[TCP].chksum == recomputed(batch.frame(1))[TCP].chksum
    assert batch.frame(2) == bytes(packets[2])


def test_batch_rewrite_partial_checksum_frame():
    ct = nat.Conntrack(max_entries=8)
    ct.create(17, (CLIENT, 5000, VIP, 53), (BACKEND, 5353, CLIENT, 5000), now=0.0)
    packet = eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=5000, dport=53) / PAYLOAD
    frame = with_partial_checksum(bytes(packet), 34, 6, CLIENT, VIP, 17)
    batch = FrameBatch(capacity_frames=2, capacity_bytes=4096)
    batch.append(0, frame, vnet_header(34, 6))
    records = parse_batch(batch)

    ids, directions = ct.lookup_records(records, now=1.0)
    ct.rewrite_batch(batch, records, ids, directions)

    completed = complete_checksum(batch.frame(0), 34, 6)
    assert Ether(completed)[UDP].chksum == recomputed(completed)[UDP].chksum


def test_batch_rewrite_skips_entry_reused_after_lookup():
    ct = nat.Conntrack(max_entries=1)
    ct.create(17, (CLIENT, 5000, VIP, 53), (BACKEND, 5353, CLIENT, 5000), now=0.0)
    packet = bytes(eth() / IP(src="10.0.1.2", dst="10.0.1.254") / UDP(sport=5000, dport=53))
    batch = FrameBatch(capacity_frames=2, capacity_bytes=4096)
    batch.append(0, packet)
    records = parse_batch(batch)
    ids, directions = ct.lookup_records(records, now=1.0)

    # A new flow evicts the unreplied entry and takes over its id.
    reused = ct.create(17, (CLIENT, 6000, VIP, 53), (BACKEND, 5353, CLIENT, 6000), now=1.0)
    statuses = ct.rewrite_batch(batch, records, ids, directions)
    states = ct.update_records(records, ids, directions, now=1.0)

    assert reused == ids[0]
    assert statuses[0] == nat.REWRITE_STALE
    assert states[0] == -1
    assert batch.frame(0) == packet


def test_create_many_same_as_repeated_create():
    ports = np.arange(1, 9)
    orig = (np.full(8, CLIENT), ports, np.full(8, VIP), np.full(8, 53))
    reply = (np.full(8, BACKEND), np.full(8, 53), np.full(8, CLIENT), ports)
    many = nat.Conntrack(max_entries=6)
    one_by_one = nat.Conntrack(max_entries=6)

    ids = many.create_many(np.full(8, 17), orig, reply, now=0.0)
    singles = [udp_flow(one_by_one, int(port), 0.0) for port in ports]

    assert ids.tolist() == singles
    assert many.evictions == one_by_one.evictions == 2
    assert [e["line"] for e in many.entries(1.0)] == [e["line"] for e in one_by_one.entries(1.0)]


def test_create_many_rejects_port_out_of_range():
    ct = nat.Conntrack(max_entries=8)
    orig = ([CLIENT], [70000], [VIP], [53])
    reply = ([BACKEND], [53], [CLIENT], [1])
    with pytest.raises(ValueError, match="orig sport"):
        ct.create_many([17], orig, reply, now=0.0)


def test_lookup_many_matches_single_lookups():
    ct = nat.Conntrack(max_entries=256)
    rng = np.random.default_rng(3)
    created = {}
    for port in rng.choice(60000, size=200, replace=False).tolist():
        entry = ct.create(17, (CLIENT, port, VIP, 53), (BACKEND, 53, CLIENT, port), now=0.0)
        created[port] = entry
    queries = list(created) + [60001, 60002]

    ids, directions = ct.lookup_many(
        np.full(len(queries), 17), np.full(len(queries), BACKEND), np.full(len(queries), 53),
        np.full(len(queries), CLIENT), np.array(queries), now=1.0,
    )

    assert ids.tolist() == [created.get(port, -1) for port in queries]
    assert directions.tolist() == [REPLY] * len(created) + [0, 0]


# ---------------------------------------------------------------------------
# Properties


flows = st.lists(
    st.tuples(
        st.sampled_from([1, 6, 17]),
        st.integers(0, 3),  # client address index: few values, so tuples collide
        st.integers(0, 3),  # client port
        st.integers(0, 1),  # service index
        st.integers(0, 0xFF),  # TCP flags of the first packet
        st.floats(0.0, 400.0, allow_nan=False),  # seconds since the previous flow
        st.booleans(),  # remove the flow right after checking it
    ),
    max_size=40,
)


def first_state(flags: int) -> str:
    """The TCP state after a first packet with these flags, read from the transition table."""
    if flags & RST:
        event = "RST"
    elif flags & SYN:
        event = "SYNACK" if flags & ACK else "SYN"
    elif flags & FIN:
        event = "FIN"
    elif flags & ACK:
        event = "ACK"
    else:
        return "NONE"
    return nat.TCP_TRANSITIONS.get(("NONE", "original", event), "NONE")


def lifetime(proto: int, flags: int) -> float:
    if proto == 6:
        return nat.TCP_STATE_TIMEOUTS[first_state(flags)]
    return nat.TIMEOUTS["udp" if proto == 17 else "icmp"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flows)
def test_created_flows_found_both_ways_until_expiry(flow_list):
    ct = nat.Conntrack(max_entries=64)
    live = {}  # entry id -> (proto, orig, reply, expires)
    now = 0.0
    for proto, client, port, service, flags, delay, remove in flow_list:
        now += delay
        client_ip = ip("10.0.1.10") + client
        service_port = 7 if proto == 1 else 80 + service
        client_port = 7 if proto == 1 else 1000 + port
        backend_port = 7 if proto == 1 else 8080 + service
        orig = (client_ip, client_port, VIP + service, service_port)
        reply = (BACKEND, backend_port, client_ip, client_port)

        entry = ct.create(proto, orig, reply, now, tcp_flags=flags)

        if entry >= 0:
            live[entry] = (proto, orig, reply, now + lifetime(proto, flags))
        for known, (p, o, r, expires) in list(live.items()):
            expected_orig = (known, ORIG) if now < expires else (-1, 0)
            expected_reply = (known, REPLY) if now < expires else (-1, 0)
            assert ct.lookup(p, *o, now) == expected_orig
            assert ct.lookup(p, *r, now) == expected_reply
            if now >= expires:
                del live[known]
        if entry >= 0 and remove:
            ct.remove(entry)
            del live[entry]
        ct.check_invariants()


operations = st.lists(
    st.tuples(
        st.sampled_from(["create", "reply", "remove", "expire", "lookup"]),
        st.integers(0, 15),  # tuple index, from a small space so probe runs and clashes are common
        st.integers(0, 0xFF),  # TCP flags
        st.floats(0.0, 200.0, allow_nan=False),  # seconds since the previous operation
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 6), st.integers(0, 2**32), operations)
def test_random_operations_keep_index_consistent(capacity, seed, ops):
    ct = nat.Conntrack(max_entries=capacity, hash_seed=seed)
    now = 0.0
    for op, index, flags, delay in ops:
        now += delay
        proto = (1, 6, 17)[index % 3]
        orig = (CLIENT + index, 1000 + index, VIP, 80)
        reply = (BACKEND, 8080, CLIENT + index, 1000 + index)
        entry, direction = ct.lookup(proto, *orig, now)
        if op == "create":
            ct.create(proto, orig, reply, now, tcp_flags=flags)
        elif op == "reply" and entry >= 0:
            ct.update(entry, REPLY, flags, now)
        elif op == "remove" and entry >= 0:
            ct.remove(entry)
        elif op == "expire":
            ct.expire(now, max_scan=index % 4)
        assert len(ct) <= capacity
        ct.check_invariants()
