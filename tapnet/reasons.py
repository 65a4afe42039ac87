"""Reason codes for every drop and for notable decisions.

One table serves the parser (which stores the number), the datapath's
counters, the trace, `docs/reasons.md` and the tests. Codes are stable: never
renumber or rename one, only append.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    number: int
    code: str
    meaning: str


_TABLE = (
    Reason(0, "ok", "not dropped"),
    # Set by the numba parser (tapnet/parse.py).
    Reason(1, "malformed-ethernet", "frame shorter than an Ethernet header (14 bytes)"),
    Reason(2, "malformed-vlan", "802.1Q tag truncated"),
    Reason(3, "malformed-arp", "ARP header truncated or not Ethernet/IPv4 (htype 1, ptype 0x0800, hlen 6, plen 4)"),
    Reason(4, "malformed-ipv4", "IPv4 header truncated, version not 4, IHL below 5, or total length inconsistent with the frame"),
    Reason(5, "malformed-ipv6", "IPv6 fixed header truncated, version not 6, or payload length beyond the frame"),
    Reason(6, "malformed-icmp", "ICMP header truncated"),
    Reason(7, "malformed-udp", "UDP header truncated or its length inconsistent with the IP payload"),
    Reason(8, "malformed-tcp", "TCP header truncated or data offset below 5 or beyond the segment"),
    Reason(9, "malformed-vxlan", "VXLAN header or inner Ethernet header truncated"),
    Reason(10, "malformed-vnet-hdr", "virtio-net header inconsistent with the frame (checksum or GSO fields out of range)"),
    # Set by the datapath stages.
    Reason(20, "unknown-port", "frame from a port this node does not have"),
    Reason(21, "invalid-src-mac", "source MAC is multicast, broadcast or all zeros"),
    Reason(22, "same-port", "destination MAC was learned on the port the frame came from"),
    Reason(23, "isolation", "destination belongs to another network; networks are isolated"),
    Reason(24, "no-egress", "destination outside the cluster; tapnet has no egress"),
    Reason(25, "internal", "internal network: destination outside the network's subnet"),
    Reason(26, "gateway-no-service", "packet for the gateway address that no gateway service handles"),
    Reason(27, "ip-fragment", "IPv4 fragment addressed to the gateway; tapnet does not reassemble"),
    Reason(28, "ttl-exceeded", "IPv4 TTL would reach zero when routed by the gateway"),
    Reason(29, "unsupported-ethertype", "frame to the gateway MAC that is neither ARP nor IPv4"),
    Reason(30, "no-port", "no local port remained to flood to"),
    # Set by the VXLAN stage (tapnet/vxlan.py).
    Reason(50, "not-vxlan", "frame on a VTEP port that is not VXLAN over UDP"),
    Reason(51, "vxlan-unknown-vtep", "VXLAN datagram from an address that is not a known VTEP"),
    Reason(52, "vxlan-i-flag-clear", "VXLAN header without the I flag: the VNI is not valid (RFC 7348)"),
    Reason(53, "vxlan-unknown-vni", "VXLAN datagram for a VNI of no overlay network on this node"),
    Reason(54, "vxlan-unknown-mac", "inner frame for a MAC that is not an endpoint of that network on this node"),
    Reason(55, "vxlan-broadcast", "inner broadcast or multicast frame: broadcast does not cross the tunnel"),
    Reason(56, "offload-failed", "superframe or partial checksum that could not be segmented or completed"),
    # Set by the DNS resolver (tapnet/dns.py, tapnet/dns_tcp.py).
    Reason(60, "dns-malformed", "DNS message shorter than its 12-byte header, or an upstream reply that does not parse"),
    Reason(61, "dns-not-query", "DNS message to the resolver with QR set: a response, never answered"),
    Reason(62, "dns-unknown-sandbox", "DNS query from a port whose sandbox is no longer in the cluster model, or an upstream answer for such a client"),
    Reason(63, "dns-bad-checksum", "UDP or TCP checksum of a packet to the resolver is wrong"),
    Reason(64, "dns-upstream-unexpected", "frame on the upstream port that answers no forwarded query (address, port, id or question differ)"),
    Reason(65, "dns-busy", "table of forwarded queries or of DNS TCP connections full"),
    Reason(66, "dns-tcp-unexpected", "TCP segment to the resolver that fits no connection state (answered by RST or ACK where TCP asks for one)"),
    # Set by the load balancer and NAT stages (tapnet/lb.py, tapnet/nat.py).
    Reason(80, "vip-no-service", "packet for a VIP that is not TCP, UDP or ICMP echo"),
    Reason(81, "vip-no-connection", "TCP segment for a VIP that is neither a SYN nor part of a tracked connection"),
    Reason(82, "no-backend", "new connection to a VIP or published port whose service has no live task"),
    Reason(83, "backend-gone", "packet of a connection whose task was removed; the entry is left to expire"),
    Reason(84, "conntrack-full", "conntrack table full of connections that saw replies: new flow refused"),
    Reason(85, "ingress-port-closed", "packet to a task's ingress address on a port the task does not publish"),
    Reason(86, "nat-failed", "headers too short or not translatable for NAT"),
    # Counted by the live runtime around the datapath (tapnet/runtime.py).
    Reason(70, "tap-tx-full", "write to a TAP returned EAGAIN: the sandbox's receive queue is full"),
    Reason(71, "tap-tx-error", "write to a TAP failed otherwise, for example on a bad virtio-net header"),
    Reason(72, "tap-rx-short", "read from a TAP returned less than a virtio-net header"),
    Reason(73, "no-tap", "the datapath emitted to a port that has no TAP in this process"),
    Reason(74, "datapath-error", "the datapath raised on a batch; the batch is lost and the error logged"),
    # Counted by the nodes' UDP-socket ports (tapnet/underlay.py).
    Reason(75, "udp-tx-full", "sending on a VTEP or DNS upstream socket returned EAGAIN: its send buffer is full"),
    Reason(76, "udp-tx-error", "sending on a VTEP or DNS upstream socket failed otherwise, for example ENETUNREACH"),
    # Decisions that are counted but do not drop the frame.
    Reason(40, "fdb-full", "MAC table of the network full: source MAC not learned, frame still forwarded"),
    Reason(67, "dns-upstream-timeout", "DNS upstream did not answer in time: the next upstream is asked, or the client gets SERVFAIL"),
    Reason(68, "dns-upstream-failed", "DNS upstream answered SERVFAIL, REFUSED or another error: the next upstream is asked, or the client gets SERVFAIL"),
    Reason(69, "dns-tcp-abort", "DNS TCP connection reset by the resolver: no ACK after retransmissions, or no query in time"),
)

# Reasons that count a decision but never a drop.
NOT_DROPS = frozenset({"ok", "fdb-full", "dns-upstream-timeout", "dns-upstream-failed", "dns-tcp-abort"})

BY_CODE: dict[str, Reason] = {r.code: r for r in _TABLE}
BY_NUMBER: dict[int, Reason] = {r.number: r for r in _TABLE}

OK = 0
MALFORMED_ETHERNET = 1
MALFORMED_VLAN = 2
MALFORMED_ARP = 3
MALFORMED_IPV4 = 4
MALFORMED_IPV6 = 5
MALFORMED_ICMP = 6
MALFORMED_UDP = 7
MALFORMED_TCP = 8
MALFORMED_VXLAN = 9
MALFORMED_VNET_HDR = 10


def code_of(number: int) -> str:
    return BY_NUMBER[number].code


def all_reasons() -> tuple[Reason, ...]:
    return _TABLE


def markdown_table() -> str:
    """The reason table as Markdown, as `docs/reasons.md` shows it."""
    lines = ["| number | code | meaning |", "|---:|---|---|"]
    for reason in _TABLE:
        lines.append(f"| {reason.number} | `{reason.code}` | {reason.meaning} |")
    return "\n".join(lines) + "\n"


DOC_HEADER = """# Reason codes

Every frame the datapath drops is counted under a reason code, per port
(`tapnet stats`, `tapnet replay --summary`) and named in its trace record.
A few codes count decisions that do not drop the frame (`fdb-full`,
`dns-upstream-timeout`, `dns-upstream-failed`, `dns-tcp-abort`).
Codes are stable: they are never renumbered or renamed, only added.
This page is generated from `tapnet/reasons.py` by
`python -m tapnet.reasons > docs/reasons.md`; a test checks that the two agree.

"""

if __name__ == "__main__":
    print(DOC_HEADER + markdown_table(), end="")
