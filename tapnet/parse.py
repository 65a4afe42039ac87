"""Batch header parser: frames in a `FrameBatch` to fixed-layout records, in numba.

Theory of operation
-------------------
One `@njit` call parses a whole batch. It reads the frames where they lie in
the batch buffer and writes one record per frame into a preallocated
structured array of dtype `RECORD_DTYPE`. The datapath then reads columns of
that array (`records["dport"]`) or single records, and never touches a header
byte in Python for the common decisions.

Rules the parser keeps:

- It never raises for frame content and never reads outside a frame. A
  truncated or inconsistent header sets `status` to a reason number from
  `tapnet.reasons` (the first problem found wins) and parsing stops there.
  Fields of the layers parsed before the problem stay filled in.
- A protocol bit in `flags` is set only for a header that parsed completely.
  `IS_FRAGMENT` and `HAS_IP_OPTIONS` qualify the IP header. `NEEDS_CSUM` and
  `IS_GSO` copy the virtio-net header, even when `status` rejects it.
- Every offset in a record (`l3_off`, `l4_off`, `payload_off`, `inner_off`)
  counts from the first byte of the parsed frame. For an inner VXLAN frame
  (see `parse_inner`) that is the inner Ethernet header.
- Ethernet padding after the IP packet is ignored. `payload_len` counts only
  the bytes that the IP (and UDP) lengths cover.
- IPv4 fragments with a non-zero offset get no L4 parse. A first fragment
  (MF set, offset 0) does, but its UDP length is not checked against the
  fragment.
- IPv6: only the fixed header, and TCP, UDP or ICMPv6 directly after it. The
  parser does not walk extension headers, so a packet with one has
  `l4_off == -1` and `ip6_next` names the first extension header. A Fragment
  header (next header 44) sets `IS_FRAGMENT`.
- ICMP and ICMPv6 need 8 header bytes: type, code, checksum and 4 bytes
  that depend on the type. Echo, error and neighbor discovery messages all
  have them. `icmp_id` and `icmp_seq` are filled only for echo request and
  reply.
- The virtio-net header gives `MALFORMED_VNET_HDR` when its checksum field or
  `hdr_len` lies beyond the frame, its GSO type is unknown, `gso_size` is 0,
  or the GSO type does not match the headers (TCPV4 needs IPv4 and TCP, TCPV6
  IPv6 and TCP, the UDP types UDP). A GSO frame carries no Ethernet padding,
  so its IP length must reach the end of the frame.
- 802.1Q (0x8100), 802.1ad (0x88a8) and the older 0x9100 tags are skipped in
  any number. `vlan` is the VID of the outer tag and `vlan_inner` that of the
  second tag (-1 when absent), and `ethertype` is the one after the last tag.

numba's on-disk cache tracks only the source file of the jitted function, so
every jitted helper the parser calls lives in this file. The reason numbers
imported from `tapnet.reasons` are frozen into the compiled code. That is
safe because those numbers never change.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tapnet.batch import FrameBatch
from tapnet.model import VXLAN_PORT
from tapnet.reasons import (
    MALFORMED_ARP,
    MALFORMED_ETHERNET,
    MALFORMED_ICMP,
    MALFORMED_IPV4,
    MALFORMED_IPV6,
    MALFORMED_TCP,
    MALFORMED_UDP,
    MALFORMED_VLAN,
    MALFORMED_VNET_HDR,
    MALFORMED_VXLAN,
    OK,
)

# Bits of the `flags` field.
HAS_VLAN = 1 << 0
IS_ARP = 1 << 1
IS_IPV4 = 1 << 2
IS_IPV6 = 1 << 3
IS_ICMP = 1 << 4  # ICMP over IPv4 or ICMPv6 over IPv6
IS_UDP = 1 << 5
IS_TCP = 1 << 6
IS_VXLAN = 1 << 7
IS_FRAGMENT = 1 << 8
HAS_IP_OPTIONS = 1 << 9
NEEDS_CSUM = 1 << 10  # virtio-net header: partial checksum to complete
IS_GSO = 1 << 11  # virtio-net header: superframe to segment

FLAG_NAMES = {
    HAS_VLAN: "HAS_VLAN",
    IS_ARP: "IS_ARP",
    IS_IPV4: "IS_IPV4",
    IS_IPV6: "IS_IPV6",
    IS_ICMP: "IS_ICMP",
    IS_UDP: "IS_UDP",
    IS_TCP: "IS_TCP",
    IS_VXLAN: "IS_VXLAN",
    IS_FRAGMENT: "IS_FRAGMENT",
    HAS_IP_OPTIONS: "HAS_IP_OPTIONS",
    NEEDS_CSUM: "NEEDS_CSUM",
    IS_GSO: "IS_GSO",
}

# Ethertypes (IEEE registry) and IP protocol numbers (IANA).
ETH_HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100  # 802.1Q
ETHERTYPE_QINQ = 0x88A8  # 802.1ad service tag
ETHERTYPE_QINQ_OLD = 0x9100  # pre-standard double tagging
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6_FRAGMENT = 44
IPPROTO_ICMPV6 = 58
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
VXLAN_HEADER_LEN = 8  # RFC 7348

# struct virtio_net_hdr (Linux include/uapi/linux/virtio_net.h), little-endian.
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3  # UFO, IPv4 fragmentation offload (obsolete)
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5  # USO, UDP segmentation
VIRTIO_NET_HDR_GSO_ECN = 0x80  # flag bit of gso_type: the TCP sender uses ECN

RECORD_DTYPE = np.dtype(
    [
        ("status", np.uint8),
        ("flags", np.uint16),
        ("frame_len", np.int32),  # bytes parsed; 0 for a row skipped with a negative adjust
        # Ethernet
        ("dst_mac", np.uint64),  # 48-bit value, first byte most significant
        ("src_mac", np.uint64),
        ("ethertype", np.uint16),  # after any VLAN tags
        ("vlan", np.int32),  # VID of the outer tag, -1 when untagged
        ("vlan_inner", np.int32),  # VID of the second tag, -1 when absent
        ("l3_off", np.int32),  # -1 when the Ethernet header did not parse
        # ARP (Ethernet/IPv4 only)
        ("arp_op", np.uint16),
        ("arp_sha", np.uint64),
        ("arp_spa", np.uint32),
        ("arp_tha", np.uint64),
        ("arp_tpa", np.uint32),
        # IPv4
        ("ip_src", np.uint32),  # value of the dotted address: 10.0.0.1 is 0x0A000001
        ("ip_dst", np.uint32),
        ("ip_proto", np.uint8),
        ("ip_ihl", np.uint8),  # header length in bytes
        ("ip_ttl", np.uint8),
        ("ip_tot_len", np.uint16),
        ("ip_id", np.uint16),
        ("ip_frag", np.uint16),  # raw flags and fragment offset field
        # IPv6 fixed header; the addresses are at l3_off + 8 and l3_off + 24
        ("ip6_next", np.uint8),
        ("ip6_plen", np.uint16),
        ("ip6_hlim", np.uint8),
        # L4
        ("l4_off", np.int32),  # -1 when no ICMP, UDP or TCP header parsed
        ("icmp_type", np.uint8),
        ("icmp_code", np.uint8),
        ("icmp_id", np.uint16),  # echo request and reply only
        ("icmp_seq", np.uint16),
        ("sport", np.uint16),
        ("dport", np.uint16),
        ("tcp_flags", np.uint8),  # CWR ECE URG ACK PSH RST SYN FIN, as in byte 13 of the header
        ("tcp_doff", np.uint8),  # header length in bytes
        ("tcp_seq", np.uint32),
        ("tcp_ack", np.uint32),
        ("tcp_window", np.uint16),
        ("payload_off", np.int32),  # -1 when no L4 header parsed
        ("payload_len", np.int32),
        # VXLAN
        ("vxlan_flags", np.uint8),
        ("vni", np.uint32),
        ("inner_off", np.int32),  # inner Ethernet header, -1 when not VXLAN
        # virtio-net header
        ("vnet_flags", np.uint8),
        ("gso_type", np.uint8),  # raw, including the ECN bit 0x80
        ("vnet_hdr_len", np.uint16),
        ("gso_size", np.uint16),
        ("csum_start", np.uint16),
        ("csum_offset", np.uint16),
    ],
    align=True,
)

# An empty adjust array: every frame starts at its offset.
_NO_ADJUST = np.zeros(0, dtype=np.int64)

# numba options. The parser allocates nothing, so it runs without numba's
# reference-counting runtime (`_nrt=False`). With the runtime, numba 0.68.1
# increfs and decrefs the arrays passed to the helpers on every frame. That
# made parsing a generated mixed capture about 2.5 times slower (2-core
# machine, 172 against 407 ns per frame). Helpers are inlined into
# `parse_frames` at numba IR level for the same reason.
# NOTE: `_nrt` is an internal numba option, tested with numba 0.68.1 only.
_JIT_OPTIONS = {"cache": True, "_nrt": False}
_HELPER_JIT_OPTIONS = {"cache": True, "_nrt": False, "inline": "always"}


@njit(**_HELPER_JIT_OPTIONS)
def _be16(buf, p):
    return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])


@njit(**_HELPER_JIT_OPTIONS)
def _be24(buf, p):
    return (np.int64(buf[p]) << 16) | (np.int64(buf[p + 1]) << 8) | np.int64(buf[p + 2])


@njit(**_HELPER_JIT_OPTIONS)
def _be32(buf, p):
    return (_be16(buf, p) << 16) | _be16(buf, p + 2)


@njit(**_HELPER_JIT_OPTIONS)
def _be48(buf, p):
    return (_be16(buf, p) << 32) | _be32(buf, p + 2)


@njit(**_HELPER_JIT_OPTIONS)
def _le16(rows, i, p):
    return np.int64(rows[i, p]) | (np.int64(rows[i, p + 1]) << 8)


@njit(**_HELPER_JIT_OPTIONS)
def _reset(r, frame_len):
    r.status = OK
    r.flags = 0
    r.frame_len = frame_len

    r.dst_mac = 0
    r.src_mac = 0
    r.ethertype = 0
    r.vlan = -1
    r.vlan_inner = -1
    r.l3_off = -1

    r.arp_op = 0
    r.arp_sha = 0
    r.arp_spa = 0
    r.arp_tha = 0
    r.arp_tpa = 0

    r.ip_src = 0
    r.ip_dst = 0
    r.ip_proto = 0
    r.ip_ihl = 0
    r.ip_ttl = 0
    r.ip_tot_len = 0
    r.ip_id = 0
    r.ip_frag = 0
    r.ip6_next = 0
    r.ip6_plen = 0
    r.ip6_hlim = 0

    r.l4_off = -1
    r.icmp_type = 0
    r.icmp_code = 0
    r.icmp_id = 0
    r.icmp_seq = 0
    r.sport = 0
    r.dport = 0
    r.tcp_flags = 0
    r.tcp_doff = 0
    r.tcp_seq = 0
    r.tcp_ack = 0
    r.tcp_window = 0
    r.payload_off = -1
    r.payload_len = 0

    r.vxlan_flags = 0
    r.vni = 0
    r.inner_off = -1

    r.vnet_flags = 0
    r.gso_type = 0
    r.vnet_hdr_len = 0
    r.gso_size = 0
    r.csum_start = 0
    r.csum_offset = 0


@njit(**_HELPER_JIT_OPTIONS)
def _parse_vnet(vnet, i, frame_len, r):
    """Copy the virtio-net header of frame `i` into `r`; return a reason number."""
    vnet_flags = np.int64(vnet[i, 0])
    gso_type = np.int64(vnet[i, 1])
    hdr_len = _le16(vnet, i, 2)
    gso_size = _le16(vnet, i, 4)
    csum_start = _le16(vnet, i, 6)
    csum_offset = _le16(vnet, i, 8)
    r.vnet_flags = vnet_flags
    r.gso_type = gso_type
    r.vnet_hdr_len = hdr_len
    r.gso_size = gso_size
    r.csum_start = csum_start
    r.csum_offset = csum_offset

    if vnet_flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        r.flags |= NEEDS_CSUM
        # The 2-byte checksum field at csum_start + csum_offset must lie inside the frame.
        if csum_start + csum_offset + 2 > frame_len:
            return MALFORMED_VNET_HDR

    gso_kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso_kind != VIRTIO_NET_HDR_GSO_NONE:
        if not (
            gso_kind == VIRTIO_NET_HDR_GSO_TCPV4
            or gso_kind == VIRTIO_NET_HDR_GSO_TCPV6
            or gso_kind == VIRTIO_NET_HDR_GSO_UDP
            or gso_kind == VIRTIO_NET_HDR_GSO_UDP_L4
        ):
            return MALFORMED_VNET_HDR
        r.flags |= IS_GSO
        if gso_size == 0:
            return MALFORMED_VNET_HDR
    # The Linux TAP driver rejects a header length beyond the frame as well.
    if hdr_len > frame_len:
        return MALFORMED_VNET_HDR
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _check_gso_matches(r):
    """Return MALFORMED_VNET_HDR when the GSO type does not fit the parsed headers."""
    if not (r.flags & IS_GSO):
        return OK
    gso_kind = np.int64(r.gso_type) & ~VIRTIO_NET_HDR_GSO_ECN
    if gso_kind == VIRTIO_NET_HDR_GSO_TCPV4:
        if (r.flags & IS_IPV4) and (r.flags & IS_TCP):
            return OK
        return MALFORMED_VNET_HDR
    if gso_kind == VIRTIO_NET_HDR_GSO_TCPV6:
        if (r.flags & IS_IPV6) and (r.flags & IS_TCP):
            return OK
        return MALFORMED_VNET_HDR
    if r.flags & IS_UDP:
        return OK
    return MALFORMED_VNET_HDR


@njit(**_HELPER_JIT_OPTIONS)
def _parse_arp(buf, p, end, r):
    if p + 28 > end:
        return MALFORMED_ARP
    if _be16(buf, p) != 1 or _be16(buf, p + 2) != ETHERTYPE_IPV4 or buf[p + 4] != 6 or buf[p + 5] != 4:
        return MALFORMED_ARP
    r.arp_op = _be16(buf, p + 6)
    r.arp_sha = _be48(buf, p + 8)
    r.arp_spa = _be32(buf, p + 14)
    r.arp_tha = _be48(buf, p + 18)
    r.arp_tpa = _be32(buf, p + 24)
    r.flags |= IS_ARP
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _parse_icmp(buf, start, q, l4_end, is_v6, r):
    if q + 8 > l4_end:
        return MALFORMED_ICMP
    icmp_type = np.int64(buf[q])
    r.icmp_type = icmp_type
    r.icmp_code = buf[q + 1]
    if is_v6:
        is_echo = icmp_type == ICMPV6_ECHO_REQUEST or icmp_type == ICMPV6_ECHO_REPLY
    else:
        is_echo = icmp_type == ICMP_ECHO_REQUEST or icmp_type == ICMP_ECHO_REPLY
    if is_echo:
        r.icmp_id = _be16(buf, q + 4)
        r.icmp_seq = _be16(buf, q + 6)
    r.l4_off = q - start
    r.payload_off = q + 8 - start
    r.payload_len = l4_end - q - 8
    r.flags |= IS_ICMP
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _parse_udp(buf, start, q, l4_end, is_first_fragment, vxlan_port, r):
    if q + 8 > l4_end:
        return MALFORMED_UDP
    udp_len = _be16(buf, q + 4)
    if is_first_fragment:
        # The UDP length covers the whole datagram, which this fragment only begins.
        payload_len = l4_end - q - 8
    else:
        if udp_len < 8 or q + udp_len > l4_end:
            return MALFORMED_UDP
        payload_len = udp_len - 8
    sport = _be16(buf, q)
    dport = _be16(buf, q + 2)
    r.sport = sport
    r.dport = dport
    r.l4_off = q - start
    r.payload_off = q + 8 - start
    r.payload_len = payload_len
    r.flags |= IS_UDP

    if dport == vxlan_port and not is_first_fragment:
        v = q + 8
        if payload_len < VXLAN_HEADER_LEN + ETH_HEADER_LEN:
            return MALFORMED_VXLAN
        r.vxlan_flags = buf[v]
        r.vni = _be24(buf, v + 4)
        r.inner_off = v + VXLAN_HEADER_LEN - start
        r.flags |= IS_VXLAN
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _parse_tcp(buf, start, q, l4_end, r):
    if q + 20 > l4_end:
        return MALFORMED_TCP
    doff = (np.int64(buf[q + 12]) >> 4) * 4
    if doff < 20 or q + doff > l4_end:
        return MALFORMED_TCP
    r.sport = _be16(buf, q)
    r.dport = _be16(buf, q + 2)
    r.tcp_seq = _be32(buf, q + 4)
    r.tcp_ack = _be32(buf, q + 8)
    r.tcp_doff = doff
    r.tcp_flags = buf[q + 13]
    r.tcp_window = _be16(buf, q + 14)
    r.l4_off = q - start
    r.payload_off = q + doff - start
    r.payload_len = l4_end - q - doff
    r.flags |= IS_TCP
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _parse_l4(buf, start, proto, q, l4_end, is_v6, is_first_fragment, vxlan_port, r):
    if proto == IPPROTO_TCP:
        return _parse_tcp(buf, start, q, l4_end, r)
    if proto == IPPROTO_UDP:
        return _parse_udp(buf, start, q, l4_end, is_first_fragment, vxlan_port, r)
    if (proto == IPPROTO_ICMP and not is_v6) or (proto == IPPROTO_ICMPV6 and is_v6):
        return _parse_icmp(buf, start, q, l4_end, is_v6, r)
    return OK


@njit(**_HELPER_JIT_OPTIONS)
def _parse_ipv4(buf, start, p, end, vxlan_port, r):
    if p + 20 > end:
        return MALFORMED_IPV4
    version_ihl = np.int64(buf[p])
    ihl = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or ihl < 20 or p + ihl > end:
        return MALFORMED_IPV4
    tot_len = _be16(buf, p + 2)
    if tot_len < ihl or p + tot_len > end:
        return MALFORMED_IPV4
    # A GSO superframe carries no Ethernet padding: the IP packet fills the frame.
    if (r.flags & IS_GSO) and p + tot_len != end:
        return MALFORMED_IPV4
    frag = _be16(buf, p + 6)
    proto = np.int64(buf[p + 9])
    r.ip_ihl = ihl
    r.ip_tot_len = tot_len
    r.ip_id = _be16(buf, p + 4)
    r.ip_frag = frag
    r.ip_ttl = buf[p + 8]
    r.ip_proto = proto
    r.ip_src = _be32(buf, p + 12)
    r.ip_dst = _be32(buf, p + 16)
    r.flags |= IS_IPV4
    if ihl > 20:
        r.flags |= HAS_IP_OPTIONS

    frag_offset = frag & 0x1FFF
    more_fragments = (frag & 0x2000) != 0
    if frag_offset != 0 or more_fragments:
        r.flags |= IS_FRAGMENT
    if frag_offset != 0:
        return OK
    return _parse_l4(buf, start, proto, p + ihl, p + tot_len, False, more_fragments, vxlan_port, r)


@njit(**_HELPER_JIT_OPTIONS)
def _parse_ipv6(buf, start, p, end, vxlan_port, r):
    if p + 40 > end or buf[p] >> 4 != 6:
        return MALFORMED_IPV6
    plen = _be16(buf, p + 4)
    if p + 40 + plen > end:
        return MALFORMED_IPV6
    if (r.flags & IS_GSO) and p + 40 + plen != end:
        return MALFORMED_IPV6
    next_header = np.int64(buf[p + 6])
    r.ip6_plen = plen
    r.ip6_next = next_header
    r.ip6_hlim = buf[p + 7]
    r.flags |= IS_IPV6

    if next_header == IPPROTO_IPV6_FRAGMENT:
        r.flags |= IS_FRAGMENT
        return OK
    return _parse_l4(buf, start, next_header, p + 40, p + 40 + plen, True, False, vxlan_port, r)


@njit(**_HELPER_JIT_OPTIONS)
def _parse_frame(buf, start, end, vnet, i, use_vnet, vxlan_port, r):
    """Parse the frame buf[start:end] into record `r`."""
    _reset(r, end - start)
    if use_vnet:
        status = _parse_vnet(vnet, i, end - start, r)
        if status != OK:
            r.status = status
            return

    if end - start < ETH_HEADER_LEN:
        r.status = MALFORMED_ETHERNET
        return
    r.dst_mac = _be48(buf, start)
    r.src_mac = _be48(buf, start + 6)
    p = start + 12
    ethertype = _be16(buf, p)
    p += 2
    while ethertype == ETHERTYPE_VLAN or ethertype == ETHERTYPE_QINQ or ethertype == ETHERTYPE_QINQ_OLD:
        if p + 4 > end:
            r.status = MALFORMED_VLAN
            return
        vid = _be16(buf, p) & 0x0FFF
        if r.vlan < 0:
            r.vlan = vid
        elif r.vlan_inner < 0:
            r.vlan_inner = vid
        r.flags |= HAS_VLAN
        ethertype = _be16(buf, p + 2)
        p += 4
    r.ethertype = ethertype
    r.l3_off = p - start

    if ethertype == ETHERTYPE_ARP:
        status = _parse_arp(buf, p, end, r)
    elif ethertype == ETHERTYPE_IPV4:
        status = _parse_ipv4(buf, start, p, end, vxlan_port, r)
    elif ethertype == ETHERTYPE_IPV6:
        status = _parse_ipv6(buf, start, p, end, vxlan_port, r)
    else:
        status = OK
    if status == OK and use_vnet:
        status = _check_gso_matches(r)
    r.status = status


@njit(**_JIT_OPTIONS)
def parse_frames(buf, offsets, lengths, adjust, vnet, count, out, vxlan_port, use_vnet):
    """Parse `count` frames of `buf` into `out[:count]` and return `count`.

    Frame i spans buf[offsets[i] + adjust[i] : offsets[i] + lengths[i]]. An
    empty `adjust` means no adjustment. A negative adjust[i] skips frame i:
    its record gets the defaults with `frame_len` 0 and `status` OK. With
    `use_vnet` the virtio-net header in vnet[i] applies to frame i; inner
    VXLAN frames are parsed without it.

    Raises ValueError when the index arrays do not fit the buffer or `out`.
    That is a bug of the caller, unlike bad frame content, which only sets
    `status`.
    """
    if count < 0 or count > offsets.size or count > lengths.size or count > out.size:
        raise ValueError("count exceeds the offsets, lengths or output array")
    if adjust.size != 0 and count > adjust.size:
        raise ValueError("count exceeds the adjust array")
    if use_vnet and count > vnet.shape[0]:
        raise ValueError("count exceeds the vnet array")
    for i in range(count):
        r = out[i]
        base = offsets[i]
        shift = np.int64(0)
        if adjust.size != 0:
            shift = np.int64(adjust[i])
        if shift < 0:
            _reset(r, 0)
            continue
        start = base + shift
        end = base + lengths[i]
        if base < 0 or end > buf.size or start > end:
            raise ValueError("frame outside the buffer: check offsets, lengths and adjust")
        _parse_frame(buf, start, end, vnet, i, use_vnet, vxlan_port, r)
    return count


def _output_for(out: np.ndarray | None, count: int, capacity: int) -> np.ndarray:
    if out is None:
        return np.empty(max(count, capacity), dtype=RECORD_DTYPE)
    if out.dtype != RECORD_DTYPE or out.ndim != 1:
        raise ValueError(f"out must be a 1-D array of RECORD_DTYPE, got {out.dtype} with {out.ndim} dimensions")
    if len(out) < count:
        raise ValueError(f"out has room for {len(out)} records but the batch has {count} frames")
    return out


def parse_batch(batch: FrameBatch, out: np.ndarray | None = None, vxlan_port: int = VXLAN_PORT) -> np.ndarray:
    """Parse every frame of `batch` with one numba call; return the records, `out[:batch.count]`.

    `out` is reused when given. Otherwise a new array with room for the
    batch's capacity is allocated.
    """
    count = batch.count
    records = _output_for(out, count, batch.capacity_frames)
    parse_frames(batch.buf, batch.offsets, batch.lengths, _NO_ADJUST, batch.vnet, count, records, vxlan_port, True)
    return records[:count]


def parse_inner(
    batch: FrameBatch, outer: np.ndarray, out: np.ndarray | None = None, vxlan_port: int = VXLAN_PORT
) -> np.ndarray:
    """Parse the inner Ethernet frames of the VXLAN frames in `batch`, in place in its buffer.

    `outer` contains the records `parse_batch` returned for the batch. Row i of
    the result describes the inner frame of frame i, with offsets counted from
    the inner Ethernet header. It ends where the outer UDP datagram ends, so
    outer Ethernet padding is not part of it. Rows of frames that are not valid
    VXLAN are skipped and have `frame_len` 0.
    """
    count = batch.count
    if len(outer) < count:
        raise ValueError(f"outer has {len(outer)} records but the batch has {count} frames")
    records = _output_for(out, count, batch.capacity_frames)
    outer = outer[:count]
    is_vxlan = (outer["status"] == OK) & ((outer["flags"] & IS_VXLAN) != 0)
    adjust = np.where(is_vxlan, outer["inner_off"], -1).astype(np.int64)
    ends = np.where(is_vxlan, outer["payload_off"] + outer["payload_len"], batch.lengths[:count]).astype(np.int32)
    parse_frames(batch.buf, batch.offsets, ends, adjust, batch.vnet, count, records, vxlan_port, False)
    return records[:count]


def flag_names(flags: int) -> list[str]:
    """Name the bits set in a record's `flags`, for traces and test failures."""
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]
