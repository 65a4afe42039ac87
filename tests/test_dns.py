"""The embedded DNS resolver, through a Fabric, with frames built by scapy and messages by dnspython."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from dpkit import Wire
from tapnet import dns as resolver
from tapnet import dns_tcp, reasons
from tapnet.model import format_mac
from tapnet.stack import load_stack
from tapnet.vxlan import derived_mac

# Subnets chosen apart from every address of the machine's root namespace
# (192.0.2.0/24 and fd00::/64). The upstreams sit on the default underlay
# 198.51.100.0/24. They are only data in frames, because nothing is sent anywhere.
STACK = """
x-tapnet:
  nodes: [node1, node2]
  placement: {proxy: node1, app: node1, db: node1, vault: node1}
  UPSTREAMS
services:
  redis:
    deploy: {replicas: 3}
    networks: [vote]
  web:
    deploy: {replicas: 2, endpoint_mode: dnsrr}
    networks:
      vote: {aliases: [www]}
  many:
    deploy: {replicas: 100, endpoint_mode: dnsrr}
    networks: [vote]
  proxy:
    networks:
      front: {aliases: [edge]}
  app:
    networks: [front, back]
  db:
    networks:
      back: {aliases: [database]}
  vault:
    networks: [secret]
networks:
  vote:
    driver: overlay
    ipam: {config: [{subnet: 10.0.9.0/24}]}
  front:
    driver: bridge
    ipam: {config: [{subnet: 172.20.0.0/24}]}
  back:
    driver: bridge
    ipam: {config: [{subnet: 172.21.0.0/24}]}
  secret:
    driver: bridge
    internal: true
    ipam: {config: [{subnet: 172.22.0.0/24}]}
"""
UPSTREAM_1 = "198.51.100.60"
UPSTREAM_2 = "198.51.100.61"


def compile_stack(upstreams: bool = False, replicas: int = 100):
    text = STACK.replace("replicas: 100", f"replicas: {replicas}")
    line = f"dns_upstreams: [{UPSTREAM_1}, {UPSTREAM_2}]" if upstreams else ""
    return load_stack(text.replace("UPSTREAMS", line))


class Resolv(Wire):
    """A Fabric on the test stack, with DNS clients in the sandboxes."""

    def __init__(self, upstreams: bool = False, seed: int = 0, cluster=None):
        super().__init__(cluster or compile_stack(upstreams), seed)

    def first_network(self, sandbox: str) -> str:
        return self.cluster.sandboxes[sandbox].endpoints[0].network

    def udp(self, sandbox: str, payload: bytes, network: str | None = None, sport: int = 40053, gateway: str | None = None):
        """The frame of a UDP datagram from `sandbox` to port 53 of a gateway."""
        network = network or self.first_network(sandbox)
        gw_ip, gw_mac = self.gateway(gateway or network)
        frame = (
            Ether(src=self.mac(sandbox, network), dst=self.gateway(network)[1])
            / IP(src=self.ip(sandbox, network), dst=gw_ip)
            / UDP(sport=sport, dport=53)
            / Raw(payload)
        )
        return self.port(sandbox, network), frame

    def ask(self, sandbox: str, query: dns.message.Message, network: str | None = None, now: float = 0.0, **kwargs):
        """Send `query` over UDP; return the Result."""
        return self.send([self.udp(sandbox, query.to_wire(), network, **kwargs)], now=now)

    def lookup(self, sandbox: str, name: str, rdtype: str = "A", **kwargs) -> dns.message.Message:
        """Ask `name` from `sandbox` and return the one answer it gets."""
        query = dns.message.make_query(name, rdtype)
        result = self.ask(sandbox, query, **kwargs)
        return self.answer(result, self.port(sandbox, kwargs.get("network") or self.first_network(sandbox)))

    def answer(self, result, port: int) -> dns.message.Message:
        [(out_port, frame)] = self.out(result)
        assert out_port == port
        return dns.message.from_wire(bytes(frame[UDP].payload))

    def upstream_port(self, node: str = "node1") -> int:
        return self.fabric.port_id(f"{node}/upstream")

    def node_ip(self, node: str = "node1") -> str:
        return str(self.cluster.node(node).underlay_ip)

    def from_upstream(self, forwarded: Ether, reply: dns.message.Message | bytes, source: str | None = None, sport: int = 53):
        """The frame of an upstream's reply to a forwarded query frame."""
        source = source or forwarded[IP].dst
        payload = reply if isinstance(reply, bytes) else reply.to_wire()
        upstream_mac = format_mac(derived_mac(int(ipaddress.IPv4Address(source))).to_bytes(6, "big"))
        return (
            Ether(src=upstream_mac, dst=forwarded.src)
            / IP(src=source, dst=forwarded[IP].src)
            / UDP(sport=sport, dport=forwarded[UDP].sport)
            / Raw(payload)
        )


def addresses(message: dns.message.Message) -> list[str]:
    return [rdata.address for rrset in message.answer for rdata in rrset]


def reverse_name(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text()


def ips(wire: Resolv, sandboxes, network: str) -> set[str]:
    return {wire.ip(s, network) for s in sandboxes}


@pytest.fixture(scope="module")
def cluster():
    return compile_stack()


@pytest.fixture
def wire(cluster):
    return Resolv(cluster=cluster)


@pytest.fixture
def forwarding():
    return Resolv(upstreams=True)


# ---- names -------------------------------------------------------------------


def test_service_name_returns_vip(wire):
    answer = wire.lookup("redis.1", "redis")
    assert answer.rcode() == dns.rcode.NOERROR
    assert addresses(answer) == [str(wire.cluster.services["redis"].vips["vote"])]


def test_dnsrr_service_returns_every_task(wire):
    answer = wire.lookup("redis.1", "web")
    assert sorted(addresses(answer)) == sorted(ips(wire, ["web.1", "web.2"], "vote"))


def test_tasks_name_returns_every_task(wire):
    answer = wire.lookup("redis.1", "tasks.redis")
    assert sorted(addresses(answer)) == sorted(ips(wire, ["redis.1", "redis.2", "redis.3"], "vote"))


def test_sandbox_name_returns_its_address(wire):
    answer = wire.lookup("redis.1", "redis.2")
    assert addresses(answer) == [wire.ip("redis.2", "vote")]


@pytest.mark.parametrize(
    "asker, name, expected",
    [
        ("redis.1", "www", ["web.1", "web.2"]),  # alias of a dnsrr service: its tasks
        ("redis.1", "tasks.www", ["web.1", "web.2"]),
        ("app.1", "edge", "vip:proxy:front"),  # alias of a vip service: its VIP
        ("app.1", "database", "vip:db:back"),  # alias on app's second network
    ],
)
def test_network_alias_resolves_like_its_service(wire, asker, name, expected):
    answer = wire.lookup(asker, name)
    if isinstance(expected, str):
        _, service, network = expected.split(":")
        assert addresses(answer) == [str(wire.cluster.services[service].vips[network])]
    else:
        assert sorted(addresses(answer)) == sorted(ips(wire, expected, "vote"))


@pytest.mark.parametrize(
    "name, service, network",
    [("app.front", "app", "front"), ("app.back", "app", "back"), ("db.back", "db", "back")],
)
def test_name_with_network_suffix_uses_that_network(wire, name, service, network):
    answer = wire.lookup("app.1", name)
    assert addresses(answer) == [str(wire.cluster.services[service].vips[network])]


def test_sandbox_and_tasks_names_take_network_suffix(wire):
    assert addresses(wire.lookup("redis.1", "redis.2.vote")) == [wire.ip("redis.2", "vote")]
    assert len(addresses(wire.lookup("redis.1", "tasks.redis.vote"))) == 3


def test_service_on_two_networks_answers_first_network(wire):
    # app shares front and back with itself; front is its first endpoint.
    answer = wire.lookup("app.1", "app")
    assert addresses(answer) == [str(wire.cluster.services["app"].vips["front"])]


@pytest.mark.parametrize("name", ["REDIS", "Redis.Vote", "TASKS.redis", "rEdIs.2"])
def test_names_are_case_insensitive(wire, name):
    answer = wire.lookup("redis.1", name)
    assert addresses(answer) != []
    assert answer.answer[0].name.to_text() == name + "."  # the owner name keeps the query's case


def test_answer_ttl_is_600(wire):
    answer = wire.lookup("redis.1", "tasks.redis")
    assert {rrset.ttl for rrset in answer.answer} == {600}


def test_answer_echoes_id_and_question(wire):
    query = dns.message.make_query("redis", "A")
    result = wire.ask("redis.1", query)
    answer = wire.answer(result, wire.port("redis.1", "vote"))
    assert answer.id == query.id
    assert answer.question == query.question
    assert answer.flags & dns.flags.QR
    assert answer.flags & dns.flags.RA


def test_answer_frame_comes_from_gateway_with_valid_checksums(wire):
    result = wire.ask("proxy.1", dns.message.make_query("app", "A"), sport=51515)
    [(port, frame)] = wire.out(result)
    gw_ip, gw_mac = wire.gateway("front")
    assert (frame.src, frame.dst) == (gw_mac, wire.mac("proxy.1", "front"))
    assert (frame[IP].src, frame[IP].dst) == (gw_ip, wire.ip("proxy.1", "front"))
    assert (frame[UDP].sport, frame[UDP].dport) == (53, 51515)
    rebuilt = Ether(bytes(frame))
    ip_sum, udp_sum = rebuilt[IP].chksum, rebuilt[UDP].chksum
    del rebuilt[IP].chksum, rebuilt[UDP].chksum
    recomputed = Ether(bytes(rebuilt))
    assert ip_sum == recomputed[IP].chksum
    assert udp_sum == recomputed[UDP].chksum


def test_resolver_of_any_own_network_answers_for_all(wire):
    # app asks back's gateway about a name that lives on front.
    answer = wire.lookup("app.1", "edge", network="back")
    assert addresses(answer) == [str(wire.cluster.services["proxy"].vips["front"])]


def test_resolver_on_second_node_answers(wire):
    assert wire.cluster.sandboxes["redis.2"].node == "node2"
    answer = wire.lookup("redis.2", "redis.1")
    assert addresses(answer) == [wire.ip("redis.1", "vote")]


# ---- isolation ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["db", "database", "db.1", "tasks.db", "db.back", "redis"])
def test_name_on_other_network_does_not_resolve(wire, name):
    answer = wire.lookup("proxy.1", name)
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.answer == []


def test_query_to_other_networks_gateway_is_isolation(wire):
    # proxy (front only) sends to back's gateway address through front's gateway MAC.
    port, frame = wire.udp("proxy.1", dns.message.make_query("db", "A").to_wire(), gateway="back")
    result = wire.send([(port, frame)])
    assert result.emits == []
    assert result.records[0].reason == "isolation"


# ---- record types -----------------------------------------------------------------


def test_aaaa_for_known_name_is_empty_noerror(forwarding):
    answer = forwarding.lookup("redis.1", "redis", "AAAA")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer == []
    assert forwarding.fabric.tx_packets[forwarding.upstream_port()] == 0


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "SRV", "ANY"])
def test_other_types_for_known_name_are_empty_noerror(forwarding, rdtype):
    answer = forwarding.lookup("redis.1", "tasks.redis", rdtype)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer == []
    assert forwarding.fabric.tx_packets[forwarding.upstream_port()] == 0


def test_ptr_for_task_address_names_sandbox_and_network(wire):
    answer = wire.lookup("redis.1", reverse_name(wire.ip("redis.2", "vote")), "PTR")
    assert [rdata.target.to_text() for rrset in answer.answer for rdata in rrset] == ["redis.2.vote."]
    assert answer.answer[0].ttl == 600


def test_ptr_for_vip_is_nxdomain_and_not_forwarded(forwarding):
    vip = str(forwarding.cluster.services["redis"].vips["vote"])
    answer = forwarding.lookup("redis.1", reverse_name(vip), "PTR")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert forwarding.fabric.tx_packets[forwarding.upstream_port()] == 0


def test_ptr_for_task_on_other_network_is_nxdomain(wire):
    answer = wire.lookup("proxy.1", reverse_name(wire.ip("db.1", "back")), "PTR")
    assert answer.rcode() == dns.rcode.NXDOMAIN


# ---- shuffling ----------------------------------------------------------------------


def first_order(seed: int, queries: int = 3) -> list[list[str]]:
    wire = Resolv(seed=seed, cluster=compile_stack(replicas=8))
    return [addresses(wire.lookup("redis.1", "tasks.many")) for _ in range(queries)]


def test_shuffle_is_deterministic_per_seed():
    assert first_order(7) == first_order(7)


def test_shuffle_differs_between_answers_and_seeds():
    orders = first_order(7)
    assert len({tuple(o) for o in orders}) > 1
    assert orders != first_order(8)
    assert all(sorted(o) == sorted(orders[0]) for o in orders)


# ---- size and TC ------------------------------------------------------------------------


def many_tasks(wire: Resolv) -> set[str]:
    return {wire.ip(name, "vote") for name, s in wire.cluster.sandboxes.items() if s.service == "many"}


def test_answer_over_512_bytes_sets_tc(wire):
    query = dns.message.make_query("tasks.many", "A")
    result = wire.ask("redis.1", query)
    [(_, frame)] = wire.out(result)
    payload = bytes(frame[UDP].payload)
    answer = dns.message.from_wire(payload)
    assert len(payload) <= 512
    assert answer.flags & dns.flags.TC
    assert 0 < len(addresses(answer)) < 100
    assert set(addresses(answer)) <= many_tasks(wire)


@pytest.mark.parametrize("offered, limit", [(1232, 1232), (600, 600), (400, 512), (4096, 1422)])
def test_answer_limited_by_edns_size(wire, offered, limit):
    query = dns.message.make_query("tasks.many", "A", use_edns=0, payload=offered)
    result = wire.ask("redis.1", query)
    [(_, frame)] = wire.out(result)
    payload = bytes(frame[UDP].payload)
    answer = dns.message.from_wire(payload)
    assert limit - 16 < len(payload) <= limit  # 1422: overlay MTU 1450 minus IPv4 and UDP headers
    assert answer.flags & dns.flags.TC
    assert answer.edns == 0


def test_edns_answer_that_fits_has_no_tc(wire):
    query = dns.message.make_query("tasks.web", "A", use_edns=0, payload=1232)
    answer = wire.answer(wire.ask("redis.1", query), wire.port("redis.1", "vote"))
    assert not answer.flags & dns.flags.TC
    assert len(addresses(answer)) == 2


# ---- TCP ------------------------------------------------------------------------------------


class TcpClient:
    """A DNS-over-TCP client in a sandbox, one segment at a time."""

    def __init__(self, wire: Resolv, sandbox: str, sport: int = 45000, isn: int = 1000, mss: int = 400):
        self.wire, self.sandbox, self.sport, self.mss = wire, sandbox, sport, mss
        self.network = wire.first_network(sandbox)
        self.port = wire.port(sandbox, self.network)
        self.seq = isn
        self.ack = 0

    def segment(self, flags: str, payload: bytes = b"", seq: int | None = None, options=None, window: int = 65535):
        gw_ip, gw_mac = self.wire.gateway(self.network)
        tcp = TCP(sport=self.sport, dport=53, seq=self.seq if seq is None else seq, ack=self.ack, flags=flags, window=window)
        if options:
            tcp.options = options
        frame = Ether(src=self.wire.mac(self.sandbox, self.network), dst=gw_mac) / IP(
            src=self.wire.ip(self.sandbox, self.network), dst=gw_ip
        ) / tcp
        if payload:
            frame = frame / Raw(payload)
        return frame

    def send(self, frame, now: float = 0.0) -> list[TCP]:
        result = self.wire.send([(self.port, frame)], now=now)
        self.last = result
        out = []
        for port, reply in self.wire.out(result):
            assert port == self.port
            out.append(reply[TCP])
        return out

    def connect(self, now: float = 0.0) -> TCP:
        [syn_ack] = self.send(self.segment("S", options=[("MSS", self.mss)]), now)
        self.seq += 1
        self.ack = syn_ack.seq + 1
        assert self.send(self.segment("A"), now) == []
        return syn_ack

    def request(self, query: dns.message.Message, now: float = 0.0) -> list[TCP]:
        wire = query.to_wire()
        data = len(wire).to_bytes(2, "big") + wire
        segments = self.send(self.segment("PA", data), now)
        self.seq += len(data)
        return segments


def stream_of(segments: list[TCP]) -> bytes:
    return b"".join(bytes(s.payload) for s in segments)


def test_tcp_full_exchange_returns_whole_answer(wire):
    client = TcpClient(wire, "redis.1")
    syn_ack = client.connect()
    assert syn_ack.flags == "SA"
    assert dict(syn_ack.options)["MSS"] == 1450 - 40

    segments = client.request(dns.message.make_query("tasks.many", "A"))
    assert all(len(s.payload) <= 400 for s in segments)
    assert len(segments) > 1
    assert [s.flags.F for s in segments] == [False] * (len(segments) - 1) + [True]
    data = stream_of(segments)
    length = int.from_bytes(data[:2], "big")
    assert length == len(data) - 2
    answer = dns.message.from_wire(data[2:])
    assert not answer.flags & dns.flags.TC
    assert set(addresses(answer)) == many_tasks(wire)

    # The client acknowledges everything and closes; the resolver acknowledges the FIN.
    client.ack = segments[-1].seq + len(segments[-1].payload) + 1
    assert client.send(client.segment("A")) == []
    [fin_ack] = client.send(client.segment("FA"))
    assert fin_ack.flags == "A"
    assert fin_ack.ack == client.seq + 1
    assert resolver_of(wire, "node1").tcp.connections == {}


def test_tcp_segments_follow_sequence_numbers(wire):
    client = TcpClient(wire, "redis.1")
    syn_ack = client.connect()
    segments = client.request(dns.message.make_query("tasks.many", "A"))
    expected = syn_ack.seq + 1
    for segment in segments:
        assert segment.seq == expected
        expected += len(segment.payload)
    assert all(s.ack == client.seq for s in segments)


def test_tcp_request_split_over_segments(wire):
    client = TcpClient(wire, "redis.1")
    client.connect()
    query = dns.message.make_query("redis", "A")
    data = len(query.to_wire()).to_bytes(2, "big") + query.to_wire()
    [ack] = client.send(client.segment("A", data[:1]))  # the first byte of the length prefix
    assert ack.ack == client.seq + 1
    client.seq += 1
    segments = client.send(client.segment("PA", data[1:]))
    answer = dns.message.from_wire(stream_of(segments)[2:])
    assert addresses(answer) == [str(wire.cluster.services["redis"].vips["vote"])]


def test_tcp_out_of_order_data_not_kept(wire):
    client = TcpClient(wire, "redis.1")
    client.connect()
    [ack] = client.send(client.segment("PA", b"\x00\x20rest", seq=client.seq + 10))
    assert ack.ack == client.seq
    assert len(ack.payload) == 0


def test_tcp_answer_retransmitted_after_timeout(wire):
    client = TcpClient(wire, "redis.1")
    client.connect(now=0.0)
    segments = client.request(dns.message.make_query("tasks.many", "A"), now=0.0)
    first = segments[0]

    assert wire.fabric.tick(0.5).emits == []
    [again] = [TCP(e.frame[34:]) for e in wire.fabric.tick(1.0).emits]
    assert again.seq == first.seq
    assert bytes(again.payload) == bytes(first.payload)
    assert wire.fabric.tick(2.5).emits == []  # the timeout doubled to 2 s
    assert len(wire.fabric.tick(3.0).emits) == 1


def test_tcp_syn_ack_retransmitted_then_connection_reset(wire):
    client = TcpClient(wire, "redis.1")
    [syn_ack] = client.send(client.segment("S"), now=0.0)
    now, resent = 0.0, []
    for _ in range(dns_tcp.MAX_RETRANSMISSIONS + 1):
        now += 100.0  # past any timeout, but the idle timeout is checked after retransmission
        resent += [TCP(e.frame[34:]) for e in wire.fabric.tick(now).emits]
    assert [s.flags for s in resent[:-1]] == ["SA"] * dns_tcp.MAX_RETRANSMISSIONS
    assert all(s.seq == syn_ack.seq for s in resent[:-1])
    assert "R" in str(resent[-1].flags)
    assert wire.fabric.decisions["dns-tcp-abort"] == 1
    assert resolver_of(wire, "node1").tcp.connections == {}


def test_tcp_idle_connection_is_reset(wire):
    client = TcpClient(wire, "redis.1")
    client.connect(now=0.0)
    emits = wire.fabric.tick(dns_tcp.IDLE_TIMEOUT).emits
    [reset] = [TCP(e.frame[34:]) for e in emits]
    assert "R" in str(reset.flags)
    assert wire.fabric.decisions["dns-tcp-abort"] == 1


def test_tcp_segment_for_no_connection_gets_rst(wire):
    client = TcpClient(wire, "redis.1")
    client.ack = 12345
    [reset] = client.send(client.segment("A", b"\x00\x01x"))
    assert reset.flags == "R"
    assert reset.seq == 12345
    assert client.last.records[0].reason == "dns-tcp-unexpected"


def test_tcp_short_message_is_dropped_and_closed(wire):
    client = TcpClient(wire, "redis.1")
    client.connect()
    [fin] = client.send(client.segment("PA", b"\x00\x03abc"))
    assert fin.flags == "FA"
    assert fin.ack == client.seq + 5
    assert client.last.records[0].reason == "dns-malformed"


def test_tcp_client_reset_forgets_connection(wire):
    client = TcpClient(wire, "redis.1")
    client.connect()
    assert client.send(client.segment("R")) == []
    assert resolver_of(wire, "node1").tcp.connections == {}


def test_tcp_connection_limit_drops_syn(wire):
    node = resolver_of(wire, "node1")
    node.tcp.max_connections = 2
    for sport in (1001, 1002):
        TcpClient(wire, "redis.1", sport=sport).connect()
    client = TcpClient(wire, "redis.1", sport=1003)
    assert client.send(client.segment("S")) == []
    assert client.last.records[0].reason == "dns-busy"


def resolver_of(wire: Resolv, node: str) -> resolver.Resolver:
    [stage] = [s for s in wire.fabric.nodes[node].l3_stages if isinstance(s, resolver.Resolver)]
    return stage


# ---- forwarding ------------------------------------------------------------------------------


def forward(forwarding: Resolv, name: str = "example.test", sandbox: str = "redis.1", now: float = 0.0):
    query = dns.message.make_query(name, "A")
    result = forwarding.ask(sandbox, query, now=now, sport=41000)
    [(port, frame)] = forwarding.out(result)
    return query, result, port, frame


def test_unknown_name_is_forwarded_from_node_address(forwarding):
    query, result, port, frame = forward(forwarding)
    assert port == forwarding.upstream_port("node1")
    assert (frame[IP].src, frame[IP].dst) == (forwarding.node_ip("node1"), UPSTREAM_1)
    assert frame[UDP].dport == 53
    assert resolver.SOURCE_PORT_MIN <= frame[UDP].sport <= resolver.SOURCE_PORT_MAX
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    assert sent.question == query.question
    assert result.records[0].verdict == "deliver"


def test_forwarded_query_from_second_node_leaves_there(forwarding):
    _, _, port, frame = forward(forwarding, sandbox="redis.2")
    assert port == forwarding.upstream_port("node2")
    assert frame[IP].src == forwarding.node_ip("node2")


def test_upstream_reply_is_relayed_with_client_id(forwarding):
    query, _, _, frame = forward(forwarding)
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    reply = dns.message.make_response(sent)
    reply.answer.append(dns.rrset.from_text(sent.question[0].name, 300, "IN", "A", "10.0.9.250"))
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(frame, reply))])
    [(port, out)] = forwarding.out(result)
    assert port == forwarding.port("redis.1", "vote")
    assert out[UDP].dport == 41000
    answer = dns.message.from_wire(bytes(out[UDP].payload))
    assert answer.id == query.id
    assert addresses(answer) == ["10.0.9.250"]
    assert resolver_of(forwarding, "node1").pending == {}


def test_upstream_nxdomain_is_relayed(forwarding):
    _, _, _, frame = forward(forwarding)
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    reply = dns.message.make_response(sent)
    reply.set_rcode(dns.rcode.NXDOMAIN)
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(frame, reply))])
    answer = forwarding.answer(result, forwarding.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.NXDOMAIN


def test_upstream_timeout_tries_next_then_servfail(forwarding):
    query, _, _, first = forward(forwarding, now=10.0)
    assert forwarding.fabric.tick(13.9).emits == []

    [second] = forwarding.fabric.tick(14.0).emits
    assert second.port == forwarding.upstream_port()
    assert Ether(second.frame)[IP].dst == UPSTREAM_2

    [servfail] = forwarding.fabric.tick(18.0).emits
    assert servfail.port == forwarding.port("redis.1", "vote")
    answer = dns.message.from_wire(bytes(Ether(servfail.frame)[UDP].payload))
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.id == query.id
    assert forwarding.fabric.decisions["dns-upstream-timeout"] == 2


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_upstream_failure_answers_servfail(forwarding, rcode):
    _, _, _, first = forward(forwarding)
    failing = dns.message.make_response(dns.message.from_wire(bytes(first[UDP].payload)))
    failing.set_rcode(rcode)
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(first, failing))])
    [(port, second)] = forwarding.out(result)
    assert port == forwarding.upstream_port()
    assert second[IP].dst == UPSTREAM_2

    failing = dns.message.make_response(dns.message.from_wire(bytes(second[UDP].payload)))
    failing.set_rcode(rcode)
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(second, failing))])
    answer = forwarding.answer(result, forwarding.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert forwarding.fabric.decisions["dns-upstream-failed"] == 2


@pytest.mark.parametrize(
    "change, detail",
    [
        ("id", "wrong query id"),
        ("source", "wrong upstream address"),
        ("sport", "wrong source port"),
        ("question", "another question"),
    ],
)
def test_unexpected_upstream_reply_is_dropped(forwarding, change, detail):
    _, _, _, frame = forward(forwarding)
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    reply = dns.message.make_response(sent)
    kwargs = {}
    if change == "id":
        reply.id = (reply.id + 1) & 0xFFFF
    elif change == "source":
        kwargs["source"] = "198.51.100.99"
    elif change == "sport":
        kwargs["sport"] = 5353
    else:
        other = dns.message.make_query("other.test", "A")
        other.id = sent.id
        reply = dns.message.make_response(other)
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(frame, reply, **kwargs))])
    assert result.emits == [], detail
    assert result.records[0].reason == "dns-upstream-unexpected"
    assert len(resolver_of(forwarding, "node1").pending) == 1


def test_upstream_reply_for_removed_client_is_dropped(forwarding):
    _, _, _, frame = forward(forwarding)
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    smaller = compile_stack(upstreams=True)
    del smaller.sandboxes["redis.1"]
    forwarding.fabric.update_cluster(smaller)
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(frame, dns.message.make_response(sent)))])
    assert result.emits == []
    assert result.records[0].reason == "dns-unknown-sandbox"


def test_large_upstream_answer_is_truncated_for_client(forwarding):
    _, _, _, frame = forward(forwarding)
    sent = dns.message.from_wire(bytes(frame[UDP].payload))
    reply = dns.message.make_response(sent)
    reply.answer.append(
        dns.rrset.from_text_list(sent.question[0].name, 300, "IN", "A", [f"10.0.9.{i}" for i in range(2, 102)])
    )
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(frame, reply))])
    [(_, out)] = forwarding.out(result)
    payload = bytes(out[UDP].payload)
    assert len(payload) <= 512
    assert dns.message.from_wire(payload).flags & dns.flags.TC


def test_tcp_query_is_forwarded_and_answered_over_tcp(forwarding):
    client = TcpClient(forwarding, "redis.1")
    client.connect()
    query = dns.message.make_query("example.test", "A")
    data = len(query.to_wire()).to_bytes(2, "big") + query.to_wire()
    result = forwarding.send([(client.port, client.segment("PA", data))])
    client.seq += len(data)
    outs = forwarding.out(result)
    [(_, ack)] = [(p, f) for p, f in outs if p == client.port]
    [(_, upstream)] = [(p, f) for p, f in outs if p == forwarding.upstream_port()]
    assert ack[TCP].ack == client.seq
    sent = dns.message.from_wire(bytes(upstream[UDP].payload))
    assert sent.payload == resolver.UPSTREAM_TCP_PAYLOAD

    reply = dns.message.make_response(sent)
    reply.answer.append(dns.rrset.from_text(sent.question[0].name, 300, "IN", "A", "10.0.9.250"))
    result = forwarding.send([(forwarding.upstream_port(), forwarding.from_upstream(upstream, reply))])
    segments = [f[TCP] for p, f in forwarding.out(result)]
    answer = dns.message.from_wire(stream_of(segments)[2:])
    assert answer.id == query.id
    assert addresses(answer) == ["10.0.9.250"]
    assert segments[-1].flags.F


def test_no_upstream_gives_nxdomain(wire):
    answer = wire.lookup("redis.1", "example.test")
    assert answer.rcode() == dns.rcode.NXDOMAIN


def test_internal_network_never_forwards(forwarding):
    answer = forwarding.lookup("vault.1", "example.test")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert forwarding.fabric.tx_packets[forwarding.upstream_port()] == 0


def test_internal_network_still_resolves_its_names(forwarding):
    answer = forwarding.lookup("vault.1", "vault")
    assert addresses(answer) == [str(forwarding.cluster.services["vault"].vips["secret"])]


# ---- changes of the model ------------------------------------------------------------------------


def test_task_removed_in_place_is_gone_at_once(cluster):
    wire = Resolv(cluster=compile_stack())
    removed = wire.ip("redis.3", "vote")
    assert removed in addresses(wire.lookup("redis.1", "tasks.redis"))
    del wire.cluster.sandboxes["redis.3"]
    answer = wire.lookup("redis.1", "tasks.redis")
    assert removed not in addresses(answer)
    assert len(addresses(answer)) == 2
    assert wire.lookup("redis.1", "redis.3").rcode() == dns.rcode.NXDOMAIN


def test_scale_down_through_update_cluster(cluster):
    wire = Resolv(cluster=compile_stack(replicas=5))
    before = set(addresses(wire.lookup("redis.1", "tasks.many")))
    smaller = compile_stack(replicas=3)
    wire.fabric.update_cluster(smaller)
    wire.cluster = smaller
    after = set(addresses(wire.lookup("redis.1", "tasks.many")))
    assert len(before) == 5
    assert after == {str(s.endpoint_on("vote").ip) for s in smaller.sandboxes.values() if s.service == "many"}
    assert len(after) == 3


# ---- bad input ---------------------------------------------------------------------------------------


def test_query_shorter_than_header_is_dropped(wire):
    result = wire.send([wire.udp("redis.1", b"\x12\x34\x01")])
    assert result.emits == []
    assert result.records[0].reason == "dns-malformed"


def test_response_sent_to_resolver_is_dropped(wire):
    response = dns.message.make_response(dns.message.make_query("redis", "A"))
    result = wire.send([wire.udp("redis.1", response.to_wire())])
    assert result.emits == []
    assert result.records[0].reason == "dns-not-query"


def test_unparseable_query_gets_formerr_with_its_id(wire):
    query = dns.message.make_query("redis", "A")
    garbage = query.to_wire()[:-3]  # the question's type and class cut short
    result = wire.send([wire.udp("redis.1", garbage)])
    answer = wire.answer(result, wire.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.FORMERR
    assert answer.id == query.id


def test_two_questions_get_formerr(wire):
    query = dns.message.make_query("redis", "A")
    query.question.append(dns.message.make_query("web", "A").question[0])
    answer = wire.answer(wire.ask("redis.1", query), wire.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.FORMERR


def test_other_opcode_gets_notimp(wire):
    query = dns.message.make_query("redis", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    answer = wire.answer(wire.ask("redis.1", query), wire.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.NOTIMP


def test_edns_version_1_gets_badvers(wire):
    query = dns.message.make_query("redis", "A", use_edns=1)
    answer = wire.answer(wire.ask("redis.1", query), wire.port("redis.1", "vote"))
    assert answer.rcode() == dns.rcode.BADVERS


def test_bad_udp_checksum_is_dropped(wire):
    port, frame = wire.udp("redis.1", dns.message.make_query("redis", "A").to_wire())
    raw = bytearray(bytes(frame))
    raw[40] ^= 0xFF  # the UDP checksum (Ethernet 14 + IPv4 20 + 6)
    result = wire.send([(port, bytes(raw))])
    assert result.emits == []
    assert result.records[0].reason == "dns-bad-checksum"


def test_other_traffic_to_gateway_passes_resolver(wire):
    port, frame = wire.udp("redis.1", b"hello")
    frame[UDP].dport = 54
    result = wire.send([(port, frame)])
    assert result.records[0].reason == "gateway-no-service"


# ---- fuzzing ------------------------------------------------------------------------------------------

VALID_QUERIES = [
    dns.message.make_query(name, rdtype, use_edns=edns).to_wire()
    for name in ("redis", "tasks.many", "redis.2.vote", "example.test", "9.0.0.10.in-addr.arpa")
    for rdtype in ("A", "AAAA", "PTR", "TXT")
    for edns in (None, 0)
]
CLIENT_LIMIT = 1450 - 28  # no answer is larger than the overlay endpoint's MTU allows
FUZZ = Resolv(upstreams=True, cluster=compile_stack(upstreams=True, replicas=20))


@st.composite
def mutated_queries(draw):
    wire = bytearray(draw(st.sampled_from(VALID_QUERIES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(wire) - 1))
        wire[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(wire)))
    return bytes(wire[:cut] if draw(st.booleans()) else wire)


def check_outcome(result, limit: int = CLIENT_LIMIT) -> None:
    [record] = result.records
    assert record.verdict in ("reply", "deliver", "drop")
    if record.verdict == "drop":
        assert record.reason in reasons.BY_CODE
    assert len(result.emits) <= 1
    for emit in result.emits:
        frame = Ether(emit.frame)
        if emit.port != FUZZ.upstream_port():
            assert len(bytes(frame[UDP].payload)) <= limit


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(st.binary(max_size=600), mutated_queries()))
def test_fuzzed_queries_never_raise(payload):
    result = FUZZ.send([FUZZ.udp("redis.1", payload)])
    check_outcome(result)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(st.binary(max_size=600), mutated_queries()), awaited_id=st.booleans())
def test_fuzzed_upstream_replies_never_raise(payload, awaited_id):
    resolver_of(FUZZ, "node1").pending.clear()
    _, _, _, frame = forward(FUZZ, sandbox="redis.1")
    if awaited_id:
        payload = bytes(frame[UDP].payload)[:2] + payload[2:]
    result = FUZZ.send([(FUZZ.upstream_port(), FUZZ.from_upstream(frame, payload))])
    check_outcome(result)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flags=st.sampled_from(["S", "A", "PA", "FA", "R", "SA", "F", "", "RA", "SF"]),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=80),
    sport=st.integers(1024, 1030),
)
def test_fuzzed_tcp_segments_never_raise(flags, seq, ack, payload, sport):
    client = TcpClient(FUZZ, "redis.1", sport=sport)
    client.ack = ack
    result = FUZZ.send([(client.port, client.segment(flags, payload, seq=seq))])
    [record] = result.records
    assert record.verdict in ("reply", "deliver", "drop")
    if record.verdict == "drop":
        assert record.reason in reasons.BY_CODE
    assert len(result.emits) <= 2
