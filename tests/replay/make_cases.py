"""Build the replay regression cases under tests/replay/.

    python tests/replay/make_cases.py                      # inputs, and expected outputs that are missing
    python tests/replay/make_cases.py --regen              # inputs, and every expected output rewritten
    python tests/replay/make_cases.py --regen arp-gateway  # the same for the named cases only

Each case directory contains these files.
  case.yml         What the case shows, its stack (`demo` for the built-in
                   demo, else `stack.yml`) and seed, and hand-written
                   expectations: drops by reason, frames per port, and field
                   values and story fragments of chosen frames.
  stack.yml        The case's own stack, when it does not use the demo.
  input.pcapng     Frames built with scapy, one interface per ingress port.
  expected.pcapng  The replay's output, written by running the replay.

An expected output is written only when the replay meets the case's
expectations, so a regenerated file cannot silently record wrong behaviour.
Review a regenerated file before committing it, for example with
`tshark -r tests/replay/CASE/expected.pcapng -T fields -e frame.interface_name -e _ws.col.Info -e frame.comment`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tapnet.batch import FrameBatch  # noqa: E402
from tapnet.datapath import Fabric  # noqa: E402
from tapnet.model import Cluster, format_mac, port_name  # noqa: E402
from tapnet.pcapio import PcapNgWriter  # noqa: E402
from tapnet.stack import load_demo, load_stack_text  # noqa: E402
from tapnet.testing import expectation_failures, run_replay  # noqa: E402

BROADCAST = "ff:ff:ff:ff:ff:ff"
PING_PAYLOAD = "tapnet replay case"
START = 1_700_000_000.0  # capture time of a case's first frame (2023-11-14 22:13:20 UTC)
STEP = 0.001  # seconds between consecutive frames, unless a case sets its own times

# A destination outside every network of the stacks below and apart from the
# machine's own addresses: the shared address space of RFC 6598. The frame is
# only data in a capture file; the replay sends nothing anywhere.
OUTSIDE_ADDRESS = "100.64.7.7"

# The cases' own stack: three tasks on one bridge network so flooding and
# forwarding differ in which ports see a frame, a task on two networks, and an
# internal network. Subnets differ from every address of the machine's root
# namespace (192.0.2.0/24 and fd00::/64 here).
SMALL_STACK = """\
services:
  web:
    deploy:
      replicas: 3
    networks: [front]
  cache:
    networks: [front, back]
  db:
    networks: [back]
  locked:
    networks: [vault]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 172.30.1.0/24
  back:
    driver: bridge
    ipam:
      config:
        - subnet: 172.30.2.0/24
  vault:
    driver: bridge
    internal: true
    ipam:
      config:
        - subnet: 172.30.3.0/24
"""


class Net:
    """Addresses and port names of a compiled stack, looked up by sandbox and network."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def _endpoint(self, sandbox: str, network: str):
        endpoint = self.cluster.sandboxes[sandbox].endpoint_on(network)
        if endpoint is None:
            raise KeyError(f"{sandbox} has no endpoint on {network}")
        return endpoint

    def port(self, sandbox: str, network: str) -> str:
        box = self.cluster.sandboxes[sandbox]
        return port_name(box.node, sandbox, self._endpoint(sandbox, network).ifname)

    def ip(self, sandbox: str, network: str) -> str:
        return str(self._endpoint(sandbox, network).ip)

    def mac(self, sandbox: str, network: str) -> str:
        return format_mac(self._endpoint(sandbox, network).mac)

    def gateway_ip(self, network: str) -> str:
        return str(self.cluster.networks[network].gateway)

    def gateway_mac(self, network: str) -> str:
        return format_mac(self.cluster.networks[network].gateway_mac)

    def frame(self, sandbox: str, network: str, dst_mac: str):
        """Ether header of a frame that `sandbox` sends on `network`."""
        return Ether(src=self.mac(sandbox, network), dst=dst_mac)

    def hello(self, sandbox: str, network: str, target: str):
        """Broadcast ARP request from `sandbox` for `target`: makes the bridge learn the sender."""
        return self.frame(sandbox, network, BROADCAST) / ARP(
            op=1, hwsrc=self.mac(sandbox, network), psrc=self.ip(sandbox, network), pdst=target
        )

    def ping(self, sandbox: str, network: str, dst_mac: str, dst_ip: str, seq: int = 1):
        return (
            self.frame(sandbox, network, dst_mac)
            / IP(src=self.ip(sandbox, network), dst=dst_ip, id=seq, ttl=64)
            / ICMP(type=8, id=0x7A, seq=seq)
            / PING_PAYLOAD.encode()
        )


@dataclass
class Sent:
    port: str
    frame: object  # a scapy packet or raw bytes
    time: float


@dataclass
class Case:
    name: str
    description: str
    uses_demo: bool
    build: Callable[[Net], tuple[list[Sent], dict]]  # frames to send and the expectations
    seed: int = 0
    stack_text: str = field(default=SMALL_STACK)


def _in_sequence(net_frames: list[tuple[str, object]], start: float = START) -> list[Sent]:
    return [Sent(port, frame, start + i * STEP) for i, (port, frame) in enumerate(net_frames)]


# ---------------------------------------------------------------------------
# The cases


def arp_gateway(net: Net):
    proxy, app = net.port("proxy.1", "front"), net.port("app.1", "front")
    sent = _in_sequence([(proxy, net.hello("proxy.1", "front", net.gateway_ip("front")))])
    expect = {
        "drops": {},
        # The reply goes back to proxy; the broadcast request itself floods to
        # app's front endpoint, and never to back (app's eth1, db).
        "frames": {proxy: 1, app: 1},
        "checks": [
            {
                "port": proxy,
                "index": 0,
                "fields": {
                    "eth.dst": net.mac("proxy.1", "front"),
                    "eth.src": net.gateway_mac("front"),
                    "arp.opcode": 2,
                    "arp.src.hw_mac": net.gateway_mac("front"),
                    "arp.src.proto_ipv4": net.gateway_ip("front"),
                    "arp.dst.hw_mac": net.mac("proxy.1", "front"),
                    "arp.dst.proto_ipv4": net.ip("proxy.1", "front"),
                },
                "comment": "arp-reply",
            },
            {"port": app, "index": 0, "fields": {"arp.opcode": 1}, "comment": "flood"},
        ],
    }
    return sent, expect


def icmp_gateway(net: Net):
    proxy = net.port("proxy.1", "front")
    request = net.ping("proxy.1", "front", net.gateway_mac("front"), net.gateway_ip("front"), seq=3)
    expect = {
        "drops": {},
        "frames": {proxy: 1},
        "checks": [
            {
                "port": proxy,
                "index": 0,
                "fields": {
                    "eth.src": net.gateway_mac("front"),
                    "eth.dst": net.mac("proxy.1", "front"),
                    "ip.src": net.gateway_ip("front"),
                    "ip.dst": net.ip("proxy.1", "front"),
                    "icmp.type": 0,
                    "icmp.ident": 0x7A,
                    "icmp.seq": 3,
                    "data.data": PING_PAYLOAD,
                },
                "comment": "echo-reply",
            }
        ],
    }
    return _in_sequence([(proxy, request)]), expect


def demo_isolation(net: Net):
    app_back, db = net.port("app.1", "back"), net.port("db.1", "back")
    proxy = net.port("proxy.1", "front")
    frames = [
        # db announces itself, so the bridge of back learns db's MAC.
        (db, net.hello("db.1", "back", net.ip("app.1", "back"))),
        # app pings db on their shared network: bridged to db's port.
        (app_back, net.ping("app.1", "back", net.mac("db.1", "back"), net.ip("db.1", "back"))),
        # proxy (front only) sends to db's address through front's gateway: isolation.
        (proxy, net.ping("proxy.1", "front", net.gateway_mac("front"), net.ip("db.1", "back"))),
    ]
    expect = {
        "drops": {"isolation": 1},
        "frames": {app_back: 1, db: 1},
        "checks": [
            {"port": db, "index": 0, "fields": {"ip.src": net.ip("app.1", "back"), "icmp.type": 8}, "comment": "fdb-hit"},
        ],
    }
    return _in_sequence(frames), expect


def no_egress(net: Net):
    proxy = net.port("proxy.1", "front")
    frames = [
        (proxy, net.ping("proxy.1", "front", net.gateway_mac("front"), OUTSIDE_ADDRESS)),
        (
            proxy,
            net.frame("proxy.1", "front", net.gateway_mac("front"))
            / IP(src=net.ip("proxy.1", "front"), dst=OUTSIDE_ADDRESS, id=2)
            / UDP(sport=40000, dport=53)
            / (b"\x00" * 12),
        ),
    ]
    return _in_sequence(frames), {"drops": {"no-egress": 2}, "frames": {}}


def unknown_unicast_flood(net: Net):
    web = [net.port(f"web.{n}", "front") for n in (1, 2, 3)]
    cache_front, cache_back = net.port("cache.1", "front"), net.port("cache.1", "back")
    db = net.port("db.1", "back")
    frames = [
        # cache sends on front to web.2's MAC, which no frame has shown yet:
        # flooded to the other front ports only.
        (cache_front, net.ping("cache.1", "front", net.mac("web.2", "front"), net.ip("web.2", "front"))),
        # the same on back: flooded to db only.
        (cache_back, net.ping("cache.1", "back", net.mac("db.1", "back"), net.ip("db.1", "back"))),
    ]
    expect = {
        "drops": {},
        "frames": {web[0]: 1, web[1]: 1, web[2]: 1, db: 1},
        "checks": [
            {"port": web[0], "index": 0, "fields": {"ip.dst": net.ip("web.2", "front")}, "comment": "unknown unicast"},
            {"port": db, "index": 0, "fields": {"ip.src": net.ip("cache.1", "back")}, "comment": "unknown unicast"},
        ],
    }
    return _in_sequence(frames), expect


def learned_unicast(net: Net):
    web1, web2, web3 = (net.port(f"web.{n}", "front") for n in (1, 2, 3))
    cache = net.port("cache.1", "front")
    frames = [
        # web.2 broadcasts: flooded to web.1, web.3 and cache; the bridge learns web.2.
        (web2, net.hello("web.2", "front", net.ip("web.1", "front"))),
        # web.1 sends to web.2's MAC: forwarded to web.2 alone.
        (web1, net.ping("web.1", "front", net.mac("web.2", "front"), net.ip("web.2", "front"))),
    ]
    expect = {
        "drops": {},
        "frames": {web1: 1, web2: 1, web3: 1, cache: 1},
        "checks": [
            {"port": web2, "index": 0, "fields": {"ip.src": net.ip("web.1", "front"), "icmp.type": 8}, "comment": "fdb-hit"},
            {"port": web3, "index": 0, "fields": {"arp.opcode": 1}},
        ],
    }
    return _in_sequence(frames), expect


def mac_ageing(net: Net):
    web1, web2, web3 = (net.port(f"web.{n}", "front") for n in (1, 2, 3))
    cache = net.port("cache.1", "front")
    sent = [
        # web.2 and web.3 speak once at START, then fall silent.
        Sent(web2, net.hello("web.2", "front", net.ip("web.1", "front")), START),
        Sent(web3, net.hello("web.3", "front", net.ip("web.1", "front")), START + STEP),
        # 299 s later web.2's entry is alive (Linux bridge ageing time 300 s): forwarded.
        Sent(web1, net.ping("web.1", "front", net.mac("web.2", "front"), net.ip("web.2", "front"), 1), START + 299.0),
        # 301 s after web.3 spoke its entry has aged out: flooded again.
        Sent(web1, net.ping("web.1", "front", net.mac("web.3", "front"), net.ip("web.3", "front"), 2), START + STEP + 301.0),
    ]
    expect = {
        "drops": {},
        # web.1: both broadcasts. web.2: web.3's broadcast, the forwarded ping,
        # the flooded ping. web.3: web.2's broadcast, the flooded ping. cache:
        # both broadcasts and the flooded ping.
        "frames": {web1: 2, web2: 3, web3: 2, cache: 3},
        "checks": [
            {"port": web2, "index": 1, "fields": {"icmp.seq": 1}, "comment": "fdb-hit"},
            {"port": web3, "index": 1, "fields": {"icmp.seq": 2}, "comment": "unknown unicast"},
            {"port": web2, "index": 2, "fields": {"icmp.seq": 2}, "comment": "unknown unicast"},
        ],
    }
    return sent, expect


def internal_network(net: Net):
    locked = net.port("locked.1", "vault")
    gateway_mac = net.gateway_mac("vault")
    frames = [
        # To a task of another network of the cluster, and to an outside
        # address: an internal network reaches neither.
        (locked, net.ping("locked.1", "vault", gateway_mac, net.ip("web.1", "front"), 1)),
        (locked, net.ping("locked.1", "vault", gateway_mac, OUTSIDE_ADDRESS, 2)),
    ]
    return _in_sequence(frames), {"drops": {"internal": 2}, "frames": {}}


def _malformed_frames(net: Net) -> list[tuple[str, bytes]]:
    src, dst = net.mac("web.1", "front"), net.gateway_mac("front")
    ether = Ether(src=src, dst=dst)
    ipv4 = IP(src=net.ip("web.1", "front"), dst=net.gateway_ip("front"))
    short_ihl = bytearray(bytes(ether / ipv4 / ICMP()))
    short_ihl[14] = 0x44  # version 4, IHL 4: below the minimum of 5
    return [
        ("malformed-ethernet", bytes(ether)[:10]),
        ("malformed-vlan", bytes(Ether(src=src, dst=dst, type=0x8100)) + b"\x00"),
        ("malformed-arp", bytes(Ether(src=src, dst=BROADCAST) / ARP())[:30]),
        ("malformed-ipv4", bytes(short_ihl)),
        ("malformed-ipv4", bytes(ether / IP(src=ipv4.src, dst=ipv4.dst, len=400) / ICMP())),
        # IPv4 total length 24: room for only 4 of ICMP's 8 header bytes.
        ("malformed-icmp", bytes(ether / IP(src=ipv4.src, dst=ipv4.dst, proto=1) / b"\x08\x00\x00\x00")),
        ("malformed-udp", bytes(ether / ipv4 / UDP(len=200) / (b"x" * 20))),
        ("malformed-tcp", bytes(ether / ipv4 / TCP(dataofs=2))),
        ("malformed-ipv6", bytes(Ether(src=src, dst=dst, type=0x86DD)) + b"\x60" + b"\x00" * 10),
    ]


def malformed(net: Net):
    web1 = net.port("web.1", "front")
    built = _malformed_frames(net)
    drops: dict[str, int] = {}
    for reason, _frame in built:
        drops[reason] = drops.get(reason, 0) + 1
    # A well-formed ping last: malformed frames before it leave the datapath working.
    frames = [(web1, frame) for _reason, frame in built]
    frames.append((web1, net.ping("web.1", "front", net.gateway_mac("front"), net.gateway_ip("front"))))
    expect = {"drops": drops, "frames": {web1: 1}, "checks": [{"port": web1, "index": 0, "fields": {"icmp.type": 0}}]}
    return _in_sequence(frames), expect


# ---------------------------------------------------------------------------
# DNS cases

# A stack for the resolver's own cases: one bridge network with 40 dnsrr tasks
# (their A answer is over 512 bytes) and a client, and two upstreams on the
# default underlay. The upstreams are only addresses in frames of the capture.
DNS_STACK = """\
x-tapnet:
  dns_upstreams: [198.51.100.60, 198.51.100.61]
services:
  web:
    deploy:
      replicas: 40
      endpoint_mode: dnsrr
    networks: [front]
  client:
    networks: [front]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 172.30.5.0/24
"""
UPSTREAM_1 = "198.51.100.60"
UPSTREAM_2 = "198.51.100.61"
# Data of an upstream's A record: an address in TEST-NET-3 that nothing is ever sent to.
UPSTREAM_ANSWER = "203.0.113.80"


def dns_query(net: Net, sandbox: str, network: str, name: str, qtype: str = "A", qid: int = 0x5151, sport: int = 40053):
    """A DNS query over UDP from `sandbox` to its gateway on `network`."""
    return (
        net.frame(sandbox, network, net.gateway_mac(network))
        / IP(src=net.ip(sandbox, network), dst=net.gateway_ip(network), id=qid & 0xFFFF)
        / UDP(sport=sport, dport=53)
        / DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype))
    )


def probe(net: Net, sent: list[Sent], seed: int) -> list[tuple[str, Ether]]:
    """Run `sent` through a fresh datapath as the replay does; return the emitted (port, frame) pairs.

    Cases whose later frames depend on what the datapath drew from its
    generator (a TCP initial sequence number, a forwarded query's id and
    source port) read those values from this run.
    """
    fabric = Fabric(net.cluster)
    batch = FrameBatch(capacity_frames=max(16, len(sent)))
    for item in sent:
        frame = item.frame if isinstance(item.frame, bytes) else bytes(item.frame)
        batch.append(fabric.port_id(item.port), frame, timestamp=item.time)
    result = fabric.process(batch, None, np.random.default_rng(seed))
    return [(fabric.ports[e.port].name, Ether(e.frame)) for e in result.emits]


def dns_names(net: Net):
    worker, proxy, app = net.port("worker.1", "vote"), net.port("proxy.1", "front"), net.port("app.1", "front")
    redis_vip = str(net.cluster.services["redis"].vips["vote"])
    reverse = ".".join(reversed(net.ip("redis.2", "vote").split("."))) + ".in-addr.arpa"
    frames = [
        (worker, dns_query(net, "worker.1", "vote", "redis", qid=1)),
        (worker, dns_query(net, "worker.1", "vote", "tasks.redis", qid=2)),
        (worker, dns_query(net, "worker.1", "vote", "REDIS.vote", qid=3)),
        (worker, dns_query(net, "worker.1", "vote", "redis", "AAAA", qid=4)),
        (worker, dns_query(net, "worker.1", "vote", reverse, "PTR", qid=5)),
        # proxy is on front only: db (on back) is unknown to it, and the demo has no upstream.
        (proxy, dns_query(net, "proxy.1", "front", "db", qid=6)),
        # app asks front's resolver for db's alias on back, app's second network.
        (app, dns_query(net, "app.1", "front", "database", qid=7)),
    ]
    # NOTE: the checks read the answers from the stories, because the field
    # check dissects DNS only when scapy's DNS layer happens to be loaded.
    db_vip = str(net.cluster.services["db"].vips["back"])
    answer = {"ip.src": net.gateway_ip("vote"), "udp.srcport": 53, "udp.dstport": 40053}
    expect = {
        "drops": {},
        "frames": {worker: 5, proxy: 1, app: 1},
        "checks": [
            {"port": worker, "index": 0, "fields": answer, "comment": f"dns: answer (redis. A: {redis_vip} (vip redis on vote))"},
            {"port": worker, "index": 1, "fields": answer, "comment": "(tasks redis on vote)"},
            {"port": worker, "index": 2, "comment": f"dns: answer (REDIS.vote. A: {redis_vip} (vip redis on vote))"},
            {"port": worker, "index": 3, "comment": "dns: no-data (redis. AAAA: known name (vip redis on vote)"},
            {"port": worker, "index": 4, "comment": "PTR: redis.2.vote.)"},
            {"port": proxy, "index": 0, "comment": "dns: nxdomain (db. A: unknown name, no upstream)"},
            {"port": app, "index": 0, "comment": f"dns: answer (database. A: {db_vip} (vip db on back))"},
        ],
    }
    return _in_sequence(frames), expect


def upstream_reply(forwarded: Ether, rcode: int = 0, answer: str | None = None):
    """An upstream's reply to a query frame that the resolver sent on the upstream port."""
    query = forwarded[DNS]
    reply = DNS(id=query.id, qr=1, rd=query.rd, ra=1, rcode=rcode, qd=query.qd)
    if answer is not None:
        reply.an = DNSRR(rrname=query.qd.qname, type="A", ttl=300, rdata=answer)
    return (
        Ether(src=forwarded.dst, dst=forwarded.src)
        / IP(src=forwarded[IP].dst, dst=forwarded[IP].src, ttl=64)
        / UDP(sport=53, dport=forwarded[UDP].sport)
        / reply
    )


def dns_forward(net: Net):
    client, upstream = net.port("client.1", "front"), "node1/upstream"
    gateway_mac, gateway_ip = net.gateway_mac("front"), net.gateway_ip("front")
    sent = [Sent(client, dns_query(net, "client.1", "front", "example.test", qid=0x1001), START)]
    [(_, first)] = probe(net, sent, 0)
    sent += [
        # Upstream 1 answers: the answer is relayed to the client with its id.
        Sent(upstream, upstream_reply(first, answer=UPSTREAM_ANSWER), START + 0.01),
        # A query that no upstream answers.
        Sent(client, dns_query(net, "client.1", "front", "slow.test", qid=0x1002, sport=40054), START + 0.02),
        # Frames at later times run the timers: after 4 s upstream 2 is asked,
        # after 4 s more the client gets SERVFAIL.
        Sent(client, net.ping("client.1", "front", gateway_mac, gateway_ip, seq=1), START + 4.5),
        Sent(client, net.ping("client.1", "front", gateway_mac, gateway_ip, seq=2), START + 9.0),
    ]
    expect = {
        "drops": {},
        "frames": {upstream: 3, client: 4},
        "checks": [
            {"port": upstream, "index": 0, "fields": {"ip.src": "198.51.100.2", "ip.dst": UPSTREAM_1, "udp.dstport": 53}, "comment": "dns: forward (example.test. A to 198.51.100.60"},
            {"port": client, "index": 0, "fields": {"ip.src": net.gateway_ip("front"), "udp.dstport": 40053}, "comment": "dns: relay (example.test. A: NOERROR from 198.51.100.60"},
            {"port": upstream, "index": 1, "fields": {"ip.dst": UPSTREAM_1}, "comment": "dns: forward (slow.test. A to 198.51.100.60"},
            {"port": upstream, "index": 2, "fields": {"ip.dst": UPSTREAM_2}, "comment": "dns: upstream-timeout (slow.test. A: no reply from 198.51.100.60 in 4 s); dns: forward (slow.test. A to 198.51.100.61"},
            {"port": client, "index": 2, "fields": {"udp.dstport": 40054}, "comment": "dns: servfail (slow.test. A: no upstream left"},
        ],
    }
    return sent, expect


def dns_tcp(net: Net):
    client = net.port("client.1", "front")
    gateway_mac, gateway_ip = net.gateway_mac("front"), net.gateway_ip("front")

    def segment(seq: int, ack: int, flags: str, payload: bytes = b"", options=None):
        tcp = TCP(sport=45000, dport=53, seq=seq, ack=ack, flags=flags, window=65535, options=options or [])
        frame = net.frame("client.1", "front", gateway_mac) / IP(src=net.ip("client.1", "front"), dst=gateway_ip) / tcp
        return frame / payload if payload else frame

    query = bytes(DNS(id=0x2002, rd=1, qd=DNSQR(qname="tasks.web", qtype="A")))
    request = len(query).to_bytes(2, "big") + query
    sent = [
        # Over UDP the answer of 40 addresses does not fit in 512 bytes: TC set.
        Sent(client, dns_query(net, "client.1", "front", "tasks.web", qid=0x2001), START),
        Sent(client, segment(1000, 0, "S", options=[("MSS", 536)]), START + 0.01),
    ]
    syn_ack = probe(net, sent, 0)[-1][1][TCP]
    server_seq = syn_ack.seq + 1
    sent += [
        Sent(client, segment(1001, server_seq, "A"), START + 0.02),
        Sent(client, segment(1001, server_seq, "PA", request), START + 0.03),
    ]
    answer = [frame[TCP] for _, frame in probe(net, sent, 0)[2:]]
    answer_end = answer[-1].seq + len(answer[-1].payload) + 1  # the last segment carries the FIN
    client_seq = 1001 + len(request)
    sent += [
        # The client acknowledges nothing for 1.5 s: a frame then runs the timers,
        # and the resolver sends the first unacknowledged segment again.
        Sent(client, net.ping("client.1", "front", gateway_mac, gateway_ip), START + 1.6),
        Sent(client, segment(client_seq, answer_end, "A"), START + 1.7),
        Sent(client, segment(client_seq, answer_end, "FA"), START + 1.71),
    ]
    segments = len(answer)
    expect = {
        "drops": {},
        # UDP answer, SYN-ACK, answer segments, retransmission, echo reply, ACK of the FIN.
        "frames": {client: 1 + 1 + segments + 1 + 1 + 1},
        "checks": [
            {"port": client, "index": 0, "fields": {"udp.srcport": 53}, "comment": "truncated to 512 bytes, TC set"},
            {"port": client, "index": 1, "fields": {"tcp.flags": 0x12, "tcp.ack": 1001}, "comment": "tcp-syn"},
            # Segments of at most the client's MSS of 536 bytes, in sequence.
            {"port": client, "index": 2, "fields": {"tcp.seq": server_seq, "tcp.flags": 0x10}, "comment": "tcp-query"},
            {"port": client, "index": 3, "fields": {"tcp.seq": server_seq + 536}},
            # The last one carries PSH and FIN.
            {"port": client, "index": 1 + segments, "fields": {"tcp.flags": 0x19}},
            {"port": client, "index": 2 + segments, "fields": {"tcp.seq": server_seq, "tcp.flags": 0x10}, "comment": "tcp-retransmit"},
            {"port": client, "index": 4 + segments, "fields": {"tcp.flags": 0x10, "tcp.ack": client_seq + 1}, "comment": "tcp-closed"},
        ],
    }
    return sent, expect


CASES = [
    Case("arp-gateway", "ARP request for the front gateway (demo): the gateway replies, the broadcast floods front only", True, arp_gateway),
    Case("icmp-gateway", "ICMP echo to the front gateway (demo): the gateway replies", True, icmp_gateway),
    Case("isolation", "app reaches db on back; proxy (front only) to db's address is dropped as isolation (demo)", True, demo_isolation),
    Case("no-egress", "traffic to an address outside the cluster is dropped as no-egress (demo)", True, no_egress),
    Case("unknown-unicast-flood", "unknown unicast floods to the other ports of its own network only", False, unknown_unicast_flood),
    Case("learned-unicast", "unicast to a learned MAC goes to that one port", False, learned_unicast),
    Case("mac-ageing", "a MAC silent for 299 s is still known; after 301 s frames to it flood again", False, mac_ageing),
    Case("internal-network", "an internal network reaches neither other networks nor the outside", False, internal_network),
    Case("malformed", "malformed frames are dropped and counted under their reasons", False, malformed),
    Case("dns-names", "the resolver answers service, tasks, alias, sandbox and PTR names on the asker's networks only (demo)", True, dns_names),
    Case("dns-forward", "unknown names go upstream; an answer is relayed, a silent upstream moves on to the next, then SERVFAIL", False, dns_forward, stack_text=DNS_STACK),
    Case("dns-tcp", "an answer too large for UDP sets TC; over TCP it arrives whole, in MSS-sized segments, retransmitted on timeout", False, dns_tcp, stack_text=DNS_STACK),
]


# ---------------------------------------------------------------------------
# Writing the files


def write_input(path: Path, sent: list[Sent]) -> None:
    with open(path, "wb") as stream:
        writer = PcapNgWriter(stream, application="tests/replay/make_cases.py")
        interfaces = [writer.interface_id(s.port) for s in sent]
        frames = [s.frame if isinstance(s.frame, bytes) else bytes(s.frame) for s in sent]
        writer.write_frames(interfaces, frames, [s.time for s in sent])


def build_case(case: Case, regen: bool) -> list[str]:
    """Write one case's files and check its replay; return the expectation failures.

    expected.pcapng is written when missing or with `regen`, and only when there are no failures.
    """
    directory = HERE / case.name
    directory.mkdir(exist_ok=True)
    if case.uses_demo:
        cluster = load_demo()
        stack_file = directory / "stack.yml"
        if stack_file.exists():
            stack_file.unlink()
    else:
        (directory / "stack.yml").write_text(case.stack_text)
        cluster = load_stack_text(case.stack_text)

    sent, expect = case.build(Net(cluster))
    write_input(directory / "input.pcapng", sent)
    description = {
        "description": case.description,
        "stack": "demo" if case.uses_demo else "stack.yml",
        "seed": case.seed,
        "expect": expect,
    }
    (directory / "case.yml").write_text(yaml.safe_dump(description, sort_keys=False, width=120))

    output, result = run_replay(cluster, directory / "input.pcapng", seed=case.seed)
    failures = expectation_failures(output, result, expect)
    expected = directory / "expected.pcapng"
    if not failures and (regen or not expected.exists()):
        expected.write_bytes(output)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the replay regression cases under tests/replay/.")
    parser.add_argument("--regen", action="store_true", help="rewrite expected.pcapng by running the replay")
    parser.add_argument("cases", nargs="*", metavar="CASE", help="only these cases (default: all)")
    args = parser.parse_args(argv)

    known = {case.name: case for case in CASES}
    unknown = [name for name in args.cases if name not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(known)}")
    status = 0
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        failures = build_case(case, args.regen)
        if failures:
            status = 1
            print(f"{case.name}: replay does not meet the expectations; expected.pcapng left unchanged")
            for failure in failures:
                print(f"  {failure}")
        else:
            print(f"{case.name}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
