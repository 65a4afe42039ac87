"""The live ingress routing mesh: each node's `gwbridge` TAP, its nftables rules, and the loopback relays.

Theory of operation
-------------------
A port published in ingress mode (`3000:80`) is reachable at every node's
underlay address. Each node's host namespace holds:

- a TAP named `gwbridge` (Docker's docker_gwbridge) with 172.18.0.1/16 and
  the MAC 02:42:ac:12:00:01. tapnet reads and writes its frames as the
  datapath port `<node>/gwbridge`, where the ingress-sandbox stage
  (`tapnet.lb.IngressSandbox`) is 172.18.0.2.
- an nftables table `tapnet` with two nat chains, hooked at prerouting
  (priority dstnat) and output (priority -100). For every published port
  each chain DNATs packets to the node's own underlay address and that port
  to 172.18.0.2 on the same port. Prerouting takes clients on the underlay,
  output takes connections opened inside the host namespace (the relays).
- `net.ipv4.ip_forward=1`, so packets of clients on the underlay are
  forwarded to `gwbridge` and replies forwarded back.

A port published in host mode is reachable only at the address of a node
that runs a task of the service. That node's chains DNAT it straight to the
task's address and target port, and a /32 route sends the task's address
via 172.18.0.2 out of `gwbridge`. The datapath (`tapnet.lb.HostModePorts`)
delivers the packet to the task unchanged, so the task gets the client's
address as source. The datapath sends the task's reply back out of `gwbridge`.

The rules and the sysctl are written inside the host namespace only. The
root namespace gets neither a rule nor a sysctl.

From the machine itself, a published TCP port is reached the way
docker-proxy offers it: a relay listens on `127.0.0.1:RELAY_PORT` in the
root namespace (`cluster.relay_ports` maps published port to relay port).
For each accepted connection it opens its own connection, from a socket
created inside the first node's host namespace, to that node's underlay
address and published port, and copies bytes both ways. The listeners are
bound before anything else of the instance exists, so a relay port in use
stops `tapnet start` with nothing made.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import subprocess
from dataclasses import dataclass

import trio

from tapnet import lb, netns
from tapnet.model import GWBRIDGE_SUBNET, INGRESS_SBOX_GWBRIDGE_IP, Cluster, format_mac, mac_for_ip

log = logging.getLogger(__name__)

GWBRIDGE_IFNAME = "gwbridge"
GWBRIDGE_ADDRESS = ipaddress.IPv4Interface((GWBRIDGE_SUBNET.network_address + 1, GWBRIDGE_SUBNET.prefixlen))  # 172.18.0.1/16
NFT_TABLE = "tapnet"
NFT_TIMEOUT = 10.0  # seconds for one `nft -f -` run
RELAY_BACKLOG = 128  # listen() backlog of each relay listener
RELAY_CONNECT_TIMEOUT = 5.0  # seconds a relay waits for the published port to accept
RELAY_CHUNK = 65536  # bytes copied per receive
RELAY_FAILURES_LOGGED = 5  # connect failures logged one by one per relay; after that every 100th


class RelayPortInUse(netns.NetnsError):
    """A relay port on 127.0.0.1 is taken by another program."""


@dataclass
class Relay:
    """A loopback listener for one published TCP port, and where its connections go."""

    published: int
    loopback: int
    listener: socket.socket
    namespace: str = ""  # host namespace the outgoing sockets are created in
    target: str = ""  # that node's underlay address
    failures: int = 0  # outgoing connections that failed

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------- host namespaces


@dataclass(frozen=True)
class HostPort:
    """A port published in host mode by the task on one node: DNATed straight to that task, client address kept."""

    protocol: str  # "tcp" or "udp"
    published: int
    task_ip: ipaddress.IPv4Address  # the task's address on the network of its default gateway
    target: int
    sandbox: str


def nft_ruleset(node_ip: ipaddress.IPv4Address, ports: list[tuple[str, int]], host_ports: list[HostPort] = ()) -> str:
    """Return the `nft -f` text of the `tapnet` table for one node.

    `ports` are the (protocol, published port) pairs of ingress mode, DNATed
    to the ingress sandbox; `host_ports` are this node's host-mode ports,
    DNATed to their task.
    """
    rules = "".join(
        f"\t\tip daddr {node_ip} {protocol} dport {port} dnat to {INGRESS_SBOX_GWBRIDGE_IP}:{port}\n" for protocol, port in ports
    )
    rules += "".join(
        f"\t\tip daddr {node_ip} {p.protocol} dport {p.published} dnat to {p.task_ip}:{p.target}\n" for p in host_ports
    )
    return (
        f"table ip {NFT_TABLE} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        f"{rules}"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        f"{rules}"
        "\t}\n"
        "}\n"
    )


def ingress_ports(cluster: Cluster) -> list[tuple[str, int]]:
    """Return (protocol, published port) of every port published in ingress mode, sorted."""
    return sorted({(p.protocol, p.published) for s in cluster.services.values() for p in s.ports if p.mode == "ingress"})


def host_ports(cluster: Cluster, node: str) -> list[HostPort]:
    """Return the host-mode ports of the tasks running on `node`, sorted.

    A task is reached on the network of its default gateway, because its
    replies to the client leave through that gateway. A task without a
    default gateway (only internal networks) cannot reply to a client outside
    the cluster, so its host-mode ports are skipped with a warning. The stack
    compiler places at most one task of a service with host-mode ports on a node.
    """
    found = []
    for sandbox in cluster.sandboxes.values():
        if sandbox.node != node:
            continue
        service = cluster.services.get(sandbox.service)
        specs = [p for p in service.ports if p.mode == "host"] if service is not None else []
        if not specs:
            continue
        endpoint = lb.default_route_endpoint(cluster, sandbox)
        if endpoint is None:
            log.warning("node %s: task %s publishes host-mode ports but has no default gateway; not publishing them", node, sandbox.name)
            continue
        found.extend(HostPort(p.protocol, p.published, endpoint.ip, p.target, sandbox.name) for p in specs)
    return sorted(found, key=lambda p: (p.protocol, p.published))


def install_rules(namespace: str, text: str) -> None:
    """Load an nftables ruleset inside `namespace` with `ip netns exec NS nft -f -`."""
    if not namespace.startswith(netns.NAME_PREFIX):
        raise ValueError(f"not loading nftables rules into {namespace!r}: it is not a tapnet namespace")
    try:
        completed = subprocess.run(
            ["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=NFT_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise netns.NetnsError(f"loading nftables rules into {namespace} failed: {error}") from error
    if completed.returncode != 0:
        raise netns.NetnsError(f"loading nftables rules into {namespace} failed: {completed.stderr.strip()}")


def create_gwbridge(namespace: str, node: str) -> netns.Tap:
    """Open the `gwbridge` TAP inside host namespace `namespace`, address it and turn on forwarding there."""

    def build() -> netns.Tap:
        netns._enter_namespace(namespace)
        device = netns._open_tap(GWBRIDGE_IFNAME)
        try:
            with netns._iproute() as ipr:
                index = ipr.link_lookup(ifname=GWBRIDGE_IFNAME)[0]
                ipr.link("set", index=index, address=format_mac(mac_for_ip(GWBRIDGE_ADDRESS.ip)))
                ipr.addr("add", index=index, address=str(GWBRIDGE_ADDRESS.ip), prefixlen=GWBRIDGE_ADDRESS.network.prefixlen)
                ipr.link("set", index=index, state="up")
            # This thread is inside the host namespace, so the sysctl is that namespace's own.
            netns._write_sysctl("net.ipv4.ip_forward", "1")
        except BaseException:
            device.close()
            raise
        return netns.Tap(f"{node}/{GWBRIDGE_IFNAME}", "", GWBRIDGE_IFNAME, namespace, device)

    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return netns._run_in_thread(build, namespace)
    except (OSError, NetlinkError, IndexError) as error:
        raise netns.NetnsError(f"creating {GWBRIDGE_IFNAME} in {namespace} failed: {error}") from error


def route_tasks(namespace: str, ports: list[HostPort]) -> None:
    """Route each host-mode task address via the ingress sandbox's 172.18.0.2 on `gwbridge` inside host namespace `namespace`.

    The datapath's `gwbridge` port takes these frames to the task, so the
    host namespace needs no address on the task's network.
    """
    addresses = sorted({str(p.task_ip) for p in ports})

    def build() -> None:
        netns._enter_namespace(namespace)
        with netns._iproute() as ipr:
            index = ipr.link_lookup(ifname=GWBRIDGE_IFNAME)[0]
            for address in addresses:
                ipr.route("replace", dst=f"{address}/32", gateway=str(INGRESS_SBOX_GWBRIDGE_IP), oif=index)

    from pyroute2.netlink.exceptions import NetlinkError

    try:
        netns._run_in_thread(build, namespace)
    except (OSError, NetlinkError, IndexError) as error:
        raise netns.NetnsError(f"routing host-mode task addresses {addresses} in {namespace} failed: {error}") from error


def realise(cluster: Cluster, hosts: dict[str, str]) -> list[netns.Tap]:
    """Give every node's host namespace its `gwbridge` TAP and, when ports are published, the nftables rules.

    Host-mode ports get a rule and a route only on the node that runs their
    task, as in Docker. NOTE: these rules and routes are written at start
    only, so a host-mode task added or moved by a later scale is not published.

    `hosts` maps node to host namespace. Returns the TAPs, one per node, for
    the runtime's TAP loop. On failure the TAPs opened so far are closed, and
    cleanup of the state file removes the namespaces with their rules.
    """
    ports = ingress_ports(cluster)
    taps: list[netns.Tap] = []
    try:
        for node in cluster.nodes:
            namespace = hosts[node.name]
            taps.append(create_gwbridge(namespace, node.name))
            local = host_ports(cluster, node.name)
            if ports or local:
                install_rules(namespace, nft_ruleset(node.underlay_ip, ports, local))
            if local:
                route_tasks(namespace, local)
            published = [f"{port}/{protocol}" for protocol, port in ports]
            published += [f"{p.published}/{p.protocol} (host mode, to {p.sandbox} {p.task_ip}:{p.target})" for p in local]
            log.info(
                "node %s: %s %s in %s, published %s",
                node.name, GWBRIDGE_IFNAME, GWBRIDGE_ADDRESS, namespace, ", ".join(published) or "nothing",
            )
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


# ---------------------------------------------------------------- loopback relays


def open_relays(cluster: Cluster) -> list[Relay]:
    """Bind a listener on 127.0.0.1 for every TCP port published in ingress mode, or raise RelayPortInUse naming a taken port.

    NOTE: UDP published ports get no loopback relay, so they are reachable
    from client namespaces only.
    """
    relays: list[Relay] = []
    tcp_ports = sorted({published for protocol, published in ingress_ports(cluster) if protocol == "tcp"})
    try:
        for published in tcp_ports:
            loopback = cluster.relay_ports.get(published, published)
            relays.append(Relay(published, loopback, _listen(published, loopback)))
    except BaseException:
        for relay in relays:
            relay.close()
        raise
    return relays


def _listen(published: int, loopback: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Lets a restarted instance bind while old connections sit in TIME_WAIT. A live listener still conflicts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", loopback))
        sock.listen(RELAY_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise RelayPortInUse(
                f"relay port 127.0.0.1:{loopback} for published port {published} is already in use; "
                f"stop the program listening there or map the port elsewhere in x-tapnet.relay_ports"
            ) from None
        raise netns.NetnsError(f"listening on 127.0.0.1:{loopback} for published port {published} failed: {error}") from error
    return sock


def aim_relays(relays: list[Relay], cluster: Cluster, hosts: dict[str, str]) -> None:
    """Point every relay at the first node: its host namespace and underlay address."""
    node = cluster.nodes[0]
    for relay in relays:
        relay.namespace = hosts[node.name]
        relay.target = str(node.underlay_ip)
        log.info("relay 127.0.0.1:%d -> %s:%d from %s", relay.loopback, relay.target, relay.published, relay.namespace)


async def serve_relays(relays: list[Relay]) -> None:
    """Accept on every relay listener until cancelled."""
    async with trio.open_nursery() as nursery:
        for relay in relays:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(relay.listener))
            nursery.start_soon(trio.serve_listeners, _relay_handler(relay), [listener])


def _relay_handler(relay: Relay):
    async def handle(stream: trio.SocketStream) -> None:
        await relay_connection(relay, stream)

    return handle


def _socket_in(namespace: str) -> socket.socket:
    """Create a TCP socket inside `namespace` (from a short-lived thread that enters it)."""

    def build() -> socket.socket:
        netns._enter_namespace(namespace)
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    return netns._run_in_thread(build, namespace)


async def relay_connection(relay: Relay, client: trio.SocketStream) -> None:
    """Connect to the relay's target from its host namespace and copy bytes both ways until both sides close."""
    async with client:
        try:
            # A fresh thread per socket: trio's worker threads are reused, so none of them may enter a namespace.
            sock = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(_socket_in, relay.namespace))
            with trio.fail_after(RELAY_CONNECT_TIMEOUT):
                await sock.connect((relay.target, relay.published))
        except (OSError, trio.TooSlowError) as error:
            relay.failures += 1
            if relay.failures <= RELAY_FAILURES_LOGGED or relay.failures % 100 == 0:
                log.warning(
                    "relay 127.0.0.1:%d: connecting to %s:%d failed (%d failures so far): %r",
                    relay.loopback, relay.target, relay.published, relay.failures, error,
                )
            return
        upstream = trio.SocketStream(sock)
        async with upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)


async def _copy(source: trio.SocketStream, destination: trio.SocketStream, both: trio.CancelScope) -> None:
    """Copy until `source` ends, then half-close `destination`. A reset on either side cancels `both` directions."""
    try:
        while True:
            data = await source.receive_some(RELAY_CHUNK)
            if not data:
                break
            await destination.send_all(data)
        await destination.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        both.cancel()
