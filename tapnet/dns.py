"""The embedded DNS resolver: service discovery at every network's gateway.

Theory of operation
-------------------
Docker's resolver listens on 127.0.0.11 inside each container, which a TAP
never sees. tapnet answers at each network's gateway address (`.1`) instead,
on UDP and TCP port 53. A sandbox's resolv.conf names the resolver of its
first network, and whichever gateway a query reaches, the answer covers all
of the querying sandbox's networks and no other.

`Resolver` is one node's resolver, installed as an L3 stage of the node's
datapath (it sees frames sent to a gateway MAC) and as the handler of the
node's `upstream` port. It keeps no copy of the names: every query reads
`datapath.fabric.cluster`, so a task removed from the model is gone from the
next answer, whether the model changed through `Fabric.update_cluster` or in
place.

Names resolve as Docker's embedded DNS resolves them (libnetwork,
`Sandbox.ResolveName` and `resolver.go`), on the querying sandbox's networks
in endpoint order, leaving out ingress, where the first network with a match
answers:

| name | A answer |
|---|---|
| `<service>`, or one of its network aliases | the VIP (endpoint mode `vip`), or every task address (`dnsrr`) |
| `tasks.<service>`, `tasks.<alias>` | every task address |
| `<sandbox>` (`redis.2`) | the sandbox's address |
| any of these followed by `.<network>` | the same, looked up on that network only |

Case does not matter (ASCII only, as RFC 4343 says). When one name means
two things on a network, a service name wins over an alias, and an alias
over a sandbox name. An answer with several addresses is shuffled with the
datapath's generator. TTL is 600 s. A known name without an IPv6 address
gets NOERROR with no answer to AAAA, and so does any other type except PTR.
PTR for a task address returns `<sandbox>.<network>.`; a VIP or a free
address of a cluster subnet gets NXDOMAIN and is never forwarded.

Unknown names go to the upstream servers of `x-tapnet` (`Cluster.dns_upstreams`,
at most three), one after the other, each with `UPSTREAM_TIMEOUT`. They are
sent from the node's underlay address on the `<node>/upstream` port, whose
frames are whole Ethernet/IPv4/UDP frames; the runtime sends their payload
from a socket in the node's host namespace (see `vxlan.wrap_datagram`). An
upstream that times out, answers an error code other than NXDOMAIN
(SERVFAIL, REFUSED, ...), or sends a malformed reply passes the query to the
next one. When none is left, the client gets SERVFAIL. With no upstream, or for a sandbox whose networks are all internal
(or ingress), unknown names get NXDOMAIN.

A UDP answer larger than the client's limit keeps the answer records that fit
and sets TC. The limit is 512 bytes, or the EDNS0 size the client offers, but
never more than the endpoint MTU allows without fragmentation. TCP
(`tapnet.dns_tcp`) carries answers up to 65535 bytes.

Every frame the resolver takes ends in an answer, a forward, or a drop with
a reason code (`dns-*` in `tapnet.reasons`). All time comes from `now`, and
all chance (answer order, TCP initial sequence numbers, upstream query ids
and source ports) from the datapath's generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.reversename
import dns.rrset
import numpy as np

from tapnet import frames, parse, vxlan
from tapnet.dns_tcp import Addressing, Connection, Segment, TcpResponder
from tapnet.model import Cluster, IPv4Address, Sandbox
from tapnet.trace import TraceRecord

log = logging.getLogger(__name__)

# Values from libnetwork's resolver (moby, libnetwork/resolver.go), named after its constants.
DNS_PORT = 53
ANSWER_TTL = 600  # seconds (respTTL)
UDP_ANSWER_SIZE = 512  # RFC 1035, section 4.2.1 (defaultRespSize)
TCP_ANSWER_SIZE = 65535  # the most the two-byte length prefix of DNS over TCP can give
UPSTREAM_TIMEOUT = 4.0  # seconds per upstream (extIOTimeout)
MAX_UPSTREAMS = 3  # upstreams tried per query (maxExtDNS)
MAX_PENDING = 1024  # forwarded queries awaiting a reply, per node (maxConcurrent)
# EDNS0 size offered upstream for a query that came over TCP, so that a large
# answer can come back over UDP. NOTE: 4096 bytes is tapnet's choice, and a
# larger upstream answer comes back with TC set because tapnet never uses TCP upstream.
UPSTREAM_TCP_PAYLOAD = 4096
# Source ports of forwarded queries: Linux's default ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999).
SOURCE_PORT_MIN = 32768
SOURCE_PORT_MAX = 60999
IPV4_UDP_HEADERS = 28  # an IPv4 header without options and a UDP header
IPV4_TCP_HEADERS = 40  # an IPv4 header and a TCP header, both without options
HEADER_LEN = 12  # the DNS header (RFC 1035, section 4.1.1)
TRACE_ADDRESSES = 8  # addresses of an answer named in its trace line
FLAG_QR = 0x8000  # the query/response bit of the header's flags word
# Upstream answer codes relayed to the client; any other moves on to the next upstream.
RELAYED_RCODES = (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
# Errors dnspython raises for wire data it cannot read (all derive from DNSException).
WIRE_ERRORS = (dns.exception.DNSException,)

IN = dns.rdataclass.IN
A = dns.rdatatype.A
PTR = dns.rdatatype.PTR


# ---- names ----------------------------------------------------------------

Labels = tuple[bytes, ...]


def name_key(text: str) -> Labels:
    """Return the lookup key of a dotted name: its labels in lower case."""
    return tuple(text.lower().encode("utf-8").split(b"."))


@dataclass(frozen=True)
class Record:
    kind: str  # vip, dnsrr, tasks or sandbox
    owner: str  # the service or sandbox the name belongs to
    addresses: tuple[IPv4Address, ...]


@dataclass(frozen=True)
class Found:
    network: str
    record: Record


def visible_networks(cluster: Cluster, sandbox: Sandbox) -> list[str]:
    """Return the networks whose names the sandbox sees: its own, in endpoint order, without ingress."""
    out = []
    for endpoint in sandbox.endpoints:
        network = cluster.networks.get(endpoint.network)
        if network is not None and not network.ingress:
            out.append(network.name)
    return out


def network_records(cluster: Cluster, network: str) -> dict[Labels, Record]:
    """Return every name that resolves on `network`, keyed by lower-case labels."""
    records: dict[Labels, Record] = {}
    tasks: dict[str, list[IPv4Address]] = {}
    for sandbox in cluster.sandboxes.values():
        endpoint = sandbox.endpoint_on(network)
        if endpoint is None:
            continue
        records[name_key(sandbox.name)] = Record("sandbox", sandbox.name, (endpoint.ip,))
        tasks.setdefault(sandbox.service, []).append(endpoint.ip)

    services = [s for s in cluster.services.values() if network in s.networks]
    # Aliases first and service names last, so that a service name wins over an alias.
    named = [(alias, s) for s in services for alias in s.aliases.get(network, ())]
    named += [(s.name, s) for s in services]
    for name, service in named:
        addresses = tuple(tasks.get(service.name, ()))
        vip = service.vips.get(network) if service.endpoint_mode == "vip" else None
        if vip is not None:
            records[name_key(name)] = Record("vip", service.name, (vip,))
        elif addresses:
            records[name_key(name)] = Record("dnsrr", service.name, addresses)
        if addresses:
            records[(b"tasks",) + name_key(name)] = Record("tasks", service.name, addresses)
    return records


def resolve_name(cluster: Cluster, sandbox: Sandbox, labels: Labels) -> Found | None:
    """Find the record a sandbox sees for a name, as libnetwork's Sandbox.ResolveName does.

    The whole name is tried on each network first. Then the name is split
    at each dot from the right, and the left part is tried on the network
    the right part names, if the sandbox is on it.
    """
    networks = visible_networks(cluster, sandbox)
    cache: dict[str, dict[Labels, Record]] = {}
    for split in range(len(labels), 0, -1):
        request, suffix = labels[:split], labels[split:]
        for network in networks:
            if suffix and name_key(network) != suffix:
                continue
            if network not in cache:
                cache[network] = network_records(cluster, network)
            record = cache[network].get(request)
            if record is not None:
                return Found(network, record)
    return None


def resolve_address(cluster: Cluster, sandbox: Sandbox, address: IPv4Address) -> tuple[str | None, bool]:
    """Return (PTR target, whether the address lies in a cluster subnet) for a reverse lookup."""
    for network in visible_networks(cluster, sandbox):
        for other in cluster.sandboxes.values():
            endpoint = other.endpoint_on(network)
            if endpoint is not None and endpoint.ip == address:
                return f"{other.name}.{network}.", True
    inside = any(address in network.subnet for network in cluster.networks.values())
    return None, inside


def may_forward(cluster: Cluster, sandbox: Sandbox) -> bool:
    """Return whether unknown names of this sandbox go upstream.

    This is how Docker decides it (libnetwork's Sandbox.hasExternalAccess): only a
    sandbox with a network that is neither internal nor ingress, which is
    exactly a sandbox with a default gateway, forwards.
    """
    return bool(cluster.dns_upstreams) and sandbox.default_gateway is not None


# ---- clients and outcomes --------------------------------------------------


@dataclass
class Client:
    """Where the answer to one query goes."""

    transport: str  # "udp" or "tcp"
    port: int  # datapath port id of the sandbox endpoint
    mac: int
    ip: int
    sport: int
    server_mac: int  # the gateway that received the query
    server_ip: int
    mtu: int
    limit: int = UDP_ANSWER_SIZE  # largest answer this client takes
    connection: Connection | None = None  # TCP only

    @property
    def label(self) -> str:
        return f"{self.transport} {ip_text(self.ip)}:{self.sport}"

    @property
    def udp_payload(self) -> int:
        """The largest UDP answer the endpoint carries without fragmentation."""
        return max(UDP_ANSWER_SIZE, self.mtu - IPV4_UDP_HEADERS)


@dataclass
class Outcome:
    """The resolver's decision on one query: a message for the client, a forward or a drop."""

    decision: str  # answer, no-data, nxdomain, formerr, notimp, badvers, forward or drop
    detail: str
    answer: bytes | None = None  # the message for the client
    reason: str | None = None  # the reason code of a drop
    upstream_frame: bytes | None = None  # the frame for the upstream port


@dataclass
class PendingQuery:
    """A query forwarded upstream, waiting for its answer."""

    client: Client
    query: dns.message.Message  # as the client sent it
    wire: bytes  # what goes upstream; bytes 0-1 (the id) change per attempt
    label: str  # "name type", for traces and logs
    upstreams: list[int]
    ids: list[int]  # query id per attempt, drawn when the query arrived
    source_ports: list[int]
    attempt: int = 0
    deadline: float = 0.0
    key: tuple[int, int, int] = (0, 0, 0)  # (upstream IP, source port, id) of the current attempt


def ip_text(ip: int) -> str:
    return str(IPv4Address(ip))


def address_list(addresses: list[IPv4Address]) -> str:
    """Return addresses for a trace line: the first TRACE_ADDRESSES of them and a count of the rest."""
    text = ", ".join(str(a) for a in addresses[:TRACE_ADDRESSES])
    if len(addresses) > TRACE_ADDRESSES:
        text += f" and {len(addresses) - TRACE_ADDRESSES} more"
    return text


def is_truncated(wire: bytes) -> bool:
    """Return whether a rendered message has the TC flag set."""
    return bool(int.from_bytes(wire[2:4], "big") & dns.flags.TC)


# ---- the stage ---------------------------------------------------------------


Send = Callable[[int, bytes], None]


class Resolver:
    """One node's DNS resolver: the L3 stage, the upstream port handler and the timers."""

    name = "dns"

    def __init__(self, datapath):
        self.dp = datapath
        self.tcp = TcpResponder()
        self.pending: dict[tuple[int, int, int], PendingQuery] = {}
        self.ip_id = 0  # IPv4 identification of forwarded queries
        self._warned_no_upstream_port = False

    @property
    def cluster(self) -> Cluster:
        return self.dp.fabric.cluster

    # ---- frames in ---------------------------------------------------------

    def handle(self, ctx) -> bool:
        if ctx.port.kind == "upstream":
            self._from_upstream(ctx)
            return True
        rec = ctx.record
        flags = int(rec["flags"])
        if not flags & parse.IS_IPV4 or flags & parse.IS_FRAGMENT or not flags & (parse.IS_UDP | parse.IS_TCP):
            return False
        if int(rec["ip_dst"]) != ctx.network.gateway_ip or int(rec["dport"]) != DNS_PORT:
            return False
        if int(rec["l3_off"]) != parse.ETH_HEADER_LEN:
            return False  # a sandbox never sends VLAN tags, so the gateway drops the frame with its own reason

        sandbox = self.cluster.sandboxes.get(ctx.port.sandbox)
        if sandbox is None:
            ctx.drop("dns-unknown-sandbox", self.name, f"sandbox {ctx.port.sandbox} is not in the cluster model")
            return True
        if not flags & parse.NEEDS_CSUM and not self._checksum_ok(ctx.frame, rec):
            ctx.drop("dns-bad-checksum", self.name)
            return True

        client = Client(
            transport="tcp" if flags & parse.IS_TCP else "udp",
            port=ctx.port.id,
            mac=int(rec["src_mac"]),
            ip=int(rec["ip_src"]),
            sport=int(rec["sport"]),
            server_mac=ctx.network.gateway_mac,
            server_ip=ctx.network.gateway_ip,
            mtu=ctx.network.model.mtu,
        )
        if client.transport == "udp":
            self._udp_query(ctx, rec, client, sandbox)
        else:
            self._tcp_segment(ctx, rec, client, sandbox)
        return True

    def _udp_query(self, ctx, rec, client: Client, sandbox: Sandbox) -> None:
        start = int(rec["payload_off"])
        wire = ctx.frame[start : start + int(rec["payload_len"])]
        outcome = self.query(wire, client, sandbox, ctx.now, ctx.rng)
        if outcome.reason is not None:
            ctx.drop(outcome.reason, self.name, outcome.detail)
            return
        if outcome.upstream_frame is not None:
            self._forward(ctx, outcome)
            return
        ctx.reply(self._udp_frame(client, outcome.answer), self.name, outcome.decision, outcome.detail)

    def _tcp_segment(self, ctx, rec, client: Client, sandbox: Sandbox) -> None:
        start = int(rec["payload_off"])
        flags = int(rec["tcp_flags"])
        mss = None
        if flags & frames.TCP_SYN:
            mss = frames.tcp_mss(ctx.frame, int(rec["l4_off"]), int(rec["tcp_doff"]))
        segment = Segment(
            seq=int(rec["tcp_seq"]),
            ack=int(rec["tcp_ack"]),
            flags=flags,
            window=int(rec["tcp_window"]),
            payload=ctx.frame[start : start + int(rec["payload_len"])],
            mss=mss,
        )
        addressing = Addressing(ctx.port.id, client.mac, client.ip, client.sport, client.server_mac, client.server_ip, DNS_PORT)
        outcomes: list[Outcome] = []

        def on_request(connection: Connection, message: bytes) -> bytes | None:
            client.connection = connection
            outcome = self.query(message, client, sandbox, ctx.now, ctx.rng)
            outcomes.append(outcome)
            if outcome.upstream_frame is not None:
                return None
            return outcome.answer if outcome.answer is not None else b""

        local_mss = client.mtu - IPV4_TCP_HEADERS
        reception = self.tcp.receive(addressing, segment, ctx.now, ctx.rng, local_mss, on_request)
        for frame in reception.frames:
            ctx.emit(ctx.port.id, frame)

        if reception.reject is not None:
            ctx.drop(reception.reject, self.name, f"tcp {reception.event}: {reception.detail}")
            return
        ctx.note(self.name, f"tcp-{reception.event}", reception.detail)
        for outcome in outcomes:
            if outcome.reason is not None:
                ctx.drop(outcome.reason, self.name, f"{outcome.detail}; connection closed")
                return
            if outcome.upstream_frame is not None:
                self._forward(ctx, outcome)
                return
            ctx.note(self.name, outcome.decision, outcome.detail)
        self._set_verdict(ctx, "reply" if reception.frames else "deliver")

    # ---- queries -------------------------------------------------------------

    def query(self, wire: bytes, client: Client, sandbox: Sandbox, now: float, rng: np.random.Generator) -> Outcome:
        """Decide what to do with one DNS message from a sandbox."""
        if len(wire) < HEADER_LEN:
            return Outcome("drop", f"{len(wire)} bytes, shorter than a DNS header", reason="dns-malformed")
        if int.from_bytes(wire[2:4], "big") & FLAG_QR:
            return Outcome("drop", "QR set: a response, not a query", reason="dns-not-query")
        try:
            query = dns.message.from_wire(wire)
        except WIRE_ERRORS as error:
            return self._format_error(wire, client, f"{type(error).__name__}: {error}")

        client.limit = self._answer_limit(query, client)
        if query.opcode() != dns.opcode.QUERY:
            return self._rcode_only(query, client, dns.rcode.NOTIMP, "notimp", f"opcode {dns.opcode.to_text(query.opcode())}")
        if len(query.question) != 1:
            return self._rcode_only(query, client, dns.rcode.FORMERR, "formerr", f"{len(query.question)} questions")
        if query.edns > 0:
            return self._rcode_only(query, client, dns.rcode.BADVERS, "badvers", f"EDNS version {query.edns}")

        question = query.question[0]
        label = f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"
        if question.rdclass == IN:
            if question.rdtype == PTR:
                outcome = self._reverse(query, client, sandbox, label)
            else:
                outcome = self._forward_lookup(query, client, sandbox, label, rng)
            if outcome is not None:
                return outcome

        if may_forward(self.cluster, sandbox):
            return self._start_forward(query, wire, client, label, now, rng)
        return self._rcode_only(query, client, dns.rcode.NXDOMAIN, "nxdomain", f"{label}: unknown name, no upstream")

    def _forward_lookup(self, query, client: Client, sandbox: Sandbox, label: str, rng) -> Outcome | None:
        question = query.question[0]
        labels = tuple(part.lower() for part in question.name.labels if part)
        found = resolve_name(self.cluster, sandbox, labels)
        if found is None:
            return None
        response = self._response(query, client)
        where = f"{found.record.kind} {found.record.owner} on {found.network}"
        if question.rdtype != A:
            return Outcome("no-data", f"{label}: known name ({where}), no such record", self._render(response, client))

        addresses = list(found.record.addresses)
        if len(addresses) > 1:
            addresses = [addresses[i] for i in rng.permutation(len(addresses))]
        # One RRset per address, so that truncation drops single addresses, not all of them.
        for address in addresses:
            rrset = dns.rrset.RRset(question.name, IN, A)
            rrset.add(dns.rdtypes.IN.A.A(IN, A, str(address)), ANSWER_TTL)
            response.answer.append(rrset)
        answer = self._render(response, client)
        detail = f"{label}: {address_list(addresses)} ({where})"
        if is_truncated(answer):
            detail += f"; truncated to {client.limit} bytes, TC set"
        return Outcome("answer", detail, answer)

    def _reverse(self, query, client: Client, sandbox: Sandbox, label: str) -> Outcome | None:
        question = query.question[0]
        try:
            address = IPv4Address(dns.reversename.to_address(question.name))
        except (dns.exception.DNSException, ValueError):
            return None  # not an IPv4 reverse name: treated as an unknown name
        target, inside = resolve_address(self.cluster, sandbox, address)
        if target is None:
            if inside:
                return self._rcode_only(query, client, dns.rcode.NXDOMAIN, "nxdomain", f"{label}: no task has {address}")
            return None
        response = self._response(query, client)
        rrset = dns.rrset.RRset(question.name, IN, PTR)
        rrset.add(dns.rdtypes.ANY.PTR.PTR(IN, PTR, dns.name.from_text(target)), ANSWER_TTL)
        response.answer.append(rrset)
        return Outcome("answer", f"{label}: {target}", self._render(response, client))

    # ---- building answers ------------------------------------------------------

    def _answer_limit(self, query, client: Client) -> int:
        if client.transport == "tcp":
            return TCP_ANSWER_SIZE
        offered = query.payload if query.edns >= 0 else UDP_ANSWER_SIZE
        return min(max(UDP_ANSWER_SIZE, offered), client.udp_payload)

    def _response(self, query, client: Client) -> dns.message.Message:
        # libnetwork sets RA on every answer and never AA.
        return dns.message.make_response(query, recursion_available=True, our_payload=client.udp_payload)

    def _render(self, response: dns.message.Message, client: Client) -> bytes:
        """Render within the client's limit, keeping the records that fit and setting TC if some do not."""
        return response.to_wire(max_size=client.limit, prefer_truncation=True)

    def _rcode_only(self, query, client: Client, rcode, decision: str, detail: str) -> Outcome:
        response = self._response(query, client)
        response.set_rcode(rcode)
        return Outcome(decision, detail, self._render(response, client))

    def _format_error(self, wire: bytes, client: Client, detail: str) -> Outcome:
        """Answer an unreadable query with FORMERR: its id and opcode, and no sections."""
        response = dns.message.Message(id=int.from_bytes(wire[0:2], "big"))
        response.flags = dns.flags.QR | dns.flags.RA | (int.from_bytes(wire[2:4], "big") & dns.flags.RD)
        response.set_opcode(dns.opcode.from_flags(int.from_bytes(wire[2:4], "big")))
        response.set_rcode(dns.rcode.FORMERR)
        return Outcome("formerr", detail, response.to_wire())

    def _udp_frame(self, client: Client, answer: bytes) -> bytes:
        return frames.udp_frame(client.server_mac, client.mac, client.server_ip, client.ip, DNS_PORT, client.sport, answer)

    def _send_answer(self, client: Client, answer: bytes, now: float, send: Send) -> bool:
        """Send an answer that was not ready when the query arrived; return False if the client's port is gone."""
        if self.dp.fabric.ports[client.port].removed:
            return False
        if client.transport == "udp":
            send(client.port, self._udp_frame(client, answer))
            return True
        for frame in self.tcp.respond(client.connection, answer, now):
            send(client.port, frame)
        return True

    # ---- forwarding -----------------------------------------------------------

    def _start_forward(self, query, wire: bytes, client: Client, label: str, now: float, rng) -> Outcome:
        if len(self.pending) >= MAX_PENDING:
            return Outcome("drop", f"{label}: {len(self.pending)} queries already forwarded", reason="dns-busy")
        upstream_port = self._upstream_port()
        if upstream_port is None:
            return self._rcode_only(query, client, dns.rcode.SERVFAIL, "servfail", f"{label}: node has no upstream port")
        if client.transport == "tcp":
            wire = self._with_payload(query, wire, UPSTREAM_TCP_PAYLOAD)

        upstreams = [int(ip) for ip in self.cluster.dns_upstreams[:MAX_UPSTREAMS]]
        pending = PendingQuery(
            client=client,
            query=query,
            wire=wire,
            label=label,
            upstreams=upstreams,
            ids=[int(i) for i in rng.integers(0, 1 << 16, size=len(upstreams))],
            source_ports=[int(p) for p in rng.integers(SOURCE_PORT_MIN, SOURCE_PORT_MAX + 1, size=len(upstreams))],
        )
        frame = self._send_upstream(pending, now)
        return Outcome("forward", f"{label} to {ip_text(pending.key[0])} (id {pending.key[2]})", upstream_frame=frame)

    def _with_payload(self, query, wire: bytes, payload: int) -> bytes:
        """Return the query's wire form offering `payload` bytes of EDNS0, or `wire` if it cannot be rendered."""
        try:
            query.use_edns(0, query.ednsflags, payload, options=query.options)
            return query.to_wire()
        except WIRE_ERRORS:
            return wire

    def _send_upstream(self, pending: PendingQuery, now: float) -> bytes:
        """Register the current attempt of a forwarded query and return its frame."""
        attempt = pending.attempt
        upstream = pending.upstreams[attempt]
        source_port = pending.source_ports[attempt]
        query_id = pending.ids[attempt]
        while (upstream, source_port, query_id) in self.pending:
            query_id = (query_id + 1) & 0xFFFF
        pending.key = (upstream, source_port, query_id)
        pending.deadline = now + UPSTREAM_TIMEOUT
        self.pending[pending.key] = pending

        self.ip_id = (self.ip_id + 1) & 0xFFFF
        underlay = int(self.cluster.node(self.dp.node).underlay_ip)
        payload = query_id.to_bytes(2, "big") + pending.wire[2:]
        return vxlan.wrap_datagram(payload, underlay, source_port, upstream, DNS_PORT, self.ip_id)

    def _forward(self, ctx, outcome: Outcome) -> None:
        ctx.note(self.name, outcome.decision, outcome.detail)
        ctx.emit(self._upstream_port(), outcome.upstream_frame)
        self._set_verdict(ctx, "deliver")

    def _from_upstream(self, ctx) -> None:
        rec = ctx.record
        flags = int(rec["flags"])
        if not flags & parse.IS_IPV4 or not flags & parse.IS_UDP or flags & parse.IS_FRAGMENT:
            ctx.drop("dns-upstream-unexpected", self.name, "not an unfragmented IPv4 UDP datagram")
            return
        start = int(rec["payload_off"])
        wire = ctx.frame[start : start + int(rec["payload_len"])]
        source = int(rec["ip_src"])
        if len(wire) < HEADER_LEN:
            ctx.drop("dns-malformed", self.name, f"{len(wire)} bytes from upstream {ip_text(source)}")
            return
        key = (source, int(rec["dport"]), int.from_bytes(wire[0:2], "big"))
        pending = self.pending.get(key)
        underlay = int(self.cluster.node(self.dp.node).underlay_ip)
        if pending is None or int(rec["sport"]) != DNS_PORT or int(rec["ip_dst"]) != underlay:
            ctx.drop("dns-upstream-unexpected", self.name, f"from {ip_text(source)}:{int(rec['sport'])}: no query awaits it")
            return

        send = self._sender(ctx)
        try:
            reply = dns.message.from_wire(wire)
        except WIRE_ERRORS as error:
            del self.pending[key]
            ctx.drop("dns-malformed", self.name, f"reply from {ip_text(source)}: {type(error).__name__}")
            ctx.note(self.name, *self._next_upstream(pending, ctx.now, send))
            return
        if not reply.flags & dns.flags.QR or not self._same_question(pending.query, reply):
            ctx.drop("dns-upstream-unexpected", self.name, f"reply from {ip_text(source)} does not match {pending.label}")
            return

        del self.pending[key]
        rcode = reply.rcode()
        if rcode not in RELAYED_RCODES:
            self.dp.fabric.decisions["dns-upstream-failed"] += 1
            ctx.note(self.name, "upstream-failed", f"{pending.label}: {dns.rcode.to_text(rcode)} from {ip_text(source)}")
            ctx.note(self.name, *self._next_upstream(pending, ctx.now, send))
            self._set_verdict(ctx, "deliver")
            return
        if not self._send_answer(pending.client, self._relayed(pending, wire, reply), ctx.now, send):
            ctx.drop("dns-unknown-sandbox", self.name, f"{pending.label}: the client's port {pending.client.port} was removed")
            return
        ctx.note(self.name, "relay", f"{pending.label}: {dns.rcode.to_text(rcode)} from {ip_text(source)} to {pending.client.label}")
        self._set_verdict(ctx, "deliver")

    def _relayed(self, pending: PendingQuery, wire: bytes, reply: dns.message.Message) -> bytes:
        """Return the upstream's answer with the client's id, truncated to the client's limit."""
        client = pending.client
        if len(wire) <= client.limit:
            return pending.query.id.to_bytes(2, "big") + wire[2:]
        reply.id = pending.query.id
        try:
            return reply.to_wire(max_size=client.limit, prefer_truncation=True)
        except WIRE_ERRORS:
            response = self._response(pending.query, client)
            response.set_rcode(reply.rcode())
            response.flags |= dns.flags.TC
            return self._render(response, client)

    @staticmethod
    def _same_question(query: dns.message.Message, reply: dns.message.Message) -> bool:
        if len(reply.question) != 1:
            return False
        asked, answered = query.question[0], reply.question[0]
        return (asked.name, asked.rdtype, asked.rdclass) == (answered.name, answered.rdtype, answered.rdclass)

    def _next_upstream(self, pending: PendingQuery, now: float, send: Send) -> tuple[str, str]:
        """Try the next upstream, or answer SERVFAIL when every upstream has failed.

        Returns the decision and its detail for the trace.
        """
        pending.attempt += 1
        if pending.attempt < len(pending.upstreams):
            port = self._upstream_port()
            if port is not None:
                send(port, self._send_upstream(pending, now))
                return "forward", f"{pending.label} to {ip_text(pending.key[0])} (id {pending.key[2]})"
        response = self._response(pending.query, pending.client)
        response.set_rcode(dns.rcode.SERVFAIL)
        self._send_answer(pending.client, self._render(response, pending.client), now, send)
        return "servfail", f"{pending.label}: no upstream left; SERVFAIL to {pending.client.label}"

    def _upstream_port(self) -> int | None:
        try:
            return self.dp.fabric.port_id(f"{self.dp.node}/upstream")
        except KeyError:
            if not self._warned_no_upstream_port:
                log.warning("node %s has no upstream port; unknown names get SERVFAIL", self.dp.node)
                self._warned_no_upstream_port = True
            return None

    # ---- timers -----------------------------------------------------------------

    def tick(self, now: float, result) -> None:
        """Move timed-out forwarded queries on, and retransmit or reset TCP connections.

        Each timer that sends a frame gets a trace record of its own, whose
        ingress is `<node>/timers`, so that a replay tells its story too.
        """
        for key, pending in list(self.pending.items()):
            if now < pending.deadline:
                continue
            del self.pending[key]
            self.dp.fabric.decisions["dns-upstream-timeout"] += 1
            record = self._timer_record(now, f"forwarded query {pending.label}")
            detail = f"{pending.label}: no reply from {ip_text(key[0])} in {UPSTREAM_TIMEOUT:g} s"
            record.add(self.name, "upstream-timeout", detail)
            log.debug("node %s: %s", self.dp.node, detail)
            send = self._timer_sender(result, record)
            record.add(self.name, *self._next_upstream(pending, now, send))

        for event in self.tcp.tick(now):
            if event.decision == "tcp-abort":
                self.dp.fabric.decisions["dns-tcp-abort"] += 1
                log.debug("node %s: %s", self.dp.node, event.detail)
            if self.dp.fabric.ports[event.port].removed:
                continue
            record = self._timer_record(now, "DNS TCP connection")
            record.add(self.name, event.decision, event.detail)
            self._timer_sender(result, record)(event.port, event.frame)

    def _timer_record(self, now: float, summary: str) -> TraceRecord:
        fabric = self.dp.fabric
        record = TraceRecord(fabric.next_trace_id, now, self.dp.node, f"{self.dp.node}/timers", summary)
        fabric.next_trace_id += 1
        return record

    def _timer_sender(self, result, record: TraceRecord) -> Send:
        def send(port: int, frame: bytes) -> None:
            record.verdict = "reply" if port != self._upstream_port() else "deliver"
            self.dp.transmit(result, port, frame, None, -1, record)

        return send

    # ---- helpers -------------------------------------------------------------------

    def _sender(self, ctx) -> Send:
        return lambda port, frame: ctx.emit(port, frame)

    @staticmethod
    def _set_verdict(ctx, verdict: str) -> None:
        if ctx.trace is not None and not ctx.trace.verdict:
            ctx.trace.verdict = verdict
        ctx.done = True

    @staticmethod
    def _checksum_ok(frame: bytes, rec) -> bool:
        l3_off = int(rec["l3_off"])
        l4_off = int(rec["l4_off"])
        l4_len = int(rec["payload_off"]) + int(rec["payload_len"]) - l4_off
        return frames.l4_checksum_ok(frame, l3_off, l4_off, int(rec["ip_proto"]), l4_len)


def install(datapath) -> None:
    """Add the resolver to a node's datapath: as an L3 stage and as the upstream port's handler."""
    resolver = Resolver(datapath)
    datapath.l3_stages.append(resolver)
    datapath.port_handlers["upstream"] = resolver
