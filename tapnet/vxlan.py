"""VXLAN encapsulation and the VTEP peer table (RFC 7348).

Theory of operation
-------------------
Each node has one VTEP: a UDP socket on port 4789 in the node's host
namespace, seen by the datapath as the port `<node>/vxlan`. Frames on that
port are whole underlay frames (outer Ethernet, IPv4, UDP, VXLAN header,
inner frame), as tcpdump on the underlay would show them, so captures and
replays of kernel VXLAN traffic read the same way. The runtime turns a
received datagram into such a frame with `wrap_datagram` and sends an
emitted frame's UDP payload to its outer destination with `unwrap_datagram`;
the outer Ethernet addresses are the nodes' derived MACs (`02:42` + underlay
IPv4 address) and never reach a wire.

The peer table is built from cluster state, never learned from the tunnel:
for each overlay network on this node it holds every remote endpoint's IP,
MAC and VTEP (tasks on other nodes and external peers declared in the stack
file). ARP requests for a remote IP are answered locally (ARP suppression),
unicast to a remote MAC is encapsulated to its VTEP, and broadcast or unknown
unicast never enters the tunnel. `PeerTable.build` runs again whenever the
cluster changes, so no stale entry outlives a change.

Encapsulation follows the Linux kernel's vxlan driver for IPv4, so a kernel
VXLAN device can be a peer: UDP destination port 4789, source port from a
hash of the inner flow in 32768-60999, outer TTL 64, DF clear, VXLAN flags
0x08 (I flag) and the VNI in the upper 24 bits of the second word. tapnet
sends a zero UDP checksum, which RFC 7348 allows over IPv4. The kernel
accepts it, although iproute2 on recent kernels (6.18 here) turns the
kernel's own `udpcsum` on by default.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from tapnet.model import INGRESS_NETWORK, VXLAN_PORT, Cluster, mac_for_ip

VXLAN_FLAG_I = 0x08  # RFC 7348: the VNI field is valid
VXLAN_HEADER_LEN = 8
OUTER_HEADERS_LEN = 14 + 20 + 8 + VXLAN_HEADER_LEN  # 50 bytes: why overlay MTU is 1450
# Linux picks the UDP source port from the inner flow hash within the local
# port range (net.ipv4.ip_local_port_range default 32768-60999).
SOURCE_PORT_MIN = 32768
SOURCE_PORT_MAX = 60999
OUTER_TTL = 64  # Linux vxlan default for IPv4 when no ttl is configured


@dataclass
class OverlayPeers:
    """Remote endpoints of one overlay network, seen from one node."""

    network: str
    vni: int
    mac_to_vtep: dict[int, int] = field(default_factory=dict)  # remote MAC -> VTEP IPv4 (int)
    ip_to_mac: dict[int, int] = field(default_factory=dict)  # remote IPv4 -> MAC, for ARP suppression
    local_macs: set[int] = field(default_factory=set)  # endpoints on this node


@dataclass
class PeerTable:
    """The remote endpoints and VTEPs of one node's overlays, built from cluster state."""

    node: str
    vtep_ip: int
    vtep_mac: int
    by_network: dict[str, OverlayPeers]
    by_vni: dict[int, OverlayPeers]
    known_vteps: set[int]  # every VTEP a datagram may come from

    @classmethod
    def build(cls, cluster: Cluster, node: str) -> "PeerTable":
        underlay = {n.name: int(n.underlay_ip) for n in cluster.nodes}
        by_network: dict[str, OverlayPeers] = {}
        for network in cluster.networks.values():
            if network.driver != "overlay" or network.vni is None:
                continue
            by_network[network.name] = OverlayPeers(network.name, network.vni)
        for sandbox in cluster.sandboxes.values():
            for endpoint in sandbox.endpoints:
                peers = by_network.get(endpoint.network)
                if peers is None:
                    continue
                mac = int.from_bytes(endpoint.mac, "big")
                if sandbox.node == node:
                    peers.local_macs.add(mac)
                else:
                    peers.mac_to_vtep[mac] = underlay[sandbox.node]
                    peers.ip_to_mac[int(endpoint.ip)] = mac
        ingress = by_network.get(INGRESS_NETWORK)
        if ingress is not None:
            # Each node's ingress sandbox is an endpoint of the ingress network
            # that lives in the datapath; tasks reply to it across the tunnel.
            for name, address in cluster.ingress_sbox_ips.items():
                if name != node:
                    mac = int.from_bytes(mac_for_ip(address), "big")
                    ingress.mac_to_vtep[mac] = underlay[name]
                    ingress.ip_to_mac[int(address)] = mac
        known = {ip for name, ip in underlay.items() if name != node}
        for peer in cluster.external_peers:
            peers = by_network.get(peer.network)
            if peers is None:
                continue
            mac = int.from_bytes(peer.mac, "big")
            peers.mac_to_vtep[mac] = int(peer.vtep)
            peers.ip_to_mac[int(peer.ip)] = mac
            known.add(int(peer.vtep))
        vtep_ip = underlay[node]
        return cls(
            node=node,
            vtep_ip=vtep_ip,
            vtep_mac=int.from_bytes(mac_for_ip(cluster.node(node).underlay_ip), "big"),
            by_network=by_network,
            by_vni={p.vni: p for p in by_network.values()},
            known_vteps=known,
        )


def derived_mac(ip: int) -> int:
    """Docker's MAC for an IPv4 address, `02:42` + its four bytes, as a 48-bit integer."""
    return (0x0242 << 32) | ip


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def source_port(inner: bytes) -> int:
    """UDP source port for `inner`, stable per inner flow, in Linux's default range.

    The hash covers the inner Ethernet addresses and, for IPv4, the addresses
    and the first four bytes after the IP header (the ports of TCP and UDP).
    """
    key = inner[:12]
    if len(inner) >= 34 and inner[12:14] == b"\x08\x00":
        ihl = (inner[14] & 0x0F) * 4
        key += inner[26:34] + inner[14 + ihl : 14 + ihl + 4]
    span = SOURCE_PORT_MAX - SOURCE_PORT_MIN + 1
    return SOURCE_PORT_MIN + zlib.crc32(key) % span


_OUTER = struct.Struct("!12s2s2sHH4sH8sHHHH8s")  # Ethernet, IPv4 and UDP headers with the VXLAN header
# Outer header templates per tunnel, bounded: cleared when more than 4096 tunnels were seen.
_templates: dict[tuple[int, int, int, int, int], tuple[bytes, bytes, int, bytes, bytes, bytes]] = {}


def _template(vni: int, src_ip: int, dst_ip: int, src_mac: int, dst_mac: int):
    """Fixed parts of the outer headers for one tunnel, and the IPv4 header sum without length and id."""
    key = (vni, src_ip, dst_ip, src_mac, dst_mac)
    found = _templates.get(key)
    if found is None:
        macs = dst_mac.to_bytes(6, "big") + src_mac.to_bytes(6, "big")
        version_tos = bytes((0x45, 0))
        flags_ttl_proto = struct.pack("!HBB", 0, OUTER_TTL, 17)
        addresses = struct.pack("!II", src_ip, dst_ip)
        base = _sum_words(version_tos + flags_ttl_proto + addresses)
        vxlan = struct.pack("!B3xI", VXLAN_FLAG_I, vni << 8)
        found = (macs + b"\x08\x00", version_tos, base, flags_ttl_proto, addresses, vxlan)
        if len(_templates) > 4096:
            _templates.clear()
        _templates[key] = found
    return found


def _sum_words(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def encapsulate(inner: bytes, vni: int, src_ip: int, dst_ip: int, src_mac: int, dst_mac: int, ip_id: int) -> bytes:
    """Wrap `inner` in VXLAN, UDP, IPv4 and Ethernet headers for the underlay.

    The fixed header parts come from a per-tunnel template; only the lengths,
    the IPv4 identification, its checksum and the UDP source port change per
    frame.
    """
    eth, version_tos, base, flags_ttl_proto, addresses, vxlan = _template(vni, src_ip, dst_ip, src_mac, dst_mac)
    udp_len = 8 + VXLAN_HEADER_LEN + len(inner)
    total = 20 + udp_len
    ip_id &= 0xFFFF
    checksum = base + total + ip_id
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    checksum = ~((checksum & 0xFFFF) + (checksum >> 16)) & 0xFFFF
    header = _OUTER.pack(
        eth[:12], eth[12:], version_tos, total, ip_id, flags_ttl_proto, checksum, addresses,
        source_port(inner), VXLAN_PORT, udp_len, 0, vxlan,
    )
    return header + inner


def wrap_datagram(payload: bytes, src_ip: int, src_port: int, dst_ip: int, dst_port: int, ip_id: int = 0) -> bytes:
    """Build the underlay frame for a UDP datagram a VTEP socket received.

    The outer Ethernet addresses are the derived MACs of the two addresses;
    the UDP checksum is zero, as for VXLAN from the Linux kernel.
    """
    udp = struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0)
    ip = bytearray(
        struct.pack("!BBHHHBBHII", 0x45, 0, 28 + len(payload), ip_id & 0xFFFF, 0, OUTER_TTL, 17, 0, src_ip, dst_ip)
    )
    ip[10:12] = struct.pack("!H", _checksum(bytes(ip)))
    eth = derived_mac(dst_ip).to_bytes(6, "big") + derived_mac(src_ip).to_bytes(6, "big") + b"\x08\x00"
    return eth + bytes(ip) + udp + payload


def unwrap_datagram(frame: bytes) -> tuple[int, int, bytes]:
    """Return (destination IPv4, destination UDP port, UDP payload) of an emitted underlay frame."""
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    dst_ip = int.from_bytes(frame[30:34], "big")
    dst_port = int.from_bytes(frame[udp + 2 : udp + 4], "big")
    length = int.from_bytes(frame[udp + 4 : udp + 6], "big")
    return dst_ip, dst_port, frame[udp + 8 : udp + length]
