"""The numba batch parser against scapy's view of the same frames."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, Padding, Raw, conf
from scapy.layers.inet6 import ICMPv6DestUnreach
from scapy.layers.vxlan import VXLAN

from tapnet import parse, reasons
from tapnet.batch import FrameBatch

# Addresses of the demo stack's `front` network and link-local IPv6. None of them is the machine's.
MAC_A = "02:42:ac:14:00:02"
MAC_B = "02:42:ac:14:00:03"
IP_A = "172.20.0.2"
IP_B = "172.20.0.3"
IP6_A = "fe80::42:acff:fe14:2"
IP6_B = "fe80::42:acff:fe14:3"


@contextlib.contextmanager
def scapy_offline():
    """Make scapy raise instead of sending an ARP request when a frame lacks a destination MAC.

    Without this, building `Ether() / IP(dst=...)` makes scapy resolve the MAC
    of the route's gateway, which can put an ARP request on the machine's own
    network.
    """
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


def eth(**fields):
    return Ether(**{"dst": MAC_B, "src": MAC_A, **fields})


def vnet_header(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def parse_frames(frames, vnets=None) -> np.ndarray:
    """Parse `frames` (bytes) in one batch and return a copy of the records."""
    total = sum(len(f) for f in frames)
    batch = FrameBatch(capacity_frames=max(1, len(frames)), capacity_bytes=max(1, total))
    for i, frame in enumerate(frames):
        batch.append(0, frame, None if vnets is None else vnets[i])
    return parse.parse_batch(batch).copy()


def parse_one(frame: bytes, vnet: bytes | None = None):
    return parse_frames([frame], None if vnet is None else [vnet])[0]


# Valid frames of every kind the parser handles, built with scapy. Padded
# frames get their Ethernet padding appended to the built bytes, because
# scapy would count a Padding layer in the IP and UDP lengths.
VALID_FRAMES = {
    "arp_request": eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC_A, psrc=IP_A, hwdst="00:00:00:00:00:00", pdst=IP_B),
    "arp_reply_vlan": eth() / Dot1Q(vlan=42, prio=5) / ARP(op=2, hwsrc=MAC_B, psrc=IP_B, hwdst=MAC_A, pdst=IP_A),
    "qinq_ipv4_udp": eth() / Dot1AD(vlan=100) / Dot1Q(vlan=7) / IP(src=IP_A, dst=IP_B) / UDP(sport=1000, dport=53) / b"q",
    "ipv4_options_tcp": eth()
    / IP(src=IP_A, dst=IP_B, ttl=17, id=4321, options=b"\x94\x04\x00\x00")
    / TCP(sport=40000, dport=80, seq=123456789, ack=987654321, flags="PA", window=5000)
    / b"GET / HTTP/1.0\r\n\r\n",
    "tcp_with_options": eth()
    / IP(src=IP_A, dst=IP_B)
    / TCP(sport=5432, dport=50000, flags="S", options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)]),
    "icmp_echo": eth() / IP(src=IP_A, dst=IP_B) / ICMP(type=8, id=0x1234, seq=7) / (b"p" * 56),
    "icmp_echo_reply_padded": bytes(eth() / IP(src=IP_B, dst=IP_A) / ICMP(type=0, id=1, seq=2)) + b"\x00" * 18,
    "icmp_unreachable": eth() / IP(src=IP_B, dst=IP_A) / ICMP(type=3, code=3) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2),
    "udp": eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=33333, dport=8080) / (b"u" * 300),
    "udp_padded": bytes(eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / b"x") + b"\x00" * 17,
    "tcp_padded": bytes(eth() / IP(src=IP_A, dst=IP_B) / TCP(sport=1, dport=2, flags="A")) + b"\x00" * 6,
    "first_fragment": eth() / IP(src=IP_A, dst=IP_B, id=99, flags="MF", frag=0) / UDP(sport=7, dport=9, len=2008) / (b"f" * 96),
    "later_fragment": eth() / IP(src=IP_A, dst=IP_B, id=99, flags=0, frag=13, proto=17) / (b"f" * 64),
    "ipv6_tcp": eth() / IPv6(src=IP6_A, dst=IP6_B, hlim=33) / TCP(sport=1234, dport=443, flags="SA", seq=5, ack=6) / b"hello",
    "ipv6_udp": eth() / IPv6(src=IP6_A, dst=IP6_B) / UDP(sport=546, dport=547) / (b"d" * 20),
    "ipv6_icmpv6_echo": eth() / IPv6(src=IP6_A, dst=IP6_B) / ICMPv6EchoRequest(id=77, seq=88, data=b"ping"),
    "ipv6_icmpv6_unreachable": eth() / IPv6(src=IP6_B, dst=IP6_A) / ICMPv6DestUnreach(code=4) / IPv6(src=IP6_A, dst=IP6_B) / UDP(),
    "ipv6_fragment": eth() / IPv6(src=IP6_A, dst=IP6_B) / IPv6ExtHdrFragment(id=5, offset=0, m=1) / UDP(sport=1, dport=2) / (b"z" * 32),
    "vxlan": eth()
    / IP(src="198.51.100.1", dst="198.51.100.2")
    / UDP(sport=49152, dport=4789)
    / VXLAN(vni=4097, flags=0x08)
    / Ether(dst=MAC_B, src=MAC_A)
    / IP(src="10.0.1.2", dst="10.0.1.3")
    / TCP(sport=1, dport=2, flags="S"),
    "other_ethertype": eth(type=0x88CC) / (b"\x02\x07\x04" + b"l" * 40),
}
with scapy_offline():
    VALID_FRAMES = {name: bytes(frame) for name, frame in VALID_FRAMES.items()}


def mac_value(text: str) -> int:
    return int(text.replace(":", ""), 16)


def ip_value(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def offset_of(frame: bytes, layer) -> int:
    """Offset of a dissected scapy layer within `frame` (trailing padding included in the layer)."""
    return len(frame) - len(bytes(layer))


def padding_len(pkt) -> int:
    return sum(len(layer.load) for layer in pkt.iterpayloads() if isinstance(layer, Padding))


def expected_fields(frame: bytes) -> dict[str, int]:
    """Derive the record fields from scapy's dissection of `frame`."""
    pkt = Ether(frame)
    want: dict[str, int] = {"status": reasons.OK, "frame_len": len(frame)}
    flags = 0
    want["dst_mac"] = mac_value(pkt.dst)
    want["src_mac"] = mac_value(pkt.src)

    tags = [layer for layer in pkt.iterpayloads() if isinstance(layer, (Dot1Q, Dot1AD))]
    if tags:
        flags |= parse.HAS_VLAN
        want["vlan"] = tags[0].vlan
        want["vlan_inner"] = tags[1].vlan if len(tags) > 1 else -1
        want["ethertype"] = tags[-1].type
        want["l3_off"] = offset_of(frame, tags[-1].payload)
    else:
        want["vlan"] = -1
        want["ethertype"] = pkt.type
        want["l3_off"] = 14

    # `pkt[IP]` and `ARP in pkt` find the outermost layer of a kind, the one the
    # record describes, so headers inside VXLAN or an ICMP error do not count.
    if ARP in pkt:
        arp = pkt[ARP]
        flags |= parse.IS_ARP
        want.update(
            arp_op=arp.op,
            arp_sha=mac_value(arp.hwsrc),
            arp_spa=ip_value(arp.psrc),
            arp_tha=mac_value(arp.hwdst),
            arp_tpa=ip_value(arp.pdst),
        )
    l4 = None
    if pkt.payload is not None and isinstance(tags[-1].payload if tags else pkt.payload, IP):
        ip = pkt[IP]
        flags |= parse.IS_IPV4
        if ip.ihl > 5:
            flags |= parse.HAS_IP_OPTIONS
        want.update(
            ip_src=ip_value(ip.src),
            ip_dst=ip_value(ip.dst),
            ip_proto=ip.proto,
            ip_ihl=ip.ihl * 4,
            ip_ttl=ip.ttl,
            ip_tot_len=ip.len,
            ip_id=ip.id,
            ip_frag=(int(ip.flags) << 13) | ip.frag,
        )
        if ip.frag or ip.flags.MF:
            flags |= parse.IS_FRAGMENT
        if ip.frag == 0:
            l4 = ip.payload
    elif isinstance(tags[-1].payload if tags else pkt.payload, IPv6):
        ip6 = pkt[IPv6]
        flags |= parse.IS_IPV6
        want.update(ip6_next=ip6.nh, ip6_plen=ip6.plen, ip6_hlim=ip6.hlim)
        if ip6.nh == 44:
            flags |= parse.IS_FRAGMENT
        elif ip6.nh in (6, 17, 58):
            l4 = ip6.payload

    if l4 is not None and not isinstance(l4, (Raw, Padding)):
        want["l4_off"] = offset_of(frame, l4)
        data_len = len(bytes(l4.payload)) - padding_len(l4)
        if isinstance(l4, TCP):
            flags |= parse.IS_TCP
            want.update(
                sport=l4.sport,
                dport=l4.dport,
                tcp_seq=l4.seq,
                tcp_ack=l4.ack,
                tcp_flags=int(l4.flags) & 0xFF,
                tcp_doff=l4.dataofs * 4,
                tcp_window=l4.window,
                payload_off=want["l4_off"] + l4.dataofs * 4,
                payload_len=data_len,
            )
        elif isinstance(l4, UDP):
            flags |= parse.IS_UDP
            want.update(sport=l4.sport, dport=l4.dport, payload_off=want["l4_off"] + 8)
            if pkt[IP].flags.MF if IP in pkt else False:
                want["payload_len"] = data_len
            else:
                want["payload_len"] = l4.len - 8
            if VXLAN in pkt:
                vxlan = pkt[VXLAN]
                flags |= parse.IS_VXLAN
                want.update(vxlan_flags=int(vxlan.flags), vni=vxlan.vni, inner_off=offset_of(frame, vxlan.payload))
        else:
            flags |= parse.IS_ICMP
            want.update(icmp_type=l4.type, icmp_code=l4.code, payload_off=want["l4_off"] + 8)
            # scapy splits the 8-byte ICMP header differently per type; count from its end.
            want["payload_len"] = len(frame) - padding_len(pkt) - want["payload_off"]
            if l4.type in (0, 8, 128, 129):
                want.update(icmp_id=l4.id, icmp_seq=l4.seq)
    else:
        want.update(l4_off=-1, payload_off=-1)
    want["flags"] = flags
    return want


@pytest.mark.parametrize("name", sorted(VALID_FRAMES))
def test_parse_matches_scapy(name):
    frame = bytes(VALID_FRAMES[name])
    record = parse_one(frame)
    for field, value in expected_fields(frame).items():
        got = int(record[field])
        assert got == value, f"{name}: {field} is {got}, scapy says {value} (flags {parse.flag_names(int(record['flags']))})"


def test_first_fragment_parses_udp_header():
    record = parse_one(bytes(VALID_FRAMES["first_fragment"]))
    assert record["flags"] & parse.IS_FRAGMENT
    assert record["flags"] & parse.IS_UDP
    assert record["dport"] == 9


def test_later_fragment_has_no_l4():
    record = parse_one(bytes(VALID_FRAMES["later_fragment"]))
    assert record["flags"] & parse.IS_FRAGMENT
    assert not record["flags"] & parse.IS_UDP
    assert record["l4_off"] == -1
    assert record["sport"] == 0


def test_ipv6_fragment_header_sets_fragment_flag():
    record = parse_one(bytes(VALID_FRAMES["ipv6_fragment"]))
    assert record["flags"] & parse.IS_FRAGMENT
    assert record["ip6_next"] == 44
    assert record["l4_off"] == -1


def test_ipv6_addresses_at_documented_offsets():
    frame = bytes(VALID_FRAMES["ipv6_tcp"])
    record = parse_one(frame)
    l3 = int(record["l3_off"])
    assert frame[l3 + 8 : l3 + 24] == ipaddress.IPv6Address(IP6_A).packed
    assert frame[l3 + 24 : l3 + 40] == ipaddress.IPv6Address(IP6_B).packed


def test_vxlan_inner_frame_parses_in_place():
    frame = bytes(VALID_FRAMES["vxlan"])
    batch = FrameBatch(capacity_frames=2, capacity_bytes=4096)
    batch.append(0, bytes(VALID_FRAMES["udp"]))
    batch.append(0, frame)
    outer = parse.parse_batch(batch)
    inner = parse.parse_inner(batch, outer)

    assert inner[0]["frame_len"] == 0
    inner_frame = frame[int(outer[1]["inner_off"]) :]
    want = parse_one(inner_frame)
    assert inner[1].item() == want.item()
    assert inner[1]["flags"] & parse.IS_TCP
    assert inner[1]["ip_src"] == ip_value("10.0.1.2")


def test_vxlan_inner_frame_ends_with_outer_udp():
    # Outer Ethernet padding must not become part of the inner frame.
    frame = bytes(VALID_FRAMES["vxlan"]) + b"\x00" * 8
    batch = FrameBatch(capacity_frames=1, capacity_bytes=4096)
    batch.append(0, frame)
    outer = parse.parse_batch(batch)
    inner = parse.parse_inner(batch, outer)
    assert inner[0]["frame_len"] == len(frame) - 8 - int(outer[0]["inner_off"])


# --- truncation -------------------------------------------------------------


def truncation_reason(frame: bytes, length: int) -> int:
    """The reason a prefix of a valid frame must get: the layer whose bytes it cuts."""
    full = parse_one(frame)
    l3 = int(full["l3_off"])
    if length < 14:
        return reasons.MALFORMED_ETHERNET
    if length < l3:
        return reasons.MALFORMED_VLAN
    ethertype = int(full["ethertype"])
    if ethertype == 0x0806:
        return reasons.MALFORMED_ARP if length < l3 + 28 else reasons.OK
    if ethertype == 0x0800:
        return reasons.MALFORMED_IPV4 if length < l3 + int(full["ip_tot_len"]) else reasons.OK
    if ethertype == 0x86DD:
        return reasons.MALFORMED_IPV6 if length < l3 + 40 + int(full["ip6_plen"]) else reasons.OK
    return reasons.OK


@pytest.mark.parametrize("name", sorted(VALID_FRAMES))
def test_truncated_frames_get_layer_reason(name):
    frame = bytes(VALID_FRAMES[name])
    prefixes = [frame[:length] for length in range(len(frame))]
    records = parse_frames(prefixes)
    for length, record in enumerate(records):
        want = truncation_reason(frame, length)
        got = int(record["status"])
        assert got == want, f"{name} cut to {length} bytes: {reasons.code_of(got)}, expected {reasons.code_of(want)}"


def test_truncation_inside_padding_keeps_fields():
    frame = bytes(VALID_FRAMES["udp_padded"])
    full = parse_one(frame)
    cut = parse_one(frame[: len(frame) - 5])
    assert cut["status"] == reasons.OK
    assert cut["payload_len"] == full["payload_len"]
    assert cut["sport"] == full["sport"]


# --- malformed headers ------------------------------------------------------


def patched(frame, offset: int, data: bytes) -> bytes:
    raw = bytearray(bytes(frame))
    raw[offset : offset + len(data)] = data
    return bytes(raw)


UDP_FRAME = eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / (b"d" * 20)
TCP_FRAME = eth() / IP(src=IP_A, dst=IP_B) / TCP(sport=1, dport=2) / (b"d" * 20)
IP6_UDP_FRAME = eth() / IPv6(src=IP6_A, dst=IP6_B) / UDP(sport=1, dport=2) / (b"d" * 20)
VXLAN_SHORT = eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=4789) / VXLAN(vni=5) / (b"\x00" * 10)

MALFORMED_CASES = [
    ("empty", b"", reasons.MALFORMED_ETHERNET),
    ("13_bytes", b"\x02" * 13, reasons.MALFORMED_ETHERNET),
    ("vlan_tag_cut", bytes(eth(type=0x8100)) + b"\x00\x05", reasons.MALFORMED_VLAN),
    ("second_vlan_tag_cut", bytes(eth() / Dot1AD(vlan=1, type=0x8100)) + b"\x00", reasons.MALFORMED_VLAN),
    ("arp_hlen_8", patched(VALID_FRAMES["arp_request"], 14 + 4, b"\x08"), reasons.MALFORMED_ARP),
    ("arp_ptype_ipv6", patched(VALID_FRAMES["arp_request"], 14 + 2, b"\x86\xdd"), reasons.MALFORMED_ARP),
    ("arp_htype_6", patched(VALID_FRAMES["arp_request"], 14, b"\x00\x06"), reasons.MALFORMED_ARP),
    ("ipv4_version_5", patched(UDP_FRAME, 14, b"\x55"), reasons.MALFORMED_IPV4),
    ("ipv4_ihl_4", patched(UDP_FRAME, 14, b"\x44"), reasons.MALFORMED_IPV4),
    ("ipv4_ihl_beyond_frame", bytes(eth() / IP(src=IP_A, dst=IP_B, ihl=15, proto=99, len=20)), reasons.MALFORMED_IPV4),
    ("ipv4_total_below_ihl", patched(UDP_FRAME, 16, b"\x00\x13"), reasons.MALFORMED_IPV4),
    ("ipv4_total_beyond_frame", patched(UDP_FRAME, 16, b"\x01\x00"), reasons.MALFORMED_IPV4),
    ("ipv6_version_4", patched(IP6_UDP_FRAME, 14, b"\x40"), reasons.MALFORMED_IPV6),
    ("ipv6_plen_beyond_frame", patched(IP6_UDP_FRAME, 18, b"\x01\x00"), reasons.MALFORMED_IPV6),
    ("ipv6_header_cut", bytes(eth(type=0x86DD)) + b"\x60" + b"\x00" * 30, reasons.MALFORMED_IPV6),
    ("icmp_4_bytes", bytes(eth() / IP(src=IP_A, dst=IP_B, proto=1) / b"\x08\x00\x00\x00"), reasons.MALFORMED_ICMP),
    ("icmpv6_4_bytes", bytes(eth() / IPv6(src=IP6_A, dst=IP6_B, nh=58) / b"\x80\x00\x00\x00"), reasons.MALFORMED_ICMP),
    ("udp_header_cut", bytes(eth() / IP(src=IP_A, dst=IP_B, proto=17) / b"\x00\x01\x00\x02"), reasons.MALFORMED_UDP),
    ("udp_len_7", patched(UDP_FRAME, 14 + 20 + 4, b"\x00\x07"), reasons.MALFORMED_UDP),
    ("udp_len_beyond_ip", patched(UDP_FRAME, 14 + 20 + 4, b"\x00\x40"), reasons.MALFORMED_UDP),
    ("ipv6_udp_len_beyond_ip", patched(IP6_UDP_FRAME, 14 + 40 + 4, b"\x00\x40"), reasons.MALFORMED_UDP),
    ("tcp_header_cut", bytes(eth() / IP(src=IP_A, dst=IP_B, proto=6) / (b"\x00" * 10)), reasons.MALFORMED_TCP),
    ("tcp_doff_4", patched(TCP_FRAME, 14 + 20 + 12, b"\x40"), reasons.MALFORMED_TCP),
    ("tcp_doff_beyond_segment", patched(TCP_FRAME, 14 + 20 + 12, b"\xf0"), reasons.MALFORMED_TCP),
    ("vxlan_inner_cut", bytes(VXLAN_SHORT), reasons.MALFORMED_VXLAN),
    ("vxlan_header_cut", bytes(eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=4789) / b"\x08\x00\x00"), reasons.MALFORMED_VXLAN),
]


@pytest.mark.parametrize("name,frame,reason", MALFORMED_CASES, ids=[case[0] for case in MALFORMED_CASES])
def test_malformed_frame_reason(name, frame, reason):
    record = parse_one(bytes(frame))
    got = int(record["status"])
    assert got == reason, f"{name}: {reasons.code_of(got)}, expected {reasons.code_of(reason)}"


def test_malformed_tcp_keeps_ip_fields():
    record = parse_one(patched(TCP_FRAME, 14 + 20 + 12, b"\x40"))
    assert record["flags"] & parse.IS_IPV4
    assert not record["flags"] & parse.IS_TCP
    assert record["ip_src"] == ip_value(IP_A)


# --- virtio-net header -------------------------------------------------------

GSO_TCP4 = eth() / IP(src=IP_A, dst=IP_B) / TCP(sport=1, dport=2, flags="A") / (b"s" * 3000)
GSO_TCP6 = eth() / IPv6(src=IP6_A, dst=IP6_B) / TCP(sport=1, dport=2, flags="A") / (b"s" * 3000)


def test_vnet_gso_and_csum_fields():
    frame = bytes(GSO_TCP4)
    vnet = vnet_header(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)
    record = parse_one(frame, vnet)
    assert record["status"] == reasons.OK
    assert record["flags"] & parse.IS_GSO
    assert record["flags"] & parse.NEEDS_CSUM
    assert record["gso_type"] == 1
    assert record["gso_size"] == 1448
    assert record["csum_start"] == 34
    assert record["csum_offset"] == 16
    assert record["vnet_hdr_len"] == 54


def test_vnet_zero_header_means_no_offload():
    record = parse_one(bytes(UDP_FRAME), vnet_header())
    assert record["status"] == reasons.OK
    assert not record["flags"] & (parse.IS_GSO | parse.NEEDS_CSUM)


VNET_CASES = [
    ("csum_field_beyond_frame", UDP_FRAME, vnet_header(flags=1, csum_start=34, csum_offset=100), reasons.MALFORMED_VNET_HDR),
    ("csum_start_beyond_frame", UDP_FRAME, vnet_header(flags=1, csum_start=5000, csum_offset=6), reasons.MALFORMED_VNET_HDR),
    ("unknown_gso_type", GSO_TCP4, vnet_header(gso_type=2, gso_size=1448), reasons.MALFORMED_VNET_HDR),
    ("gso_size_zero", GSO_TCP4, vnet_header(flags=1, gso_type=1, csum_start=34, csum_offset=16), reasons.MALFORMED_VNET_HDR),
    ("hdr_len_beyond_frame", UDP_FRAME, vnet_header(hdr_len=4000), reasons.MALFORMED_VNET_HDR),
    ("tcpv4_gso_on_udp", UDP_FRAME, vnet_header(gso_type=1, gso_size=1000), reasons.MALFORMED_VNET_HDR),
    ("tcpv4_gso_on_ipv6", GSO_TCP6, vnet_header(gso_type=1, gso_size=1000), reasons.MALFORMED_VNET_HDR),
    ("tcpv6_gso_on_ipv4", GSO_TCP4, vnet_header(gso_type=4, gso_size=1000), reasons.MALFORMED_VNET_HDR),
    ("tcpv6_gso_ok", GSO_TCP6, vnet_header(gso_type=4, gso_size=1000), reasons.OK),
    ("tcpv4_gso_with_ecn_ok", GSO_TCP4, vnet_header(gso_type=0x81, gso_size=1000), reasons.OK),
    ("gso_frame_with_padding", bytes(GSO_TCP4) + b"\x00" * 4, vnet_header(gso_type=1, gso_size=1000), reasons.MALFORMED_IPV4),
]


@pytest.mark.parametrize("name,frame,vnet,reason", VNET_CASES, ids=[case[0] for case in VNET_CASES])
def test_vnet_header_reason(name, frame, vnet, reason):
    record = parse_one(bytes(frame), vnet)
    got = int(record["status"])
    assert got == reason, f"{name}: {reasons.code_of(got)}, expected {reasons.code_of(reason)}"


# --- batches and API ---------------------------------------------------------


def all_test_frames() -> list[bytes]:
    frames = [bytes(f) for f in VALID_FRAMES.values()]
    frames += [bytes(frame) for _, frame, _ in MALFORMED_CASES]
    frames += [frame[:cut] for frame in frames[:6] for cut in (0, 13, 20, 40)]
    return frames


def test_mixed_batch_equals_one_by_one():
    frames = all_test_frames()
    together = parse_frames(frames)
    for i, frame in enumerate(frames):
        alone = parse_one(frame)
        assert together[i].item() == alone.item(), f"frame {i} ({frame[:20].hex()}...) parses differently in a batch"


def test_parse_batch_reuses_out():
    batch = FrameBatch(capacity_frames=4, capacity_bytes=4096)
    batch.append(0, bytes(UDP_FRAME))
    out = np.zeros(8, dtype=parse.RECORD_DTYPE)
    records = parse.parse_batch(batch, out=out)
    assert len(records) == 1
    assert np.shares_memory(records, out)
    assert out[0]["dport"] == 2


def test_parse_batch_rejects_wrong_out_dtype():
    batch = FrameBatch(capacity_frames=1, capacity_bytes=128)
    batch.append(0, bytes(UDP_FRAME))
    with pytest.raises(ValueError, match="RECORD_DTYPE"):
        parse.parse_batch(batch, out=np.zeros(4, dtype=np.int64))


def test_parse_batch_rejects_small_out():
    batch = FrameBatch(capacity_frames=2, capacity_bytes=256)
    batch.append(0, bytes(UDP_FRAME))
    batch.append(0, bytes(UDP_FRAME))
    with pytest.raises(ValueError, match="room for 1"):
        parse.parse_batch(batch, out=np.zeros(1, dtype=parse.RECORD_DTYPE))


def test_parse_frames_rejects_frame_outside_buffer():
    buf = np.zeros(64, dtype=np.uint8)
    offsets = np.array([40], dtype=np.int64)
    lengths = np.array([60], dtype=np.int32)
    vnet = np.zeros((1, 10), dtype=np.uint8)
    out = np.zeros(1, dtype=parse.RECORD_DTYPE)
    with pytest.raises(ValueError, match="outside the buffer"):
        parse.parse_frames(buf, offsets, lengths, parse._NO_ADJUST, vnet, 1, out, 4789, True)


def test_configured_vxlan_port():
    frame = bytes(eth() / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=8472) / VXLAN(vni=9) / eth() / ARP(hwsrc=MAC_A, psrc=IP_A, pdst=IP_B))
    batch = FrameBatch(capacity_frames=1, capacity_bytes=256)
    batch.append(0, frame)
    default = parse.parse_batch(batch)[0].copy()
    linux = parse.parse_batch(batch, vxlan_port=8472)[0].copy()
    assert not default["flags"] & parse.IS_VXLAN
    assert linux["flags"] & parse.IS_VXLAN
    assert linux["vni"] == 9


# --- property tests ----------------------------------------------------------

OFFSET_FIELDS = ("l3_off", "l4_off", "payload_off", "inner_off")


def check_invariants(frames, records, label):
    for frame, record in zip(frames, records):
        status = int(record["status"])
        assert status in reasons.BY_NUMBER, f"{label}: unknown status {status} for {frame.hex()}"
        assert record["frame_len"] == len(frame)
        for field in OFFSET_FIELDS:
            value = int(record[field])
            assert -1 <= value <= len(frame), f"{label}: {field}={value} outside a {len(frame)}-byte frame"
        if status == reasons.OK and record["payload_off"] >= 0:
            assert record["payload_off"] + record["payload_len"] <= len(frame)
            assert record["payload_len"] >= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(max_size=200), st.one_of(st.none(), st.binary(min_size=10, max_size=10))), min_size=1, max_size=8))
def test_random_bytes_never_raise(items):
    frames = [frame for frame, _ in items]
    vnets = [vnet for _, vnet in items]
    records = parse_frames(frames, vnets)
    check_invariants(frames, records, "random bytes")


FRAME_POOL = [bytes(f) for f in VALID_FRAMES.values()]


@st.composite
def mutated_frames(draw):
    frame = bytearray(draw(st.sampled_from(FRAME_POOL)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(frame) - 1))
        frame[position] = draw(st.integers(min_value=0, max_value=255))
    cut = draw(st.integers(min_value=0, max_value=len(frame)))
    return bytes(frame[:cut])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_frames(), min_size=1, max_size=8))
def test_mutated_frames_never_raise(frames):
    records = parse_frames(frames)
    check_invariants(frames, records, "mutated frame")
    for i, frame in enumerate(frames):
        assert records[i].item() == parse_one(frame).item()
