"""Compare two captures frame by frame, per port, ignoring named fields.

`tapnet replay --expect` and `tapnet.testing` use this to check a replay
against an earlier output. Ports are matched by interface name, and frames
by their index on that port. Frames with equal bytes, timestamps and
comments need no further work. Only frames that differ are dissected with
scapy, which is imported on first use.

Fields carry the display-filter names of tshark and Wireshark (`ip.ttl`,
`tcp.seq`, `frame.comment`), so a difference reads as it would in Wireshark
and `--ignore` takes the names Wireshark users already use. A header can
occur twice in a frame, like the outer and inner IPv4 headers of a VXLAN
frame. Its second occurrence is reported as `ip.src#2`, and ignoring
`ip.src` ignores both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from tapnet.pcapio import Capture

# tshark field name -> (scapy layer class name, scapy field name). Every name
# here is a field of tshark 4.0 (`tshark -G fields`), except `ip.options`:
# tshark has only per-option fields, so tapnet names the whole option list.
LAYER_FIELDS: dict[str, tuple[str, str]] = {
    "eth.dst": ("Ether", "dst"),
    "eth.src": ("Ether", "src"),
    "eth.type": ("Ether", "type"),
    "eth.padding": ("Padding", "load"),
    "vlan.priority": ("Dot1Q", "prio"),
    "vlan.dei": ("Dot1Q", "dei"),
    "vlan.id": ("Dot1Q", "vlan"),
    "vlan.etype": ("Dot1Q", "type"),
    "arp.hw.type": ("ARP", "hwtype"),
    "arp.proto.type": ("ARP", "ptype"),
    "arp.hw.size": ("ARP", "hwlen"),
    "arp.proto.size": ("ARP", "plen"),
    "arp.opcode": ("ARP", "op"),
    "arp.src.hw_mac": ("ARP", "hwsrc"),
    "arp.src.proto_ipv4": ("ARP", "psrc"),
    "arp.dst.hw_mac": ("ARP", "hwdst"),
    "arp.dst.proto_ipv4": ("ARP", "pdst"),
    "ip.version": ("IP", "version"),
    "ip.hdr_len": ("IP", "ihl"),
    "ip.dsfield": ("IP", "tos"),
    "ip.len": ("IP", "len"),
    "ip.id": ("IP", "id"),
    "ip.flags": ("IP", "flags"),
    "ip.frag_offset": ("IP", "frag"),
    "ip.ttl": ("IP", "ttl"),
    "ip.proto": ("IP", "proto"),
    "ip.checksum": ("IP", "chksum"),
    "ip.src": ("IP", "src"),
    "ip.dst": ("IP", "dst"),
    "ip.options": ("IP", "options"),
    "ipv6.version": ("IPv6", "version"),
    "ipv6.tclass": ("IPv6", "tc"),
    "ipv6.flow": ("IPv6", "fl"),
    "ipv6.plen": ("IPv6", "plen"),
    "ipv6.nxt": ("IPv6", "nh"),
    "ipv6.hlim": ("IPv6", "hlim"),
    "ipv6.src": ("IPv6", "src"),
    "ipv6.dst": ("IPv6", "dst"),
    "icmp.type": ("ICMP", "type"),
    "icmp.code": ("ICMP", "code"),
    "icmp.checksum": ("ICMP", "chksum"),
    "icmp.ident": ("ICMP", "id"),
    "icmp.seq": ("ICMP", "seq"),
    "icmp.originate_timestamp": ("ICMP", "ts_ori"),
    "icmp.receive_timestamp": ("ICMP", "ts_rx"),
    "icmp.transmit_timestamp": ("ICMP", "ts_tx"),
    "icmp.redir_gw": ("ICMP", "gw"),
    "icmp.pointer": ("ICMP", "ptr"),
    "icmp.reserved": ("ICMP", "reserved"),
    "icmp.length": ("ICMP", "length"),
    "icmp.address_mask": ("ICMP", "addr_mask"),
    "icmp.mtu": ("ICMP", "nexthopmtu"),
    "icmp.unused": ("ICMP", "unused"),
    "icmp.ext": ("ICMP", "ext"),
    "udp.srcport": ("UDP", "sport"),
    "udp.dstport": ("UDP", "dport"),
    "udp.length": ("UDP", "len"),
    "udp.checksum": ("UDP", "chksum"),
    "tcp.srcport": ("TCP", "sport"),
    "tcp.dstport": ("TCP", "dport"),
    "tcp.seq": ("TCP", "seq"),
    "tcp.ack": ("TCP", "ack"),
    "tcp.hdr_len": ("TCP", "dataofs"),
    "tcp.flags.res": ("TCP", "reserved"),
    "tcp.flags": ("TCP", "flags"),
    "tcp.window_size_value": ("TCP", "window"),
    "tcp.checksum": ("TCP", "chksum"),
    "tcp.urgent_pointer": ("TCP", "urgptr"),
    "tcp.options": ("TCP", "options"),
    "vxlan.flags": ("VXLAN", "flags"),
    "vxlan.reserved_16": ("VXLAN", "reserved0"),
    "vxlan.next_proto": ("VXLAN", "NextProtocol"),
    "vxlan.gbp": ("VXLAN", "gpid"),
    "vxlan.vni": ("VXLAN", "vni"),
    "vxlan.reserved8": ("VXLAN", "reserved2"),
    "dns.length": ("DNS", "length"),
    "dns.id": ("DNS", "id"),
    "dns.flags.response": ("DNS", "qr"),
    "dns.flags.opcode": ("DNS", "opcode"),
    "dns.flags.authoritative": ("DNS", "aa"),
    "dns.flags.truncated": ("DNS", "tc"),
    "dns.flags.recdesired": ("DNS", "rd"),
    "dns.flags.recavail": ("DNS", "ra"),
    "dns.flags.z": ("DNS", "z"),
    "dns.flags.authenticated": ("DNS", "ad"),
    "dns.flags.checkdisable": ("DNS", "cd"),
    "dns.flags.rcode": ("DNS", "rcode"),
    "dns.count.queries": ("DNS", "qdcount"),
    "dns.count.answers": ("DNS", "ancount"),
    "dns.count.auth_rr": ("DNS", "nscount"),
    "dns.count.add_rr": ("DNS", "arcount"),
    "dns.qry.name": ("DNSQR", "qname"),
    "dns.qry.type": ("DNSQR", "qtype"),
    "dns.qry.qu": ("DNSQR", "unicastresponse"),
    "dns.qry.class": ("DNSQR", "qclass"),
    "dns.resp.name": ("DNSRR", "rrname"),
    "dns.resp.type": ("DNSRR", "type"),
    "dns.resp.cache_flush": ("DNSRR", "cacheflush"),
    "dns.resp.class": ("DNSRR", "rclass"),
    "dns.resp.ttl": ("DNSRR", "ttl"),
    "dns.resp.len": ("DNSRR", "rdlen"),
    # scapy keeps every record's data in `rdata`; differences name it by record
    # type (_RDATA_NAMES), and ignoring any of those names ignores all of them.
    "dns.a": ("DNSRR", "rdata"),
    "dns.rr.udp_payload_size": ("DNSRROPT", "rclass"),
    "dns.resp.ext_rcode": ("DNSRROPT", "extrcode"),
    "dns.resp.edns0_version": ("DNSRROPT", "version"),
    "dns.resp.z": ("DNSRROPT", "z"),
    "dns.opt": ("DNSRROPT", "rdata"),
    "data.data": ("Raw", "load"),
}

# Fields of the capture record rather than of the frame.
FRAME_FIELDS = ("frame.time", "frame.len", "frame.comment")

# Other names tshark accepts for the same field.
ALIASES = {
    "tcp.seq_raw": "tcp.seq",
    "tcp.ack_raw": "tcp.ack",
    "frame.time_epoch": "frame.time",
    "pkt_comment": "frame.comment",
    "dns.aaaa": "dns.a",
    "dns.ptr.domain_name": "dns.a",
    "dns.cname": "dns.a",
    "dns.ns": "dns.a",
    "dns.txt": "dns.a",
    "dns.srv.target": "dns.a",
    "dns.data": "dns.a",
}

# tshark's name for a DNS record's data, by record type (A, NS, CNAME, PTR, TXT, AAAA, SRV).
_RDATA_NAMES = {1: "dns.a", 2: "dns.ns", 5: "dns.cname", 12: "dns.ptr.domain_name", 16: "dns.txt", 28: "dns.aaaa",
                33: "dns.srv.target"}

# The tshark protocol prefix of each scapy layer, for fields the table lacks.
_PROTOCOL_PREFIX = {
    "Ether": "eth", "Dot1Q": "vlan", "ARP": "arp", "IP": "ip", "IPv6": "ipv6", "ICMP": "icmp", "UDP": "udp",
    "TCP": "tcp", "VXLAN": "vxlan", "DNS": "dns", "DNSQR": "dns.qry", "DNSRR": "dns.resp", "DNSRROPT": "dns.resp",
    "Raw": "data", "Padding": "eth.padding",
}

_BY_SCAPY = {scapy: name for name, scapy in LAYER_FIELDS.items()}


def known_fields() -> list[str]:
    return sorted([*FRAME_FIELDS, *LAYER_FIELDS, *ALIASES])


def canonical_field(name: str) -> str:
    """Return the field's canonical tshark name; raises ValueError naming the known fields."""
    name = ALIASES.get(name, name)
    if name in LAYER_FIELDS or name in FRAME_FIELDS:
        return name
    raise ValueError(f"unknown field {name!r} for --ignore; known fields: {', '.join(known_fields())}")


@dataclass(frozen=True)
class FieldDifference:
    name: str  # tshark name, with `#2` for a header's second occurrence
    expected: str
    actual: str


@dataclass
class FrameDifference:
    port: str
    index: int  # the frame's index among the frames of its port, from 0
    fields: list[FieldDifference]
    expected_summary: str
    actual_summary: str


@dataclass(frozen=True)
class CountMismatch:
    port: str
    expected: int
    actual: int

    def format(self) -> str:
        if self.actual < self.expected:
            missing = self.expected - self.actual
            return f"port {self.port}: {missing} frame(s) missing (expected {self.expected}, got {self.actual})"
        extra = self.actual - self.expected
        return f"port {self.port}: {extra} extra frame(s) (expected {self.expected}, got {self.actual})"


@dataclass
class Comparison:
    first: FrameDifference | None = None
    differing_frames: int = 0
    counts: list[CountMismatch] = field(default_factory=list)
    compared_frames: int = 0

    @property
    def matches(self) -> bool:
        return self.first is None and not self.counts

    def format(self) -> str:
        """Describe the result: the first differing frame in detail, then per-port counts."""
        if self.matches:
            return f"output matches the expected capture ({self.compared_frames} frames)"
        lines = []
        if self.first is not None:
            first = self.first
            lines.append(f"first differing frame: port {first.port}, frame {first.index} on that port")
            for difference in first.fields:
                lines.append(f"  {difference.name}: expected {difference.expected}, got {difference.actual}")
            lines.append(f"  expected frame: {first.expected_summary}")
            lines.append(f"  actual frame:   {first.actual_summary}")
            lines.append(f"{self.differing_frames} of {self.compared_frames} compared frames differ")
        for mismatch in self.counts:
            lines.append(mismatch.format())
        return "\n".join(lines)


def compare_captures(expected: Capture, actual: Capture, ignore: tuple[str, ...] | list[str] = ()) -> Comparison:
    """Compare `actual` with `expected` port by port; frames pair up by their index on the port."""
    ignored = {canonical_field(name) for name in ignore}
    expected_ports = _frames_by_port(expected)
    actual_ports = _frames_by_port(actual)
    result = Comparison()

    # Walk the expected file in its own order, so "first" means first in that file.
    seen_on_port: dict[str, int] = {}
    for i in range(len(expected)):
        port = _port_name(expected, i)
        index = seen_on_port.get(port, 0)
        seen_on_port[port] = index + 1
        actual_frames = actual_ports.get(port, [])
        if index >= len(actual_frames):
            continue
        result.compared_frames += 1
        differences = _frame_differences(expected, i, actual, actual_frames[index], ignored)
        if not differences:
            continue
        result.differing_frames += 1
        if result.first is None:
            result.first = FrameDifference(
                port, index, differences, _summary(expected.frame(i)), _summary(actual.frame(actual_frames[index]))
            )

    for port in [*expected_ports, *(p for p in actual_ports if p not in expected_ports)]:
        expected_count = len(expected_ports.get(port, []))
        actual_count = len(actual_ports.get(port, []))
        if expected_count != actual_count:
            result.counts.append(CountMismatch(port, expected_count, actual_count))
    return result


def _port_name(capture: Capture, i: int) -> str:
    name = capture.interface_name(i)
    return name if name is not None else f"interface {int(capture.interface_ids[i])}"


def _frames_by_port(capture: Capture) -> dict[str, list[int]]:
    """Frame indices per interface name, in file order; interfaces sharing a name share a port."""
    ports: dict[str, list[int]] = {}
    for i in range(len(capture)):
        ports.setdefault(_port_name(capture, i), []).append(i)
    return ports


def _frame_differences(
    expected: Capture, i: int, actual: Capture, j: int, ignored: set[str]
) -> list[FieldDifference]:
    differences = []

    expected_time, actual_time = _exact_time(expected, i), _exact_time(actual, j)
    if expected_time != actual_time and "frame.time" not in ignored:
        differences.append(FieldDifference("frame.time", _format_time(expected_time), _format_time(actual_time)))
    expected_comment, actual_comment = expected.comment(i), actual.comment(j)
    if expected_comment != actual_comment and "frame.comment" not in ignored:
        differences.append(FieldDifference("frame.comment", repr(expected_comment), repr(actual_comment)))

    expected_frame, actual_frame = expected.frame(i), actual.frame(j)
    if expected_frame == actual_frame:
        return differences
    if len(expected_frame) != len(actual_frame) and "frame.len" not in ignored:
        differences.append(FieldDifference("frame.len", str(len(expected_frame)), str(len(actual_frame))))

    layer_differences = diff_frames(expected_frame, actual_frame)
    if not layer_differences:
        # NOTE: scapy found no field that differs although the bytes do; report the bytes.
        layer_differences = [FieldDifference("frame", expected_frame.hex(), actual_frame.hex())]
    for difference in layer_differences:
        base = difference.name.split("#")[0]
        if ALIASES.get(base, base) not in ignored:
            differences.append(difference)
    return differences


def _exact_time(capture: Capture, i: int) -> Fraction:
    ticks, per_second = capture.time_ticks(i)
    return Fraction(ticks, per_second)


def _format_time(time: Fraction) -> str:
    whole = time.numerator // time.denominator
    nanoseconds = round((time - whole) * 10**9)
    return f"{whole}.{nanoseconds:09d}"


def diff_frames(expected: bytes, actual: bytes) -> list[FieldDifference]:
    """Dissect both Ethernet frames with scapy and list the fields whose values differ, in header order."""
    expected_fields = flatten_frame(expected)
    actual_fields = flatten_frame(actual)
    differences = []
    for name, (value, text) in expected_fields.items():
        other = actual_fields.get(name)
        if other is None:
            differences.append(FieldDifference(name, text, "(absent)"))
        elif other[0] != value:
            differences.append(FieldDifference(name, text, other[1]))
    for name, (_value, text) in actual_fields.items():
        if name not in expected_fields:
            differences.append(FieldDifference(name, "(absent)", text))
    return differences


def flatten_frame(frame: bytes) -> dict[str, tuple[object, str]]:
    """Map each field of the dissected frame (tshark name, `#n` for repeats) to (value, display text)."""
    import scapy.layers.dns  # noqa: F401  (binds UDP port 53 to DNS, so dns.* fields dissect)
    import scapy.layers.vxlan  # noqa: F401  (binds UDP port 4789 to VXLAN)
    from scapy.layers.l2 import Ether

    fields: dict[str, tuple[object, str]] = {}
    _flatten_packet(Ether(frame), fields)
    return fields


def _flatten_packet(packet, fields: dict[str, tuple[object, str]]) -> None:
    from scapy.fields import PacketListField
    from scapy.packet import NoPayload, Packet

    layer = packet
    while layer is not None and not isinstance(layer, NoPayload):
        layer_name = type(layer).__name__
        for field_desc in layer.fields_desc:
            if field_desc.name not in layer.fields:
                continue
            value = layer.fields[field_desc.name]
            if isinstance(field_desc, PacketListField):
                for item in value or ():  # DNS sections and the like: records in order
                    _flatten_packet(item, fields)
                continue
            if isinstance(value, Packet):
                _flatten_packet(value, fields)
                continue
            name = _field_name(layer, layer_name, field_desc.name)
            key = name
            occurrence = 1
            while key in fields:
                occurrence += 1
                key = f"{name}#{occurrence}"
            fields[key] = (value, _display(layer, field_desc, value))
        layer = layer.payload


def _field_name(layer, layer_name: str, field_name: str) -> str:
    if layer_name == "DNSRR" and field_name == "rdata":
        return _RDATA_NAMES.get(int(layer.fields.get("type", 0)), "dns.data")
    name = _BY_SCAPY.get((layer_name, field_name))
    if name is not None:
        return name
    prefix = _PROTOCOL_PREFIX.get(layer_name, layer_name.lower())
    return f"{prefix}.{field_name}"


def _display(layer, field_desc, value) -> str:
    if isinstance(value, bytes):
        return value.hex() if value else "(empty)"
    try:
        text = field_desc.i2repr(layer, value)
    except Exception:  # noqa: BLE001 - scapy's display code varies by field; fall back to repr
        text = repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and str(value) != text.strip():
        return f"{text} ({value})"
    return str(text)


def _summary(frame: bytes) -> str:
    from scapy.layers.l2 import Ether

    return Ether(frame).summary()
