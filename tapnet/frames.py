"""Build IPv4 UDP and TCP frames with complete checksums, and check received ones.

Pure functions over bytes for the datapath's own responders (DNS over UDP
and TCP). Addresses are integers as the parser stores them: MACs as 48-bit
values and IPv4 addresses as 32-bit values.
"""

from __future__ import annotations

import struct

from tapnet.gateway import ETH_P_IP, GATEWAY_TTL, internet_checksum

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPV4_DF = 0x4000  # "don't fragment" in the flags and fragment offset field
IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8
TCP_HEADER_LEN = 20

# TCP header flags (RFC 9293, section 3.1).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

TCP_OPTION_END = 0
TCP_OPTION_NOP = 1
TCP_OPTION_MSS = 2


def _pseudo_header(src_ip: int, dst_ip: int, proto: int, length: int) -> bytes:
    return struct.pack("!IIBBH", src_ip, dst_ip, 0, proto, length)


def ipv4_header(src_ip: int, dst_ip: int, proto: int, payload_len: int, ident: int = 0) -> bytes:
    """Build a 20-byte IPv4 header with DF set, TTL 64 and its checksum.

    With DF set the datagram is atomic, so an identification of 0 is valid
    (RFC 6864) and keeps emitted frames independent of any counter.
    """
    header = bytearray(
        struct.pack(
            "!BBHHHBBHII",
            0x45, 0, IPV4_HEADER_LEN + payload_len, ident & 0xFFFF, IPV4_DF,
            GATEWAY_TTL, proto, 0, src_ip, dst_ip,
        )
    )
    header[10:12] = struct.pack("!H", internet_checksum(bytes(header)))
    return bytes(header)


def ethernet_header(src_mac: int, dst_mac: int) -> bytes:
    return dst_mac.to_bytes(6, "big") + src_mac.to_bytes(6, "big") + struct.pack("!H", ETH_P_IP)


def udp_frame(src_mac: int, dst_mac: int, src_ip: int, dst_ip: int, sport: int, dport: int, payload: bytes) -> bytes:
    """Build an Ethernet/IPv4/UDP frame with the UDP checksum filled in."""
    length = UDP_HEADER_LEN + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    checksum = internet_checksum(_pseudo_header(src_ip, dst_ip, IPPROTO_UDP, length) + udp)
    # RFC 768: a computed checksum of zero is sent as all ones, because zero means "none".
    udp = udp[:6] + struct.pack("!H", checksum or 0xFFFF) + udp[8:]
    return ethernet_header(src_mac, dst_mac) + ipv4_header(src_ip, dst_ip, IPPROTO_UDP, length) + udp


def tcp_frame(
    src_mac: int,
    dst_mac: int,
    src_ip: int,
    dst_ip: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """Build an Ethernet/IPv4/TCP segment with the TCP checksum filled in.

    `options` must be padded to a multiple of four bytes.
    """
    if len(options) % 4:
        raise ValueError(f"TCP options must be padded to a multiple of 4 bytes, got {len(options)}")
    header_len = TCP_HEADER_LEN + len(options)
    tcp = bytearray(
        struct.pack(
            "!HHIIBBHHH",
            sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
            (header_len // 4) << 4, flags, window, 0, 0,
        )
    )
    tcp += options + payload
    length = len(tcp)
    tcp[16:18] = struct.pack("!H", internet_checksum(_pseudo_header(src_ip, dst_ip, IPPROTO_TCP, length) + bytes(tcp)))
    return ethernet_header(src_mac, dst_mac) + ipv4_header(src_ip, dst_ip, IPPROTO_TCP, length) + bytes(tcp)


def mss_option(mss: int) -> bytes:
    """Return the TCP MSS option (kind 2, length 4)."""
    return struct.pack("!BBH", TCP_OPTION_MSS, 4, mss)


def tcp_mss(frame: bytes, l4_off: int, header_len: int) -> int | None:
    """Return the MSS option of the TCP header at `l4_off`, or None when it has none.

    A malformed option (a length below 2 or past the header) ends the search with None.
    """
    position = l4_off + TCP_HEADER_LEN
    end = min(l4_off + header_len, len(frame))
    while position < end:
        kind = frame[position]
        if kind == TCP_OPTION_END:
            return None
        if kind == TCP_OPTION_NOP:
            position += 1
            continue
        if position + 1 >= end:
            return None
        length = frame[position + 1]
        if length < 2 or position + length > end:
            return None
        if kind == TCP_OPTION_MSS and length == 4:
            return int.from_bytes(frame[position + 2 : position + 4], "big")
        position += length
    return None


def l4_checksum_ok(frame: bytes, l3_off: int, l4_off: int, proto: int, l4_len: int) -> bool:
    """Check the UDP or TCP checksum of an IPv4 packet. A UDP checksum of zero means none was sent, and passes."""
    segment = frame[l4_off : l4_off + l4_len]
    if len(segment) != l4_len:
        return False
    if proto == IPPROTO_UDP and segment[6:8] == b"\x00\x00":
        return True
    src_ip = int.from_bytes(frame[l3_off + 12 : l3_off + 16], "big")
    dst_ip = int.from_bytes(frame[l3_off + 16 : l3_off + 20], "big")
    return internet_checksum(_pseudo_header(src_ip, dst_ip, proto, l4_len) + segment) == 0
