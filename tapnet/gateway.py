"""Frames the network gateway (`.1`) sends: ARP replies and ICMP echo replies.

Pure functions from a request frame to the reply frame. The datapath decides
when the gateway replies, and this module only builds the bytes.
"""

from __future__ import annotations

import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
# Linux's default IPv4 TTL (net.ipv4.ip_default_ttl), used for the gateway's own packets.
GATEWAY_TTL = 64


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, folded and inverted."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: int) -> bytes:
    return mac.to_bytes(6, "big")


def arp_reply(request_sha: int, request_spa: int, own_mac: int, own_ip: int) -> bytes:
    """Build the ARP reply that `own_ip` is at `own_mac`, sent to the requester."""
    eth = mac_bytes(request_sha) + mac_bytes(own_mac) + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, ARP_REPLY)
    arp += mac_bytes(own_mac) + struct.pack("!I", own_ip)
    arp += mac_bytes(request_sha) + struct.pack("!I", request_spa)
    return eth + arp


def icmp_echo_reply(frame: bytes, l3_off: int, ihl: int, tot_len: int, own_mac: int) -> bytes:
    """Build the echo reply to the IPv4 echo request in `frame`.

    The reply carries the request's identifier, sequence number and data. IP
    options of the request are not copied.
    """
    src_mac = frame[6:12]
    ip = frame[l3_off : l3_off + tot_len]
    icmp = bytearray(ip[ihl:])
    icmp[0] = ICMP_ECHO_REPLY
    icmp[2:4] = b"\x00\x00"
    icmp[2:4] = struct.pack("!H", internet_checksum(bytes(icmp)))

    ident = ip[4:6]
    src, dst = ip[12:16], ip[16:20]
    header = bytearray(
        struct.pack("!BBH2sHBBH4s4s", 0x45, ip[1], 20 + len(icmp), ident, 0, GATEWAY_TTL, 1, 0, dst, src)
    )
    header[10:12] = struct.pack("!H", internet_checksum(bytes(header)))

    eth = src_mac + mac_bytes(own_mac) + struct.pack("!H", ETH_P_IP)
    return eth + bytes(header) + bytes(icmp)
