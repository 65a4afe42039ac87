"""Checksum completion and TCP segmentation of virtio-net offload frames, checked with scapy."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, conf

from tapnet import offload, parse, reasons
from tapnet.batch import FrameBatch

MAC_A = "02:42:ac:15:00:02"
MAC_B = "02:42:ac:15:00:03"
IP_A = "172.21.0.2"
IP_B = "172.21.0.3"
IP6_A = "fe80::42:acff:fe15:2"
IP6_B = "fe80::42:acff:fe15:3"
MSS = 1448
# 59,908 bytes. The 256-byte pattern does not line up with the MSS, so segments
# cut at the wrong place or put in the wrong order do not concatenate to it.
PAYLOAD = bytes(range(256)) * 234 + b"tail"


@contextlib.contextmanager
def scapy_offline():
    """Make scapy raise instead of sending an ARP request when a frame lacks a destination MAC."""
    saved = conf.raise_no_dst_mac, conf.neighbor.resolvers
    conf.raise_no_dst_mac, conf.neighbor.resolvers = True, {}
    try:
        yield
    finally:
        conf.raise_no_dst_mac, conf.neighbor.resolvers = saved


@pytest.fixture(autouse=True)
def offline():
    with scapy_offline():
        yield


def vnet_header(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def make_partial(pkt, gso_type: int, gso_size: int = MSS) -> tuple[bytes, bytes]:
    """Turn a scapy packet into the frame and virtio-net header a sandbox kernel would hand over.

    Like Linux's tcp_v4_send_check and udp4_hwcsum, the L4 checksum field gets
    the folded pseudo-header sum (not complemented) over the whole L4 length.
    """
    frame = bytearray(bytes(pkt))
    pkt = Ether(bytes(frame))
    if IP in pkt:
        ip = pkt[IP]
        l3 = len(frame) - len(bytes(ip))
        l4 = l3 + ip.ihl * 4
        l4_len = ip.len - ip.ihl * 4
        addresses = bytes(frame[l3 + 12 : l3 + 20])
    else:
        ip6 = pkt[IPv6]
        l3 = len(frame) - len(bytes(ip6))
        l4 = l3 + 40
        l4_len = ip6.plen
        addresses = bytes(frame[l3 + 8 : l3 + 40])
    if TCP in pkt:
        proto, csum_offset, hdr_len = 6, 16, l4 + pkt[TCP].dataofs * 4
    else:
        proto, csum_offset, hdr_len = 17, 6, l4 + 8
    pseudo = ones_sum(addresses + struct.pack("!HH", proto, l4_len))
    frame[l4 + csum_offset : l4 + csum_offset + 2] = struct.pack("!H", pseudo)
    vnet = vnet_header(flags=1, gso_type=gso_type, hdr_len=hdr_len, gso_size=gso_size if gso_type else 0,
                       csum_start=l4, csum_offset=csum_offset)
    return bytes(frame), vnet


def tcp4_superframe(flags="PA", **ip_fields):
    return (
        Ether(dst=MAC_B, src=MAC_A)
        / IP(src=IP_A, dst=IP_B, id=65530, flags="DF", **ip_fields)
        / TCP(sport=5432, dport=40000, seq=4294967000, ack=77, flags=flags, window=500,
              options=[("NOP", None), ("NOP", None), ("Timestamp", (100, 200))])
        / PAYLOAD
    )


def tcp6_superframe(flags="PA"):
    return (
        Ether(dst=MAC_B, src=MAC_A)
        / IPv6(src=IP6_A, dst=IP6_B)
        / TCP(sport=5432, dport=40000, seq=1000, ack=77, flags=flags, window=500)
        / PAYLOAD
    )


def checksums_valid(segment: bytes) -> tuple[bool, bool]:
    """Compare the checksums in `segment` with the ones scapy computes after deleting them."""
    pkt = Ether(segment)
    ip_ok = True
    if IP in pkt:
        ip_check = pkt[IP].chksum
        del pkt[IP].chksum
    tcp_check = pkt[TCP].chksum
    del pkt[TCP].chksum
    rebuilt = Ether(bytes(pkt))
    if IP in rebuilt:
        ip_ok = rebuilt[IP].chksum == ip_check
    return ip_ok, rebuilt[TCP].chksum == tcp_check


SUPERFRAMES = {
    "ipv4": (lambda flags="PA": tcp4_superframe(flags), offload.VIRTIO_NET_HDR_GSO_TCPV4),
    "ipv4_options": (lambda flags="PA": tcp4_superframe(flags, options=b"\x94\x04\x00\x00"), offload.VIRTIO_NET_HDR_GSO_TCPV4),
    "ipv4_vlan": (
        lambda flags="PA": Ether(dst=MAC_B, src=MAC_A) / Dot1Q(vlan=30) / tcp4_superframe(flags)[IP],
        offload.VIRTIO_NET_HDR_GSO_TCPV4,
    ),
    "ipv6": (tcp6_superframe, offload.VIRTIO_NET_HDR_GSO_TCPV6),
}


@pytest.mark.parametrize("name", sorted(SUPERFRAMES))
def test_segments_have_valid_checksums(name):
    build, gso_type = SUPERFRAMES[name]
    frame, vnet = make_partial(build(), gso_type)
    segments = offload.segment(frame, vnet)
    assert len(segments) == -(-len(PAYLOAD) // MSS)
    for k, segment in enumerate(segments):
        ip_ok, tcp_ok = checksums_valid(segment)
        assert ip_ok, f"{name}: segment {k} has a wrong IPv4 header checksum"
        assert tcp_ok, f"{name}: segment {k} has a wrong TCP checksum"


@pytest.mark.parametrize("name", sorted(SUPERFRAMES))
def test_segment_payloads_concatenate(name):
    build, gso_type = SUPERFRAMES[name]
    frame, vnet = make_partial(build(), gso_type)
    segments = [Ether(s) for s in offload.segment(frame, vnet)]
    assert b"".join(bytes(s[TCP].payload) for s in segments) == PAYLOAD
    assert all(len(s[TCP].payload) == MSS for s in segments[:-1])


@pytest.mark.parametrize("name", sorted(SUPERFRAMES))
def test_segment_headers_advance(name):
    build, gso_type = SUPERFRAMES[name]
    original = Ether(bytes(build()))
    frame, vnet = make_partial(original, gso_type)
    segments = [Ether(s) for s in offload.segment(frame, vnet)]
    for k, s in enumerate(segments):
        assert s[TCP].seq == (original[TCP].seq + k * MSS) % 2**32, f"segment {k} seq"
        assert s[TCP].options == original[TCP].options
        assert s[TCP].ack == original[TCP].ack
        if IP in original:
            assert s[IP].id == (original[IP].id + k) % 2**16, f"segment {k} IPv4 id"
            assert s[IP].len == len(bytes(s[IP])), f"segment {k} IPv4 total length"
            assert s[IP].options == original[IP].options
        else:
            assert s[IPv6].plen == len(bytes(s[IPv6].payload)), f"segment {k} IPv6 payload length"


def test_segment_flags_fin_psh_last_cwr_first():
    build, gso_type = SUPERFRAMES["ipv4"]
    frame, vnet = make_partial(build(flags="FPAC"), gso_type)
    segments = [Ether(s) for s in offload.segment(frame, vnet)]
    flags = [str(s[TCP].flags) for s in segments]
    assert flags[0] == "AC"
    assert set(flags[1:-1]) == {"A"}
    assert flags[-1] == "FPA"


def test_segment_mss_override():
    build, gso_type = SUPERFRAMES["ipv4"]
    frame, vnet = make_partial(build(), gso_type)
    segments = [Ether(s) for s in offload.segment(frame, vnet, mss=1000)]
    assert len(segments) == -(-len(PAYLOAD) // 1000)
    assert len(segments[0][TCP].payload) == 1000
    assert b"".join(bytes(s[TCP].payload) for s in segments) == PAYLOAD


def test_segment_small_gso_frame_gives_one_segment():
    pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / TCP(sport=1, dport=2, flags="PA") / b"short"
    frame, vnet = make_partial(pkt, offload.VIRTIO_NET_HDR_GSO_TCPV4)
    assert offload.segment(frame, vnet) == [bytes(pkt)]


def test_segments_parse_as_plain_frames():
    build, gso_type = SUPERFRAMES["ipv4"]
    frame, vnet = make_partial(build(), gso_type)
    batch = FrameBatch(capacity_frames=64, capacity_bytes=1 << 17)
    for s in offload.segment(frame, vnet):
        batch.append(0, s)
    records = parse.parse_batch(batch)
    assert (records["status"] == reasons.OK).all()
    assert (records["payload_len"] <= MSS).all()


def test_superframe_parses_as_gso():
    build, gso_type = SUPERFRAMES["ipv4"]
    frame, vnet = make_partial(build(), gso_type)
    batch = FrameBatch(capacity_frames=1, capacity_bytes=1 << 17)
    batch.append(0, frame, vnet)
    record = parse.parse_batch(batch)[0]
    assert record["status"] == reasons.OK
    assert record["flags"] & parse.IS_GSO
    assert record["payload_len"] == len(PAYLOAD)


# --- checksum completion -------------------------------------------------------


def test_non_gso_partial_tcp_returns_completed_frame():
    pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1460)])
    frame, vnet = make_partial(pkt, offload.VIRTIO_NET_HDR_GSO_NONE)
    assert frame != bytes(pkt)
    assert offload.segment(frame, vnet) == [bytes(pkt)]


def test_complete_checksum_udp():
    pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=5353, dport=53) / b"query bytes"
    frame, vnet = make_partial(pkt, offload.VIRTIO_NET_HDR_GSO_NONE)
    assert frame != bytes(pkt)
    assert offload.complete_checksum(frame, vnet) == bytes(pkt)


def test_complete_checksum_udp_ipv6():
    pkt = Ether(dst=MAC_B, src=MAC_A) / IPv6(src=IP6_A, dst=IP6_B) / UDP(sport=5353, dport=53) / b"odd length!"
    frame, vnet = make_partial(pkt, offload.VIRTIO_NET_HDR_GSO_NONE)
    assert offload.complete_checksum(frame, vnet) == bytes(pkt)


def test_complete_checksum_udp_zero_becomes_ffff():
    # Choose the last two payload bytes so that the UDP checksum computes to 0.
    base = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / b"ab\x00\x00"
    check = Ether(bytes(base))[UDP].chksum
    pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / (b"ab" + struct.pack("!H", check))
    frame, vnet = make_partial(pkt, offload.VIRTIO_NET_HDR_GSO_NONE)
    completed = offload.complete_checksum(frame, vnet)
    assert Ether(completed)[UDP].chksum == 0xFFFF
    assert completed == bytes(pkt)


def test_complete_checksum_tcp_superframe():
    build, gso_type = SUPERFRAMES["ipv4"]
    original = Ether(bytes(build()))
    frame, vnet = make_partial(original, gso_type)
    assert offload.complete_checksum(frame, vnet) == bytes(original)


def test_complete_checksum_without_needs_csum_is_unchanged():
    pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / b"x"
    assert offload.complete_checksum(bytes(pkt), vnet_header()) == bytes(pkt)
    assert offload.complete_checksum(bytes(pkt), None) == bytes(pkt)
    assert offload.segment(bytes(pkt), None) == [bytes(pkt)]


# --- bad headers ----------------------------------------------------------------

def bad_cases():
    with scapy_offline():
        frame4, _ = make_partial(tcp4_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV4)
        frame6, _ = make_partial(tcp6_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV6)
        udp = bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / (b"u" * 3000))
    return [
        ("csum_field_beyond_frame", frame4, vnet_header(flags=1, gso_type=1, gso_size=MSS, csum_start=34, csum_offset=len(frame4)), "beyond"),
        ("udp_gso_unsupported", udp, vnet_header(flags=1, gso_type=5, gso_size=1000, csum_start=34, csum_offset=6), "gso_type"),
        ("ufo_unsupported", udp, vnet_header(gso_type=3, gso_size=1000), "gso_type"),
        ("unknown_gso_type", frame4, vnet_header(gso_type=9, gso_size=MSS), "gso_type"),
        ("gso_size_zero", frame4, vnet_header(flags=1, gso_type=1, csum_start=34, csum_offset=16), "gso_size"),
        ("tcpv4_on_ipv6_frame", frame6, vnet_header(gso_type=1, gso_size=MSS), "headers"),
        ("tcpv6_on_ipv4_frame", frame4, vnet_header(gso_type=4, gso_size=MSS), "headers"),
        ("tcpv4_on_udp_frame", udp, vnet_header(gso_type=1, gso_size=MSS), "headers"),
        ("truncated_superframe", frame4[:3000], vnet_header(gso_type=1, gso_size=MSS), "IP length"),
        ("short_vnet_header", frame4, b"\x01\x01\x00", "10"),
    ]


BAD_CASES = bad_cases()


@pytest.mark.parametrize("name,frame,vnet,message", BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_segment_rejects_bad_vnet_header(name, frame, vnet, message):
    with pytest.raises(ValueError, match=message) as error:
        offload.segment(frame, vnet)
    assert "malformed-vnet-hdr" in str(error.value)


def test_complete_checksum_rejects_field_beyond_frame():
    frame = bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2))
    with pytest.raises(ValueError, match="beyond the 42-byte frame"):
        offload.complete_checksum(frame, vnet_header(flags=1, csum_start=34, csum_offset=7))


def test_segment_rejects_non_positive_mss():
    frame, vnet = make_partial(tcp4_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV4)
    with pytest.raises(ValueError, match="invalid MSS 0"):
        offload.segment(frame, vnet, mss=0)


# --- batch entry ----------------------------------------------------------------


def mixed_batch() -> tuple[FrameBatch, list[tuple[bytes, bytes]]]:
    frame4, vnet4 = make_partial(tcp4_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV4)
    frame6, vnet6 = make_partial(tcp6_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV6)
    udp_pkt = Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / b"dns"
    udp, udp_vnet = make_partial(udp_pkt, offload.VIRTIO_NET_HDR_GSO_NONE)
    bad_vnet = vnet_header(gso_type=1, gso_size=0)
    items = [(frame4, vnet4), (udp, udp_vnet), (frame4, bad_vnet), (frame6, vnet6)]
    batch = FrameBatch(capacity_frames=8, capacity_bytes=1 << 18)
    for port, (frame, vnet) in enumerate(items):
        batch.append(port + 10, frame, vnet, timestamp=float(port))
    return batch, items


def test_segment_batch_matches_single_frames():
    batch, items = mixed_batch()
    out = FrameBatch(capacity_frames=256, capacity_bytes=1 << 18)
    next_frame, status = offload.segment_batch(batch, out)
    assert next_frame == batch.count
    assert list(status) == [offload.SEGMENT_OK, offload.SEGMENT_OK, offload.SEGMENT_GSO_SIZE_ZERO, offload.SEGMENT_OK]

    expected = []
    for port, (frame, vnet) in enumerate(items):
        if port == 2:
            continue
        expected += [(port + 10, s) for s in offload.segment(frame, vnet)]
    assert out.count == len(expected)
    for j, (port, segment) in enumerate(expected):
        assert out.frame(j) == segment, f"output frame {j} differs"
        assert out.ports[j] == port
        assert out.timestamps[j] == port - 10
        assert out.vnet_hdr(j) is None


def test_segment_batch_continues_when_output_full():
    batch, _ = mixed_batch()
    whole = FrameBatch(capacity_frames=256, capacity_bytes=1 << 18)
    offload.segment_batch(batch, whole)

    # Room for one superframe's segments at a time.
    small = FrameBatch(capacity_frames=50, capacity_bytes=80_000)
    pieces: list[bytes] = []
    first = 0
    rounds = 0
    while first < batch.count:
        small.clear()
        first, _ = offload.segment_batch(batch, small, first=first)
        pieces += [small.frame(j) for j in range(small.count)]
        rounds += 1
    assert rounds > 1
    assert pieces == [whole.frame(j) for j in range(whole.count)]


def test_segment_frames_reports_no_room_for_huge_frame():
    batch, _ = mixed_batch()
    tiny = FrameBatch(capacity_frames=4, capacity_bytes=2000)
    next_frame, status = offload.segment_batch(batch, tiny)
    assert status[0] == offload.SEGMENT_NO_ROOM
    assert status[1] == offload.SEGMENT_OK
    assert status[2] == offload.SEGMENT_GSO_SIZE_ZERO
    # The UDP frame fitted, so the IPv6 superframe waits for an emptied output.
    assert next_frame == 3
    assert tiny.count == 1


def test_segment_ipv4_checksum_independent_sum():
    # Cross-check the segment's IPv4 header checksum with an independent ones' complement sum.
    frame, vnet = make_partial(tcp4_superframe(), offload.VIRTIO_NET_HDR_GSO_TCPV4)
    first = offload.segment(frame, vnet)[0]
    assert ones_sum(first[14:34]) == 0xFFFF
    source = ipaddress.IPv4Address(first[26:30])
    assert str(source) == IP_A
