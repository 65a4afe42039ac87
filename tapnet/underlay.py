"""The underlay (host namespaces on a Linux bridge) and the UDP-socket ports of each node.

Theory of operation
-------------------
Every node of the embedded cluster has a host namespace
`tn-<instance>-host-<node>`. Its `eth0` is one end of a veth pair whose other
end, `veth<n>`, is a port of the bridge `br0` in the namespace
`tn-<instance>-underlay`. Here `n` is the address's offset in the underlay subnet.
The client namespaces of `x-tapnet.clients` (`tn-<instance>-client-<name>`)
join the same bridge the same way. Each `eth0` has the MAC `02:42` + its IPv4
address, so a capture on the underlay shows the same outer Ethernet addresses
as the frames on a `<node>/vxlan` port. The bridge has the underlay's `.1`.
No link joins the underlay to the root namespace, and no namespace of the
underlay has a default route, so a datagram to any other address fails with
ENETUNREACH instead of leaving.

Two datapath ports of each node are UDP sockets, opened inside the node's
host namespace and bound to its underlay address:

| port | local port | carries |
|---|---|---|
| `<node>/vxlan` | 4789 | VXLAN datagrams to and from other VTEPs (the node's VTEP) |
| `<node>/upstream` | ephemeral | DNS queries to `x-tapnet.dns_upstreams` and their replies |

On these ports a datagram is a whole Ethernet/IPv4/UDP frame, as
`vxlan.wrap_datagram` builds it. `SocketPorts` reads up to `DRAIN_DATAGRAMS`
datagrams per wake-up straight into its `FrameBatch`, leaving room for the
42 bytes of headers, and writes those headers in front of each payload. It
then runs the datapath once on the batch. For every frame the datapath
emits on one of these ports, it sends the UDP payload to the frame's IPv4
destination and UDP port (`vxlan.unwrap_datagram`).

A socket cannot send every header field of an emitted frame:

- The VTEP sends every datagram from port 4789. The frame names a source
  port from the inner flow hash, as the Linux kernel picks it. Receivers
  accept any source port (RFC 7348), so kernel VXLAN devices take them.
- The upstream socket has one ephemeral port, while the DNS stage picks a
  random source port per query. So `SocketPorts` translates ports: it
  remembers the source port of each query it sends by (server address,
  server port, DNS id). A reply with the same three values is handed to the
  datapath addressed to that port; any other datagram keeps the socket's own
  port, and the DNS stage drops it as unexpected.
- IPv4 identification, TTL and DF come from the kernel, not the frame.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from tapnet import netns, vxlan
from tapnet.batch import FrameBatch
from tapnet.model import VXLAN_PORT, Cluster
from tapnet.state import StateFile

log = logging.getLogger(__name__)

# Send and receive buffer of each socket, about 2800 full-size VXLAN datagrams.
SOCKET_BUFFER_BYTES = 4 << 20
# Datagrams read from one socket per wake-up: as many as TapLoop reads from its
# TAPs per wake-up (runtime.BATCH_FRAMES). With fewer, a node's VTEP could not keep
# up with a busy TAP on another node, and its socket buffer would overflow.
DRAIN_DATAGRAMS = 256
HEADER_LEN = 14 + 20 + 8  # Ethernet, IPv4 and UDP headers written in front of a received payload
MAX_PAYLOAD = 65535 - 20 - 8  # the largest UDP payload over IPv4, so a datagram is never truncated
# Batch buffer: 1 MiB of datagrams, plus room for one more of any size. A read
# happens only while a whole MAX_PAYLOAD fits, so large datagrams end a drain early.
BATCH_BYTES = (1 << 20) + HEADER_LEN + MAX_PAYLOAD
# The DNS stage waits 4 s per upstream (tapnet.dns.UPSTREAM_TIMEOUT). Mappings
# live longer than that, so a reply the stage still awaits always finds its own.
UPSTREAM_MAPPING_SECONDS = 10.0
# Maximum of remembered queries per node. The DNS stage keeps at most 1024 pending.
UPSTREAM_MAPPING_MAX = 4096
TICK_INTERVAL = 1.0  # seconds between expiry runs of the upstream mappings
ERROR_LOGS_PER_TICK = 5  # log lines per error kind per TICK_INTERVAL, beyond which errors are only counted
ADDRESS_CACHE_MAX = 4096  # address text <-> integer conversions kept

# Drop reasons counted here (see tapnet.reasons).
DROP_TX_FULL = "udp-tx-full"  # sendto returned EAGAIN: the socket's send buffer is full
DROP_TX_ERROR = "udp-tx-error"  # sendto failed otherwise, for example ENETUNREACH or EMSGSIZE
DROP_DATAPATH_ERROR = "datapath-error"  # Fabric.process raised; the batch is lost

# Ethernet, IPv4 and UDP headers of a received datagram, as vxlan.wrap_datagram builds them.
_HEADERS = struct.Struct("!6s6sH BBHHHBBHII HHHH")
_ETH_P_IP = 0x0800
_IPV4_IHL5 = 0x45
_IPPROTO_UDP = 17
# The constant 16-bit words of that IPv4 header (version/IHL, TTL/protocol),
# for the incremental header checksum in `_write_headers`.
_CONSTANT_WORDS = (_IPV4_IHL5 << 8) + ((vxlan.OUTER_TTL << 8) | _IPPROTO_UDP)


@dataclass
class UdpPort:
    """A datapath port backed by a UDP socket in a node's host namespace."""

    port: int  # the datapath's port id
    name: str  # `<node>/vxlan` or `<node>/upstream`
    node: str
    kind: str  # "vxlan" or "upstream"
    sock: socket.socket
    address: int  # the node's underlay IPv4 address
    local_port: int  # destination port in the frames of received datagrams: 4789, or the bound ephemeral port

    def close(self) -> None:
        self.sock.close()


@dataclass
class Underlay:
    """The instance's underlay namespaces, and the open sockets of its nodes."""

    namespace: str = ""
    hosts: dict[str, str] = field(default_factory=dict)  # node -> host namespace
    clients: dict[str, str] = field(default_factory=dict)  # client -> namespace
    ports: list[UdpPort] = field(default_factory=list)

    def build(self, instance: str, cluster: Cluster, state: StateFile, fabric) -> None:
        """Create the underlay namespace and bridge, the host and client namespaces, and each node's sockets.

        Each namespace and veth pair is recorded in `state` before it is made,
        so cleanup finds them after any failure. The sockets are open fds
        only and are closed by `close`.
        """
        self.namespace = netns.underlay_namespace_name(instance)
        _create_namespace(state, self.namespace, role="underlay")
        bridge = ipaddress.IPv4Interface((cluster.underlay.network_address + 1, cluster.underlay.prefixlen))
        netns.create_underlay_bridge(self.namespace, bridge)

        for node in cluster.nodes:
            namespace = netns.host_namespace_name(instance, node.name)
            _create_namespace(state, namespace, role="host", node=node.name)
            self._join(state, namespace, node.underlay_ip, cluster)
            self.hosts[node.name] = namespace
        for client, ip in cluster.clients.items():
            namespace = netns.client_namespace_name(instance, client)
            _create_namespace(state, namespace, role="client", client=client)
            self._join(state, namespace, ip, cluster)
            self.clients[client] = namespace
        log.info(
            "underlay %s ready in %s: %s",
            cluster.underlay,
            self.namespace,
            ", ".join(f"{name} {ip}" for name, ip in [*((n.name, n.underlay_ip) for n in cluster.nodes), *cluster.clients.items()]),
        )

        for node in cluster.nodes:
            namespace = self.hosts[node.name]
            for kind, local_port in (("vxlan", VXLAN_PORT), ("upstream", 0)):
                name = f"{node.name}/{kind}"
                # The VTEP sends UDP checksum 0, the value in the frames `vxlan.encapsulate` builds (RFC 7348 allows 0 over IPv4).
                checksum = kind != "vxlan"
                sock = netns.open_udp_socket(namespace, str(node.underlay_ip), local_port, SOCKET_BUFFER_BYTES, checksum)
                port = UdpPort(fabric.port_id(name), name, node.name, kind, sock, int(node.underlay_ip), sock.getsockname()[1])
                self.ports.append(port)
            log.info("node %s: VTEP %s:%d in %s", node.name, node.underlay_ip, VXLAN_PORT, namespace)

    def _join(self, state: StateFile, namespace: str, ip: ipaddress.IPv4Address, cluster: Cluster) -> None:
        address = ipaddress.IPv4Interface((ip, cluster.underlay.prefixlen))
        bridge_port = netns.underlay_port_name(ip, cluster.underlay)
        # Removed with the namespaces: a veth pair goes when either end's namespace goes.
        state.add("veth", name=bridge_port, namespace=self.namespace, peer=netns.UNDERLAY_IFNAME, peer_namespace=namespace)
        netns.join_underlay(self.namespace, namespace, address)

    def close(self) -> None:
        for port in self.ports:
            port.close()
        self.ports.clear()


def _create_namespace(state: StateFile, name: str, **fields) -> None:
    """Create namespace `name`, recorded in `state` before it exists (as `Instance.realise` does for sandboxes)."""
    if netns.namespace_identity(name) is not None:
        raise netns.NamespaceTaken(
            f"namespace {name} already exists and is not listed in the state of instance {state.instance}; "
            f"remove it (ip netns delete {name}) or use another --instance"
        )
    entry = state.add("netns", name=name, identity=None, **fields)
    identity = netns.create_namespace(name)
    state.update(entry, identity=identity)


class SocketPorts:
    """Frames between the nodes' UDP sockets and the datapath, on trio.

    `write(port, frame, vnet)` writes an emitted frame to whichever port it
    names (the runtime's writer, which hands frames for these ports back to
    `send`). Drops go into `drops`, shared with the TAP loop so that
    `tapnet stats` shows them in one table.
    """

    def __init__(
        self,
        fabric,
        ports: list[UdpPort],
        rng: np.random.Generator,
        write: Callable[[int, bytes, bytes | None], None],
        drops: Counter,
    ):
        self.fabric = fabric
        self.ports = ports
        self.rng = rng
        self.write = write
        self.drops = drops
        self.by_port = {port.port: port for port in ports}

        self.batch = FrameBatch(DRAIN_DATAGRAMS, BATCH_BYTES)
        self._view = memoryview(self.batch.buf)
        # (server IPv4, server port, DNS id bytes) -> (source port the DNS stage chose, time sent)
        self.upstream_sources: dict[tuple[int, int, bytes], tuple[int, float]] = {}
        self.now = 0.0  # trio time of the latest wake-up, for the mappings' age
        self.received = 0  # datagrams read, for tests and benchmarks
        self.sent = 0  # datagrams sent
        self._text: dict[int, str] = {}
        self._value: dict[str, int] = {}
        self._mac: dict[int, bytes] = {}
        self._logged: Counter[str] = Counter()
        self.watch = None  # trace and capture subscribers (tapnet.watch), set by `tapnet trace` and `capture`

    def owns(self, port: int) -> bool:
        return port in self.by_port

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for udp in self.ports:
                nursery.start_soon(self._serve, udp)
            nursery.start_soon(self._tick)

    async def _serve(self, udp: UdpPort) -> None:
        while True:
            await trio.lowlevel.wait_readable(udp.sock)
            self.forward_from(udp, trio.current_time())

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            self.expire(trio.current_time())
            self._logged.clear()

    # ---- datagrams in ----------------------------------------------------

    def forward_from(self, udp: UdpPort, now: float) -> int:
        """Read datagrams from `udp`, run the datapath once on them and write what it emits; return datagrams read."""
        self.now = now
        count = self._drain(udp, now)
        if count == 0:
            return 0

        watch = self.watch
        try:
            trace = watch is not None and watch.before(self.batch)
            result = self.fabric.process(self.batch, now, self.rng, trace=trace)
            if watch is not None:
                watch.after(self.batch, result, now)
        except Exception:
            self.drops[(udp.name, DROP_DATAPATH_ERROR)] += count
            if self._may_log(DROP_DATAPATH_ERROR):
                log.exception("datapath failed on a batch of %d datagrams from %s; batch dropped", count, udp.name)
            return count

        write = self.write
        for emit in result.emits:
            write(emit.port, emit.frame, emit.vnet)
        return count

    def _drain(self, udp: UdpPort, now: float) -> int:
        batch = self.batch
        batch.clear()
        view = self._view
        room = len(batch.buf) - HEADER_LEN - MAX_PAYLOAD  # last offset where a whole datagram still fits
        for _ in range(DRAIN_DATAGRAMS):
            start = batch.used
            if start > room:
                break
            payload = start + HEADER_LEN
            try:
                size, (host, source_port) = udp.sock.recvfrom_into(view[payload : payload + MAX_PAYLOAD])
            except BlockingIOError:
                break
            except OSError as error:
                # An ICMP error queued on the socket surfaces here once; the next read works.
                if self._may_log("udp-rx-error"):
                    log.warning("reading from %s failed: %s", udp.name, error)
                break
            source = self._address_value(host)
            if udp.kind == "upstream":
                destination_port = self._upstream_destination(source, source_port, bytes(view[payload : payload + 2]), udp)
            else:
                destination_port = udp.local_port
            self._write_headers(start, source, source_port, udp.address, destination_port, size)

            i = batch.count
            batch.offsets[i] = start
            batch.lengths[i] = HEADER_LEN + size
            batch.ports[i] = udp.port
            batch.timestamps[i] = now
            batch.count += 1
            batch.used = payload + size
        self.received += batch.count
        return batch.count

    def _write_headers(self, offset: int, source: int, source_port: int, destination: int, destination_port: int, size: int) -> None:
        """Write the headers `vxlan.wrap_datagram` would build (IPv4 id 0) in front of the payload at `offset + HEADER_LEN`."""
        total_length = 28 + size
        checksum = _CONSTANT_WORDS + total_length + (source >> 16) + (source & 0xFFFF) + (destination >> 16) + (destination & 0xFFFF)
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        _HEADERS.pack_into(
            self._view, offset,
            self._derived_mac(destination), self._derived_mac(source), _ETH_P_IP,
            _IPV4_IHL5, 0, total_length, 0, 0, vxlan.OUTER_TTL, _IPPROTO_UDP, ~checksum & 0xFFFF, source, destination,
            source_port, destination_port, 8 + size, 0,
        )

    # ---- datagrams out ---------------------------------------------------

    def send(self, port: int, frame: bytes) -> None:
        """Send the UDP payload of `frame`, emitted on socket port `port`, to the frame's destination address and port."""
        udp = self.by_port[port]
        destination, destination_port, payload = vxlan.unwrap_datagram(frame)
        if udp.kind == "upstream":
            self._remember_source(frame, destination, destination_port, payload)
        try:
            udp.sock.sendto(payload, (self._address_text(destination), destination_port))
        except BlockingIOError:
            self.drops[(udp.name, DROP_TX_FULL)] += 1
            return
        except OSError as error:
            self.drops[(udp.name, DROP_TX_ERROR)] += 1
            if self._may_log(DROP_TX_ERROR):
                log.warning(
                    "sending a %d-byte datagram from %s to %s:%d failed: %s",
                    len(payload), udp.name, self._address_text(destination), destination_port, error,
                )
            return
        self.sent += 1

    # ---- DNS upstream port translation -----------------------------------

    def _remember_source(self, frame: bytes, destination: int, destination_port: int, payload: bytes) -> None:
        header = 14 + (frame[14] & 0x0F) * 4
        source_port = int.from_bytes(frame[header : header + 2], "big")
        key = (destination, destination_port, payload[:2])
        self.upstream_sources.pop(key, None)  # re-inserted last, so the dict stays in sending order
        if len(self.upstream_sources) >= UPSTREAM_MAPPING_MAX:
            del self.upstream_sources[next(iter(self.upstream_sources))]
        self.upstream_sources[key] = (source_port, self.now)

    def _upstream_destination(self, source: int, source_port: int, query_id: bytes, udp: UdpPort) -> int:
        entry = self.upstream_sources.get((source, source_port, query_id))
        return entry[0] if entry is not None else udp.local_port

    def expire(self, now: float) -> None:
        """Forget forwarded queries sent more than UPSTREAM_MAPPING_SECONDS before `now`."""
        self.now = now
        sources = self.upstream_sources
        while sources:
            key = next(iter(sources))
            if now - sources[key][1] < UPSTREAM_MAPPING_SECONDS:
                break
            del sources[key]

    # ---- helpers ---------------------------------------------------------

    def _address_text(self, value: int) -> str:
        text = self._text.get(value)
        if text is None:
            if len(self._text) >= ADDRESS_CACHE_MAX:
                self._text.clear()
            text = self._text[value] = socket.inet_ntoa(value.to_bytes(4, "big"))
        return text

    def _address_value(self, text: str) -> int:
        value = self._value.get(text)
        if value is None:
            if len(self._value) >= ADDRESS_CACHE_MAX:
                self._value.clear()
            value = self._value[text] = int.from_bytes(socket.inet_aton(text), "big")
        return value

    def _derived_mac(self, address: int) -> bytes:
        mac = self._mac.get(address)
        if mac is None:
            if len(self._mac) >= ADDRESS_CACHE_MAX:
                self._mac.clear()
            mac = self._mac[address] = vxlan.derived_mac(address).to_bytes(6, "big")
        return mac

    def _may_log(self, kind: str) -> bool:
        self._logged[kind] += 1
        return self._logged[kind] <= ERROR_LOGS_PER_TICK
