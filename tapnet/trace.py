"""Trace records: the story of one frame through the datapath.

A record is built only when the caller asks for tracing, so tracing off costs
one `if` per decision. The datapath stamps each record with the `now` it was
given; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TraceEvent:
    stage: str  # parse, switch, gateway, ... (the module that decided)
    decision: str  # learn, fdb-hit, flood, arp-reply, echo-reply, drop, ...
    detail: str = ""

    def format(self) -> str:
        text = f"{self.stage}: {self.decision}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class TraceRecord:
    id: int
    time: float
    node: str
    ingress: str  # port name
    summary: str  # the frame in tcpdump's words
    events: list[TraceEvent] = field(default_factory=list)
    verdict: str = ""  # deliver, flood, reply, drop
    reason: str | None = None  # reason code when dropped
    egress: list[str] = field(default_factory=list)

    def add(self, stage: str, decision: str, detail: str = "") -> None:
        self.events.append(TraceEvent(stage, decision, detail))

    def format(self) -> str:
        """One line: id, ingress, frame, each stage's decision, verdict."""
        steps = "; ".join(e.format() for e in self.events)
        verdict = self.verdict
        if self.reason:
            verdict += f" reason={self.reason}"
        if self.egress:
            verdict += " to " + ",".join(self.egress)
        return f"trace {self.id} {self.ingress}: {self.summary} | {steps} | verdict: {verdict}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "time": self.time,
            "node": self.node,
            "ingress": self.ingress,
            "summary": self.summary,
            "events": [{"stage": e.stage, "decision": e.decision, "detail": e.detail} for e in self.events],
            "verdict": self.verdict,
            "reason": self.reason,
            "egress": list(self.egress),
        }


def describe(cols, i: int) -> str:
    """Summarise parsed frame `i` in tcpdump's words, from the parser's columns."""
    from tapnet import parse

    flags = cols.flags[i]
    if cols.status[i]:
        return f"malformed frame, ethertype {cols.ethertype[i]:#06x}"
    if flags & parse.IS_ARP:
        op = cols.arp_op[i]
        if op == 1:
            return f"ARP, Request who-has {_ip(cols.arp_tpa[i])} tell {_ip(cols.arp_spa[i])}"
        if op == 2:
            return f"ARP, Reply {_ip(cols.arp_spa[i])} is-at {_mac(cols.arp_sha[i])}"
        return f"ARP, op {op}"
    if flags & parse.IS_IPV4:
        src, dst = _ip(cols.ip_src[i]), _ip(cols.ip_dst[i])
        if flags & parse.IS_TCP:
            return (
                f"IP {src}.{cols.sport[i]} > {dst}.{cols.dport[i]}: "
                f"Flags {tcp_flags(cols.tcp_flags[i])}, length {cols.payload_len[i]}"
            )
        if flags & parse.IS_UDP:
            return f"IP {src}.{cols.sport[i]} > {dst}.{cols.dport[i]}: UDP, length {cols.payload_len[i]}"
        if flags & parse.IS_ICMP:
            kind = ICMP_TYPES.get(cols.icmp_type[i], f"type {cols.icmp_type[i]}")
            return f"IP {src} > {dst}: ICMP {kind}, id {cols.icmp_id[i]}, seq {cols.icmp_seq[i]}"
        if flags & parse.IS_FRAGMENT:
            return f"IP {src} > {dst}: fragment, proto {cols.ip_proto[i]}"
        return f"IP {src} > {dst}: proto {cols.ip_proto[i]}"
    if flags & parse.IS_IPV6:
        return f"IP6, next-header {cols.ip6_next[i]}"
    return f"ethertype {cols.ethertype[i]:#06x}"


ICMP_TYPES = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}


def _ip(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}.{value & 0xFF}"


def _mac(value: int) -> str:
    return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))


def tcp_flags(value: int) -> str:
    """TCP flags the way tcpdump prints them: [S], [S.], [P.], [F.], [R]."""
    text = "".join(letter for bit, letter in ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x20, "U")) if value & bit)
    if value & 0x10:
        text += "."
    return f"[{text or 'none'}]"
