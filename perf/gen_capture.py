"""Generate a large mixed capture between the demo stack's bridge endpoints, for the parser and replay benchmarks.

    python perf/gen_capture.py OUT.pcapng [--frames N] [--port NAME ...] [--stack FILE] [--seed S]

The frames are what the sandboxes on the demo stack's `front` and `back`
bridge networks (proxy.1, app.1 and db.1 on node1) could send. That is ARP,
ICMP echo to peers and to the gateway, and DNS queries to the gateway. It is
also UDP and TCP of several sizes to peers, and some IPv6 between link-local
addresses. Each port first sends a broadcast ARP request, so a replay's
learning bridge has learned every endpoint before the unicast traffic starts.

Scapy builds one template per (port, peer, kind), a few dozen in all. numpy
then lays out the frames in chunks and varies the source port (4096 flows per
template), the IPv4 id, the TCP sequence number and the ICMP sequence number,
patching the checksums incrementally (RFC 1624). One million frames took
about 23 s on the 2-core benchmark machine (one run, 442 MB).

The output is pcapng with one interface per port, named like the port
(`node1/app.1/eth0`), as `tapnet replay` expects.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tapnet.model import Cluster, Endpoint, Network, format_mac, port_name  # noqa: E402
from tapnet.pcapio import PcapNgWriter  # noqa: E402

DEFAULT_FRAMES = 1_000_000
DEFAULT_SEED = 1
START_TIME = 1_700_000_000.0
FRAME_INTERVAL = 10e-6  # seconds between frames: 100,000 frames per second of capture time
CHUNK = 100_000  # frames laid out and written per step
FLOWS = 4096  # distinct source ports per template
EPHEMERAL_FIRST = 49152  # IANA dynamic port range
SERVICE_PORT = 8080  # the demo stack's app and db serve HTTP here
DNS_PORT = 53

# Share of each kind of frame, in percent. Kinds that go to a peer are split
# evenly over that port's peers.
KIND_WEIGHTS = {
    "arp_request": 2,
    "arp_reply": 2,
    "icmp_echo": 4,
    "icmp_echo_gateway": 2,
    "dns_query_gateway": 3,
    "udp_64": 8,
    "udp_512": 8,
    "udp_1400": 6,
    "tcp_syn": 6,
    "tcp_ack": 19,
    "tcp_data_100": 10,
    "tcp_data_600": 8,
    "tcp_data_1448": 10,
    "tcp_fin": 2,
    "ipv6_icmp_echo": 3,
    "ipv6_udp": 3,
    "ipv6_tcp": 4,
}
GATEWAY_KINDS = {"icmp_echo_gateway", "dns_query_gateway"}

# Transport of a template, for the fields the generator varies.
L4_NONE, L4_TCP, L4_UDP, L4_ICMP = 0, 1, 2, 3


@dataclass
class Station:
    """One end of a template frame: a sandbox endpoint or a network's gateway."""

    port: str | None  # None for the gateway, which sends nothing in the capture
    ip: str
    mac: str
    name: str  # for the DNS query: the sandbox's service name

    @property
    def ip6(self) -> str:
        """Modified EUI-64 link-local address of the MAC (RFC 4291)."""
        octets = bytes.fromhex(self.mac.replace(":", ""))
        eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
        groups = [f"{(eui[i] << 8) | eui[i + 1]:x}" for i in range(0, 8, 2)]
        return "fe80::" + ":".join(groups)


@dataclass
class Template:
    data: np.ndarray
    port: str
    weight: float
    l4: int
    ip_id_off: int = -1  # IPv4 id field; -1 when not IPv4
    ip_csum_off: int = -1
    sport_off: int = -1
    l4_csum_off: int = -1
    seq_off: int = -1  # TCP sequence number
    icmp_seq_off: int = -1  # ICMP or ICMPv6 echo sequence number


def bridge_ports(cluster: Cluster) -> list[str]:
    """Ports of every sandbox endpoint on a bridge network, in the cluster's order."""
    ports = []
    for sandbox in cluster.sandboxes.values():
        for endpoint in sandbox.endpoints:
            if cluster.networks[endpoint.network].driver == "bridge":
                ports.append(port_name(sandbox.node, sandbox.name, endpoint.ifname))
    return ports


def endpoint_of(cluster: Cluster, name: str) -> tuple[Network, Endpoint, str]:
    """Find the endpoint behind a port name `<node>/<sandbox>/<ifname>`."""
    parts = name.split("/")
    if len(parts) != 3:
        raise ValueError(f"invalid port name {name!r}: expected <node>/<sandbox>/<ifname>, like node1/app.1/eth0")
    node, sandbox_name, ifname = parts
    sandbox = cluster.sandboxes.get(sandbox_name)
    if sandbox is None or sandbox.node != node:
        raise ValueError(f"port {name!r} not found: no sandbox {sandbox_name!r} on node {node!r}")
    for endpoint in sandbox.endpoints:
        if endpoint.ifname == ifname:
            return cluster.networks[endpoint.network], endpoint, sandbox.service
    raise ValueError(f"port {name!r} not found: sandbox {sandbox_name!r} has no {ifname!r}")


def stations(cluster: Cluster, ports: list[str]) -> dict[str, tuple[Station, list[Station], Station]]:
    """Map each port to (itself, its peers on the same network, the network's gateway)."""
    by_network: dict[str, list[Station]] = {}
    for sandbox in cluster.sandboxes.values():
        for endpoint in sandbox.endpoints:
            station = Station(port_name(sandbox.node, sandbox.name, endpoint.ifname), str(endpoint.ip), format_mac(endpoint.mac), sandbox.service)
            by_network.setdefault(endpoint.network, []).append(station)
    result = {}
    for name in ports:
        network, endpoint, _ = endpoint_of(cluster, name)
        own = next(s for s in by_network[network.name] if s.port == name)
        peers = [s for s in by_network[network.name] if s.port != name]
        gateway = Station(None, str(network.gateway), format_mac(network.gateway_mac), "gateway")
        if not peers:
            raise ValueError(f"port {name!r} has no peer on network {network.name!r}; choose ports that share a network")
        result[name] = (own, peers, gateway)
    return result


def build_templates(cluster: Cluster, ports: list[str]) -> tuple[list[Template], list[bytes]]:
    """Build the frame templates with scapy; also return each port's opening ARP broadcast."""
    from scapy.all import ARP, DNS, DNSQR, ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest, IPv6, conf

    # Never let scapy resolve a missing MAC: that would send ARP on the machine's network.
    conf.raise_no_dst_mac = True
    conf.neighbor.resolvers = {}

    templates: list[Template] = []
    hellos: list[bytes] = []
    for name, (own, peers, gateway) in stations(cluster, ports).items():
        hellos.append(bytes(Ether(src=own.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=own.mac, psrc=own.ip, pdst=gateway.ip)))
        for kind, percent in KIND_WEIGHTS.items():
            targets = [gateway] if kind in GATEWAY_KINDS else peers
            for peer in targets:
                eth = Ether(src=own.mac, dst=peer.mac)
                ip4 = IP(src=own.ip, dst=peer.ip, flags="DF")
                ip6 = IPv6(src=own.ip6, dst=peer.ip6)
                tcp = dict(sport=EPHEMERAL_FIRST, dport=SERVICE_PORT, seq=1, ack=1, window=502)
                if kind == "arp_request":
                    pkt = Ether(src=own.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=own.mac, psrc=own.ip, pdst=peer.ip)
                elif kind == "arp_reply":
                    pkt = eth / ARP(op=2, hwsrc=own.mac, psrc=own.ip, hwdst=peer.mac, pdst=peer.ip)
                elif kind in ("icmp_echo", "icmp_echo_gateway"):
                    pkt = eth / ip4 / ICMP(type=8, id=0x7A70, seq=1) / (b"\x5a" * 56)
                elif kind == "dns_query_gateway":
                    query = DNS(id=0x7A70, rd=1, qd=DNSQR(qname=peers[0].name, qtype="A"))
                    pkt = eth / ip4 / UDP(sport=EPHEMERAL_FIRST, dport=DNS_PORT) / query
                elif kind.startswith("udp_"):
                    size = int(kind.split("_")[1])
                    pkt = eth / ip4 / UDP(sport=EPHEMERAL_FIRST, dport=SERVICE_PORT) / (b"\x75" * size)
                elif kind == "tcp_syn":
                    options = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
                    pkt = eth / ip4 / TCP(flags="S", options=options, **{**tcp, "ack": 0})
                elif kind == "tcp_ack":
                    pkt = eth / ip4 / TCP(flags="A", **tcp)
                elif kind.startswith("tcp_data_"):
                    size = int(kind.split("_")[2])
                    pkt = eth / ip4 / TCP(flags="PA", **tcp) / (b"\x74" * size)
                elif kind == "tcp_fin":
                    pkt = eth / ip4 / TCP(flags="FA", **tcp)
                elif kind == "ipv6_icmp_echo":
                    pkt = eth / ip6 / ICMPv6EchoRequest(id=0x7A70, seq=1, data=b"\x36" * 56)
                elif kind == "ipv6_udp":
                    pkt = eth / ip6 / UDP(sport=EPHEMERAL_FIRST, dport=SERVICE_PORT) / (b"\x36" * 200)
                elif kind == "ipv6_tcp":
                    pkt = eth / ip6 / TCP(flags="PA", **tcp) / (b"\x36" * 300)
                else:
                    raise AssertionError(kind)
                templates.append(describe_template(pkt, name, percent / len(targets) / len(ports)))
    return templates, hellos


def describe_template(pkt, port: str, weight: float) -> Template:
    """Record where the varied fields sit in a built scapy packet."""
    from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest

    data = bytes(pkt)
    parsed = Ether(data)

    def offset(layer) -> int:
        return len(data) - len(bytes(layer))

    template = Template(np.frombuffer(data, dtype=np.uint8).copy(), port, weight, L4_NONE)
    if IP in parsed:
        l3 = offset(parsed[IP])
        template.ip_id_off, template.ip_csum_off = l3 + 4, l3 + 10
    if TCP in parsed:
        l4 = offset(parsed[TCP])
        template.l4, template.sport_off, template.l4_csum_off, template.seq_off = L4_TCP, l4, l4 + 16, l4 + 4
    elif UDP in parsed:
        l4 = offset(parsed[UDP])
        template.l4, template.sport_off, template.l4_csum_off = L4_UDP, l4, l4 + 6
    elif ICMP in parsed or ICMPv6EchoRequest in parsed:
        l4 = offset(parsed[ICMP] if ICMP in parsed else parsed[ICMPv6EchoRequest])
        template.l4, template.l4_csum_off, template.icmp_seq_off = L4_ICMP, l4 + 2, l4 + 6
    return template


def read16(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    return (buf[at].astype(np.uint32) << 8) | buf[at + 1]


def write16(buf: np.ndarray, at: np.ndarray, value: np.ndarray) -> None:
    buf[at] = (value >> 8) & 0xFF
    buf[at + 1] = value & 0xFF


def patch16(buf: np.ndarray, field: np.ndarray, checksum: np.ndarray, new: np.ndarray, is_udp: np.ndarray) -> None:
    """Write a 16-bit field and update the checksum that covers it: HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3)."""
    old = read16(buf, field)
    total = (~read16(buf, checksum) & 0xFFFF) + (~old & 0xFFFF) + (new.astype(np.uint32) & 0xFFFF)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    result = ~total & 0xFFFF
    # A computed UDP checksum of 0 is sent as 0xFFFF, because 0 means "no checksum" (RFC 768).
    result = np.where(is_udp & (result == 0), 0xFFFF, result)
    write16(buf, field, new)
    write16(buf, checksum, result)


def lay_out_chunk(templates: list[Template], choice: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy the chosen templates into one buffer and vary their fields; return (buf, offsets, lengths)."""
    lengths = np.array([len(t.data) for t in templates], dtype=np.int64)[choice]
    offsets = np.zeros(len(choice), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    buf = np.empty(int(lengths.sum()), dtype=np.uint8)
    for index in np.unique(choice):
        starts = offsets[choice == index]
        data = templates[index].data
        buf[starts[:, None] + np.arange(len(data))] = data

    def column(name: str) -> np.ndarray:
        return np.array([getattr(t, name) for t in templates], dtype=np.int64)[choice]

    count = len(choice)
    is_udp = column("l4") == L4_UDP

    has = column("sport_off") >= 0
    flows = rng.integers(0, FLOWS, size=count)
    patch16(buf, (offsets + column("sport_off"))[has], (offsets + column("l4_csum_off"))[has],
            (EPHEMERAL_FIRST + flows[has]).astype(np.uint32), is_udp[has])

    has = column("ip_id_off") >= 0
    patch16(buf, (offsets + column("ip_id_off"))[has], (offsets + column("ip_csum_off"))[has],
            rng.integers(0, 1 << 16, size=int(has.sum())).astype(np.uint32), np.zeros(int(has.sum()), dtype=bool))

    has = column("seq_off") >= 0
    seq_at = (offsets + column("seq_off"))[has]
    csum_at = (offsets + column("l4_csum_off"))[has]
    no_udp = np.zeros(len(seq_at), dtype=bool)
    patch16(buf, seq_at, csum_at, rng.integers(0, 1 << 16, size=len(seq_at)).astype(np.uint32), no_udp)
    patch16(buf, seq_at + 2, csum_at, rng.integers(0, 1 << 16, size=len(seq_at)).astype(np.uint32), no_udp)

    has = column("icmp_seq_off") >= 0
    patch16(buf, (offsets + column("icmp_seq_off"))[has], (offsets + column("l4_csum_off"))[has],
            rng.integers(1, 1 << 16, size=int(has.sum())).astype(np.uint32), np.zeros(int(has.sum()), dtype=bool))
    return buf, offsets, lengths


def generate(out: Path, frames: int, ports: list[str], cluster: Cluster, seed: int) -> int:
    """Write `frames` frames (at least one opening ARP per port) to `out`; return the number written."""
    rng = np.random.default_rng(seed)
    templates, hellos = build_templates(cluster, ports)
    weights = np.array([t.weight for t in templates], dtype=np.float64)
    weights /= weights.sum()
    with open(out, "wb") as stream:
        writer = PcapNgWriter(stream, application="tapnet perf/gen_capture.py")
        port_ids = {name: writer.interface_id(name) for name in ports}
        template_ports = np.array([port_ids[t.port] for t in templates], dtype=np.int64)

        hello_ports = [port_ids[name] for name in ports]
        writer.write_frames(hello_ports, hellos, START_TIME + FRAME_INTERVAL * np.arange(len(hellos)))
        written = len(hellos)
        while written < frames:
            count = min(CHUNK, frames - written)
            choice = rng.choice(len(templates), size=count, p=weights)
            buf, offsets, lengths = lay_out_chunk(templates, choice, rng)
            chunk = [buf[o : o + n].tobytes() for o, n in zip(offsets.tolist(), lengths.tolist())]
            timestamps = START_TIME + FRAME_INTERVAL * np.arange(written, written + count)
            writer.write_frames(template_ports[choice], chunk, timestamps)
            written += count
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT.pcapng", type=Path, help="capture file to write")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"number of frames (default {DEFAULT_FRAMES:,})")
    parser.add_argument(
        "--port", action="append", metavar="NAME",
        help="port that sends frames, like node1/app.1/eth0; may be repeated "
        "(default: every endpoint on a bridge network of the stack)",
    )
    parser.add_argument("--stack", metavar="FILE", help="stack file (default: the built-in demo stack)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the random generator (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)

    from tapnet.stack import load_demo, load_stack_file

    cluster = load_stack_file(args.stack) if args.stack else load_demo()
    ports = args.port or bridge_ports(cluster)
    if args.frames < len(ports):
        parser.error(f"--frames {args.frames} is below the {len(ports)} opening ARP frames, one per port")
    try:
        stations(cluster, ports)
    except ValueError as error:
        parser.error(str(error))

    started = time.perf_counter()
    written = generate(args.out, args.frames, ports, cluster, args.seed)
    elapsed = time.perf_counter() - started
    size = args.out.stat().st_size
    print(f"wrote {written:,} frames from {len(ports)} ports to {args.out} ({size / 1e6:.1f} MB) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
