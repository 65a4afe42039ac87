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


def describe(rec) -> str:
    """Summarise a parsed frame in tcpdump's words, from its parser record."""
    from tapnet import parse

    def ip(value: int) -> str:
        return ".".join(str((int(value) >> shift) & 0xFF) for shift in (24, 16, 8, 0))

    flags = int(rec["flags"])
    if int(rec["status"]):
        return f"malformed frame, {int(rec['ethertype']):#06x}"
    if flags & parse.IS_ARP:
        op = int(rec["arp_op"])
        if op == 1:
            return f"ARP, Request who-has {ip(rec['arp_tpa'])} tell {ip(rec['arp_spa'])}"
        if op == 2:
            mac = ":".join(f"{b:02x}" for b in int(rec["arp_sha"]).to_bytes(6, "big"))
            return f"ARP, Reply {ip(rec['arp_spa'])} is-at {mac}"
        return f"ARP, op {op}"
    if flags & parse.IS_IPV4:
        head = f"IP {ip(rec['ip_src'])}"
        tail = f"{ip(rec['ip_dst'])}"
        if flags & parse.IS_TCP:
            return f"{head}.{int(rec['sport'])} > {tail}.{int(rec['dport'])}: TCP flags {tcp_flags(int(rec['tcp_flags']))}, length {int(rec['payload_len'])}"
        if flags & parse.IS_UDP:
            return f"{head}.{int(rec['sport'])} > {tail}.{int(rec['dport'])}: UDP, length {int(rec['payload_len'])}"
        if flags & parse.IS_ICMP:
            kind = {0: "echo reply", 8: "echo request", 3: "unreachable", 11: "time exceeded"}.get(
                int(rec["icmp_type"]), f"type {int(rec['icmp_type'])}"
            )
            return f"{head} > {tail}: ICMP {kind}, id {int(rec['icmp_id'])}, seq {int(rec['icmp_seq'])}"
        return f"{head} > {tail}: proto {int(rec['ip_proto'])}"
    if flags & parse.IS_IPV6:
        return f"IP6 next-header {int(rec['ip6_next'])}"
    return f"ethertype {int(rec['ethertype']):#06x}"


def tcp_flags(value: int) -> str:
    """TCP flags the way tcpdump prints them: [S], [S.], [P.], [F.], [R]."""
    text = "".join(letter for bit, letter in ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x20, "U")) if value & bit)
    if value & 0x10:
        text += "."
    return f"[{text or 'none'}]"
