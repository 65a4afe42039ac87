"""Service VIPs: which task gets a new connection, and the translation both ways.

Theory of operation
-------------------
Docker gives each vip-mode service one virtual IP per network and spreads
new connections to it over the service's tasks with IPVS in NAT mode
(scheduler `rr`). tapnet does the same inside the datapath of the node where
the client sits, with one `LoadBalancer` stage per node:

- Every VIP replies to ARP on every node with its own MAC (`02:42` + VIP), so a
  client sends packets for the VIP to that MAC; the datapath hands frames
  for such a MAC to `LoadBalancer.handle`.
- A TCP SYN, or any UDP datagram, of an unknown flow picks the next live task
  round-robin (the starting point is drawn from the datapath's seeded
  generator) and creates a conntrack entry; DNAT rewrites the destination
  address (ports stay, as for a Docker VIP) and the destination MAC, and the
  frame goes on as unicast to the task, through the tunnel if the task is on
  another node. Later packets of the flow follow their entry.
- Replies leave the task addressed to the client. Every node watches frames
  whose source is a task behind a VIP (`Datapath.nat_watch`); when one
  matches the reply direction of an entry, the source is rewritten back to
  the VIP before delivery. Entries live on the client's node only, so a
  reply crossing the tunnel is translated after decapsulation.
- ICMP echo to a VIP is answered by the VIP itself.

Invariants: the conntrack table (tapnet.nat) is bounded; a removed task gets
no new connection, and packets of its connections are dropped as
`backend-gone` until their entry expires; nothing here reads a clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tapnet import gateway, nat, parse
from tapnet.model import GWBRIDGE_SUBNET, INGRESS_NETWORK, INGRESS_SBOX_GWBRIDGE_IP, Cluster, mac_for_ip

GWBRIDGE_GATEWAY = GWBRIDGE_SUBNET.network_address + 1  # docker_gwbridge in the host namespace, 172.18.0.1

log = logging.getLogger(__name__)

# Conntrack entries per node. The Linux default (nf_conntrack_max) scales with
# memory; 65536 keeps a node's table near 4 MiB with tapnet's entry layout.
CONNTRACK_MAX = 65536
TCP_SYN = 0x02
TCP_ACK = 0x10


@dataclass
class Vip:
    service: str
    network: str
    ip: int
    mac: int
    backends: list[int] = field(default_factory=list)  # task addresses on the network, in slot order
    sandbox_of: dict[int, str] = field(default_factory=dict)  # task address -> sandbox name
    position: int | None = None  # round-robin position; drawn from the generator on first use

    def pick(self, rng) -> int | None:
        """Return the next task address, round-robin, or None when the service has no task."""
        backend, self.position = round_robin(self.backends, self.position, rng)
        return backend


def round_robin(items: list[int], position: int | None, rng) -> tuple[int | None, int | None]:
    """Return the item at `position` and the next position (IPVS `rr`).

    The first call, with position None, starts at a place drawn from `rng`, so
    a replay with the same seed picks the same tasks.
    """
    if not items:
        return None, position
    if position is None:
        position = int(rng.integers(len(items)))
    return items[position % len(items)], (position + 1) % len(items)


def opens_connection(proto: int, tcp_flags: int) -> bool:
    """Tell whether a packet may create a conntrack entry: any UDP datagram, or a TCP SYN without ACK (as IPVS)."""
    return proto != 6 or bool(tcp_flags & TCP_SYN and not tcp_flags & TCP_ACK)


def drop_rejected(ctx, entry: int) -> None:
    """Drop a new flow that `Conntrack.create` rejected, under the reason of its rejection."""
    if entry == nat.REJECTED_FULL:
        ctx.drop("conntrack-full", "conntrack", "table full of replied connections: new flow rejected")
    else:
        ctx.drop("nat-failed", "conntrack", "a live connection already uses this tuple")


def ip_text(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 0xFF}.{(value >> 8) & 0xFF}.{value & 0xFF}"


class LoadBalancer:
    """VIPs of one node's datapath, with its conntrack table."""

    name = "lb"

    def __init__(self, dp, max_entries: int = CONNTRACK_MAX):
        self.dp = dp
        self.ct = nat.Conntrack(max_entries=max_entries)
        self.vips: dict[int, Vip] = {}
        self.live_backends: set[int] = set()
        dp.nat_stage = self
        self.follow(dp.fabric.cluster)

    # ---- cluster state ---------------------------------------------------

    def follow(self, cluster: Cluster) -> None:
        """Rebuild the VIP table from cluster state; round-robin positions survive."""
        old = self.vips
        self.vips = {}
        for service in cluster.services.values():
            if service.endpoint_mode != "vip":
                continue
            for network, address in service.vips.items():
                if network == INGRESS_NETWORK or network not in self.dp.networks:
                    continue
                ip = int(address)
                vip = Vip(service.name, network, ip, int.from_bytes(mac_for_ip(address), "big"))
                previous = old.get(ip)
                if previous is not None:
                    vip.position = previous.position
                self.vips[ip] = vip
        for sandbox in cluster.sandboxes.values():
            for vip in self.vips.values():
                if sandbox.service != vip.service:
                    continue
                endpoint = sandbox.endpoint_on(vip.network)
                if endpoint is not None:
                    vip.backends.append(int(endpoint.ip))
                    vip.sandbox_of[int(endpoint.ip)] = sandbox.name

        for view in self.dp.networks.values():
            for ip in [ip for ip, mac in view.arp_table.items() if view.service_macs.get(mac) is self]:
                del view.service_macs[view.arp_table.pop(ip)]
        for vip in self.vips.values():
            view = self.dp.networks[vip.network]
            view.arp_table[vip.ip] = vip.mac
            view.service_macs[vip.mac] = self
        self.live_backends = {b for vip in self.vips.values() for b in vip.backends}
        # Only tasks that were given a connection can send replies to translate.
        self.dp.nat_watch &= self.live_backends

    # ---- frames for a VIP MAC ----------------------------------------------

    def handle(self, ctx) -> bool:
        rec = ctx.record
        network = ctx.network
        if int(rec["ethertype"]) == gateway.ETH_P_ARP:
            return self._answer_unicast_arp(ctx, rec)
        flags = int(rec["flags"])
        vip = self.vips.get(int(rec["ip_dst"])) if flags & parse.IS_IPV4 else None
        if vip is None or vip.network != network.model.name:
            ctx.drop("vip-no-service", "lb", "not an IPv4 packet for a VIP of this network")
            return True
        if flags & parse.IS_FRAGMENT:
            ctx.drop("nat-failed", "lb", "IPv4 fragment for a VIP; tapnet does not reassemble")
            return True
        if flags & parse.IS_ICMP and int(rec["icmp_type"]) == gateway.ICMP_ECHO_REQUEST:
            reply = gateway.icmp_echo_reply(ctx.frame, int(rec["l3_off"]), int(rec["ip_ihl"]), int(rec["ip_tot_len"]), vip.mac)
            ctx.reply(reply, "lb", "echo-reply", f"VIP {ip_text(vip.ip)} of service {vip.service}")
            return True
        if not flags & (parse.IS_TCP | parse.IS_UDP):
            ctx.drop("vip-no-service", "lb", f"proto {int(rec['ip_proto'])} to VIP {ip_text(vip.ip)}")
            return True
        self._to_backend(ctx, rec, vip)
        return True

    def _answer_unicast_arp(self, ctx, rec) -> bool:
        target = int(rec["arp_tpa"])
        vip = self.vips.get(target)
        if int(rec["arp_op"]) != gateway.ARP_REQUEST or vip is None:
            ctx.drop("vip-no-service", "lb", "ARP that does not ask for a VIP")
            return True
        reply = gateway.arp_reply(int(rec["arp_sha"]), int(rec["arp_spa"]), vip.mac, vip.ip)
        ctx.reply(reply, "lb", "arp-reply", f"{ip_text(vip.ip)} is-at VIP MAC")
        return True

    def _to_backend(self, ctx, rec, vip: Vip) -> None:
        proto = int(rec["ip_proto"])
        src, dst = int(rec["ip_src"]), int(rec["ip_dst"])
        sport, dport = int(rec["sport"]), int(rec["dport"])
        tcp_flags = int(rec["tcp_flags"]) if proto == 6 else 0
        entry, direction = self.ct.lookup(proto, src, sport, dst, dport, ctx.now)

        if entry >= 0 and direction == nat.ORIGINAL:
            backend = self.ct.backend(entry)
            if backend not in self.live_backends:
                ctx.drop("backend-gone", "lb", f"entry {entry}: task {ip_text(backend)} was removed")
                return
            self.ct.update(entry, nat.ORIGINAL, tcp_flags, ctx.now)
            if ctx.trace is not None:
                ctx.note("conntrack", "hit", f"entry {entry} to {ip_text(backend)}")
        else:
            if not opens_connection(proto, tcp_flags):
                ctx.drop("vip-no-connection", "lb", f"TCP flags {tcp_flags:#04x} without a tracked connection")
                return
            backend = vip.pick(ctx.rng)
            if backend is None:
                ctx.drop("no-backend", "lb", f"service {vip.service} has no task")
                return
            entry = self.ct.create(proto, (src, sport, dst, dport), (backend, dport, src, sport), ctx.now, tcp_flags, backend)
            if entry < 0:
                drop_rejected(ctx, entry)
                return
            self.dp.nat_watch.add(backend)
            ctx.note(
                "conntrack", "new",
                f"entry {entry}: rr over {len(vip.backends)} task(s) of {vip.service} -> {vip.sandbox_of.get(backend, '?')}",
            )

        frame = bytearray(ctx.frame)
        partial = bool(int(rec["flags"]) & parse.NEEDS_CSUM)
        try:
            nat.rewrite(frame, int(rec["l3_off"]), int(rec["l4_off"]), proto, src, sport, backend, dport, partial)
        except ValueError as error:
            ctx.drop("nat-failed", "nat", str(error))
            return
        backend_mac = int.from_bytes(mac_for_ip_int(backend), "big")
        frame[0:6] = mac_for_ip_int(backend)
        if ctx.trace is not None:
            ctx.note("nat", "dnat", f"{ip_text(dst)}:{dport} -> {ip_text(backend)}:{dport}")
        self.dp.forward_unicast(
            ctx.result, ctx.index, ctx.port, ctx.network, backend_mac, bytes(frame), ctx.vnet, ctx.now, ctx.trace, known=True
        )
        ctx.done = True

    # ---- replies from tasks --------------------------------------------------

    def translate_reply(self, dp, port, frame: bytes, vnet, cols, i: int, now: float, trace) -> bytes | None:
        """Rewrite a task's reply back to the VIP when it belongs to a tracked connection."""
        proto = cols.ip_proto[i]
        if proto == 1:
            return frame  # echo to a VIP is answered by the VIP itself; nothing to translate
        if proto not in (6, 17) or cols.l4_off[i] < 0:
            return frame
        src, sport, dst, dport = cols.ip_src[i], cols.sport[i], cols.ip_dst[i], cols.dport[i]
        entry, direction = self.ct.lookup(proto, src, sport, dst, dport, now)
        if entry < 0 or direction != nat.REPLY:
            return frame
        self.ct.update(entry, nat.REPLY, cols.tcp_flags[i] if proto == 6 else 0, now)
        new_src, new_sport, new_dst, new_dport = self.ct.translation(entry, nat.REPLY)
        buffer = bytearray(frame)
        partial = bool(cols.flags[i] & parse.NEEDS_CSUM)
        try:
            nat.rewrite(buffer, cols.l3_off[i], cols.l4_off[i], proto, new_src, new_sport, new_dst, new_dport, partial)
        except ValueError as error:
            dp._drop(port.id, "nat-failed", "nat", trace, str(error))
            return None
        if trace is not None:
            trace.add("conntrack", "reply", f"entry {entry}")
            trace.add("nat", "un-dnat", f"{ip_text(src)}:{sport} -> {ip_text(new_src)}:{new_sport}")
        return bytes(buffer)

    # ---- timers and views ------------------------------------------------------

    def tick(self, now: float, result) -> None:
        self.ct.expire(now)

    def conntrack_rows(self, now: float) -> list[dict]:
        return list(self.ct.entries(now))

    def lb_rows(self, now: float) -> list[dict]:
        """Return one row per VIP with its tasks and their active connections, like `ipvsadm -Ln`."""
        active: dict[int, int] = {}
        for row in self.ct.entries(now):
            backend = row.get("backend")
            if backend is not None:
                active[backend] = active.get(backend, 0) + 1
        rows = []
        for vip in sorted(self.vips.values(), key=lambda v: (v.service, v.network)):
            rows.append(
                {
                    "service": vip.service,
                    "network": vip.network,
                    "vip": ip_text(vip.ip),
                    "scheduler": "rr",
                    "backends": [
                        {"address": ip_text(b), "sandbox": vip.sandbox_of[b], "weight": 1, "active": active.get(b, 0)}
                        for b in vip.backends
                    ],
                }
            )
        return rows


def mac_for_ip_int(ip: int) -> bytes:
    return b"\x02\x42" + ip.to_bytes(4, "big")


def mac_int(ip: int) -> int:
    return (0x0242 << 32) | ip


@dataclass
class Published:
    """A port published in ingress mode: reachable on every node, spread over every task."""

    service: str
    protocol: int  # 6 or 17
    published: int
    target: int
    tasks: list[int] = field(default_factory=list)  # ingress addresses of the service's tasks, slot order
    sandbox_of: dict[int, str] = field(default_factory=dict)
    position: int | None = None

    def next_task(self, rng) -> int | None:
        task, self.position = round_robin(self.tasks, self.position, rng)
        return task


class IngressSandbox:
    """The node's ingress sandbox: the routing mesh between `docker_gwbridge` and the ingress network.

    Packets for a published port reach the host namespace's `gwbridge` TAP,
    DNATed there by an nftables rule to 172.18.0.2. This stage, which is that
    address, picks a task of the service on any node round-robin, DNATs to
    the task's ingress address and target port, and SNATs to its own ingress
    address, as Docker's ingress-sbox does with IPVS; the client address is
    lost. Replies come back to the ingress address and are translated back
    through the same conntrack entry onto `gwbridge`.
    """

    name = "ingress"

    def __init__(self, dp, lb: LoadBalancer):
        self.dp = dp
        self.ct = lb.ct
        cluster = dp.fabric.cluster
        self.gw_ip = int(GWBRIDGE_GATEWAY)
        self.gw_mac = mac_int(self.gw_ip)
        self.sbox_gw_ip = int(INGRESS_SBOX_GWBRIDGE_IP)
        self.sbox_gw_mac = mac_int(self.sbox_gw_ip)
        self.ingress_ip = int(cluster.ingress_sbox_ips.get(dp.node, 0))
        self.ingress_mac = mac_int(self.ingress_ip)
        self.gwbridge_port = dp.fabric.port_id(f"{dp.node}/gwbridge")
        self.host = HostModePorts(dp, lb, self.gwbridge_port)
        self.published: dict[tuple[int, int], Published] = {}
        self.allowed: dict[int, set[tuple[int, int]]] = {}  # task ingress address -> (proto, target port)
        dp.port_handlers["gwbridge"] = self
        self.follow(cluster)

    def follow(self, cluster: Cluster) -> None:
        old = self.published
        self.published = {}
        self.allowed = {}
        for service in cluster.services.values():
            for spec in service.ports:
                if spec.mode != "ingress":
                    continue
                proto = 6 if spec.protocol == "tcp" else 17
                entry = Published(service.name, proto, spec.published, spec.target)
                previous = old.get((proto, spec.published))
                if previous is not None:
                    entry.position = previous.position
                self.published[(proto, spec.published)] = entry
        for sandbox in cluster.sandboxes.values():
            endpoint = sandbox.endpoint_on(INGRESS_NETWORK)
            if endpoint is None:
                continue
            address = int(endpoint.ip)
            for entry in self.published.values():
                if entry.service == sandbox.service:
                    entry.tasks.append(address)
                    entry.sandbox_of[address] = sandbox.name
                    self.allowed.setdefault(address, set()).add((entry.protocol, entry.target))
        view = self.dp.networks.get(INGRESS_NETWORK)
        if view is not None and self.ingress_ip:
            view.arp_table[self.ingress_ip] = self.ingress_mac
            view.service_macs[self.ingress_mac] = self
            view.guard = self.guard
        self.live_tasks = {t for entry in self.published.values() for t in entry.tasks}

    def guard(self, cols, i: int) -> str | None:
        """On ingress addresses, tasks accept only their target ports."""
        allowed = self.allowed.get(cols.ip_dst[i])
        if allowed is None or not cols.flags[i] & (parse.IS_TCP | parse.IS_UDP):
            return None
        if (cols.ip_proto[i], cols.dport[i]) in allowed:
            return None
        return "ingress-port-closed"

    # ---- frames from the host namespace's gwbridge -------------------------------

    def handle(self, ctx) -> bool:
        if ctx.port.kind == "gwbridge":
            self._from_gwbridge(ctx)
        else:
            self._from_ingress_network(ctx)
        return True

    def _from_gwbridge(self, ctx) -> None:
        rec = ctx.record
        if int(rec["status"]):
            ctx.drop(reasons_code(int(rec["status"])), "ingress", "malformed frame on gwbridge")
            return
        if int(rec["ethertype"]) == gateway.ETH_P_ARP:
            if int(rec["arp_op"]) == gateway.ARP_REQUEST and int(rec["arp_tpa"]) == self.sbox_gw_ip:
                reply = gateway.arp_reply(int(rec["arp_sha"]), int(rec["arp_spa"]), self.sbox_gw_mac, self.sbox_gw_ip)
                ctx.reply(reply, "ingress", "arp-reply", "172.18.0.2 is the ingress sandbox")
            else:
                ctx.drop("gateway-no-service", "ingress", "ARP on gwbridge not for the ingress sandbox")
            return
        flags = int(rec["flags"])
        if flags & parse.IS_IPV4 and int(rec["ip_dst"]) in self.host.tasks:
            self.host.from_gwbridge(ctx)
            return
        if not flags & parse.IS_IPV4 or int(rec["ip_dst"]) != self.sbox_gw_ip:
            ctx.drop("gateway-no-service", "ingress", "not IPv4 for the ingress sandbox")
            return
        if flags & parse.IS_ICMP and int(rec["icmp_type"]) == gateway.ICMP_ECHO_REQUEST:
            reply = gateway.icmp_echo_reply(ctx.frame, int(rec["l3_off"]), int(rec["ip_ihl"]), int(rec["ip_tot_len"]), self.sbox_gw_mac)
            ctx.reply(reply, "ingress", "echo-reply", "from the ingress sandbox")
            return
        if flags & parse.IS_FRAGMENT or not flags & (parse.IS_TCP | parse.IS_UDP):
            ctx.drop("vip-no-service", "ingress", "only unfragmented TCP and UDP are published")
            return

        proto = int(rec["ip_proto"])
        src, sport, dport = int(rec["ip_src"]), int(rec["sport"]), int(rec["dport"])
        tcp_flags = int(rec["tcp_flags"]) if proto == 6 else 0
        entry, direction = self.ct.lookup(proto, src, sport, self.sbox_gw_ip, dport, ctx.now)
        if entry >= 0 and direction == nat.ORIGINAL:
            task = self.ct.backend(entry)
            if task not in self.live_tasks:
                ctx.drop("backend-gone", "ingress", f"entry {entry}: task {ip_text(task)} was removed")
                return
            self.ct.update(entry, nat.ORIGINAL, tcp_flags, ctx.now)
            translation = self.ct.translation(entry, nat.ORIGINAL)
            if ctx.trace is not None:
                ctx.note("conntrack", "hit", f"entry {entry}")
        else:
            published = self.published.get((proto, dport))
            if published is None:
                ctx.drop("vip-no-service", "ingress", f"port {dport} is not published")
                return
            if not opens_connection(proto, tcp_flags):
                ctx.drop("vip-no-connection", "ingress", f"TCP flags {tcp_flags:#04x} without a tracked connection")
                return
            task = published.next_task(ctx.rng)
            if task is None:
                ctx.drop("no-backend", "ingress", f"service {published.service} has no task")
                return
            snat_port = self.ct.pick_snat_port(proto, task, published.target, self.ingress_ip, ctx.rng, ctx.now)
            if snat_port < 0:
                ctx.drop("conntrack-full", "ingress", "no free SNAT port")
                return
            entry = self.ct.create(
                proto, (src, sport, self.sbox_gw_ip, dport), (task, published.target, self.ingress_ip, snat_port),
                ctx.now, tcp_flags, task,
            )
            if entry < 0:
                drop_rejected(ctx, entry)
                return
            translation = (self.ingress_ip, snat_port, task, published.target)
            if ctx.trace is not None:
                ctx.note("conntrack", "new", f"entry {entry}: rr over {len(published.tasks)} task(s) -> {published.sandbox_of[task]}")

        new_src, new_sport, new_dst, new_dport = translation
        frame = bytearray(ctx.frame)
        try:
            nat.rewrite(frame, int(rec["l3_off"]), int(rec["l4_off"]), proto, new_src, new_sport, new_dst, new_dport,
                        bool(flags & parse.NEEDS_CSUM))
        except ValueError as error:
            ctx.drop("nat-failed", "nat", str(error))
            return
        frame[0:6] = mac_for_ip_int(new_dst)
        frame[6:12] = mac_for_ip_int(self.ingress_ip)
        if ctx.trace is not None:
            ctx.note("nat", "dnat+snat", f"{ip_text(src)}:{sport} -> {ip_text(new_dst)}:{new_dport} from {ip_text(new_src)}:{new_sport}")
        view = self.dp.networks[INGRESS_NETWORK]
        self.dp.forward_unicast(ctx.result, ctx.index, ctx.port, view, mac_int(new_dst), bytes(frame), ctx.vnet, ctx.now, ctx.trace, known=True)
        ctx.done = True

    # ---- replies on the ingress network ----------------------------------------

    def _from_ingress_network(self, ctx) -> None:
        rec = ctx.record
        flags = int(rec["flags"])
        if int(rec["ethertype"]) == gateway.ETH_P_ARP:
            if int(rec["arp_op"]) == gateway.ARP_REQUEST and int(rec["arp_tpa"]) == self.ingress_ip:
                reply = gateway.arp_reply(int(rec["arp_sha"]), int(rec["arp_spa"]), self.ingress_mac, self.ingress_ip)
                ctx.reply(reply, "ingress", "arp-reply", "ingress sandbox address")
            else:
                ctx.drop("vip-no-service", "ingress", "ARP not for the ingress sandbox")
            return
        if not flags & (parse.IS_TCP | parse.IS_UDP) or int(rec["ip_dst"]) != self.ingress_ip:
            ctx.drop("vip-no-service", "ingress", "only replies of published connections reach the ingress sandbox")
            return
        proto = int(rec["ip_proto"])
        src, sport, dst, dport = int(rec["ip_src"]), int(rec["sport"]), int(rec["ip_dst"]), int(rec["dport"])
        entry, direction = self.ct.lookup(proto, src, sport, dst, dport, ctx.now)
        if entry < 0 or direction != nat.REPLY:
            ctx.drop("vip-no-connection", "ingress", "no tracked connection for this reply")
            return
        self.ct.update(entry, nat.REPLY, int(rec["tcp_flags"]) if proto == 6 else 0, ctx.now)
        new_src, new_sport, new_dst, new_dport = self.ct.translation(entry, nat.REPLY)
        frame = bytearray(ctx.frame)
        try:
            nat.rewrite(frame, int(rec["l3_off"]), int(rec["l4_off"]), proto, new_src, new_sport, new_dst, new_dport,
                        bool(flags & parse.NEEDS_CSUM))
        except ValueError as error:
            ctx.drop("nat-failed", "nat", str(error))
            return
        frame[0:6] = mac_for_ip_int(self.gw_ip)
        frame[6:12] = mac_for_ip_int(self.sbox_gw_ip)
        if ctx.trace is not None:
            ctx.note("conntrack", "reply", f"entry {entry}")
        if ctx.trace is not None:
            ctx.note("nat", "un-nat", f"to {ip_text(new_dst)}:{new_dport} on gwbridge")
        if ctx.trace is not None:
            ctx.trace.verdict = "deliver"
        ctx.emit(self.gwbridge_port, bytes(frame), ctx.vnet)
        ctx.done = True


def default_route_endpoint(cluster: Cluster, sandbox):
    """Return the sandbox's endpoint on the network of its default gateway, or None when it has no default gateway."""
    if sandbox.default_gateway is None:
        return None
    for endpoint in sandbox.endpoints:
        network = cluster.networks.get(endpoint.network)
        if network is not None and network.gateway == sandbox.default_gateway:
            return endpoint
    return None


@dataclass(frozen=True)
class HostTarget:
    """Destination of a local task's host-mode published port: its service, sandbox and network."""

    service: str
    sandbox: str
    network: str  # the network of the task's default gateway


class HostModePorts:
    """Ports published in host mode by this node's tasks: delivered untranslated, replies sent back to `gwbridge`.

    The host namespace DNATs a host-mode port straight to the task's address
    (tapnet.mesh), so the packet reaches `gwbridge` addressed to the task with
    the client's own address as source. This stage tracks the connection
    without translation, rewrites only the MACs and delivers it on the task's
    network. The task replies to the client through its default gateway. As
    an L3 stage, this stage sends a reply of a tracked connection back out of
    `gwbridge` before the gateway would drop it as `no-egress`.
    """

    name = "host-mode"

    def __init__(self, dp, lb: LoadBalancer, gwbridge_port: int):
        self.dp = dp
        self.ct = lb.ct
        self.gwbridge_port = gwbridge_port
        self.host_mac = mac_for_ip_int(int(GWBRIDGE_GATEWAY))
        self.sbox_mac = mac_for_ip_int(int(INGRESS_SBOX_GWBRIDGE_IP))
        self.targets: dict[tuple[int, int, int], HostTarget] = {}  # (proto, task address, target port) -> target
        self.tasks: set[int] = set()  # addresses of local tasks with host-mode ports
        dp.l3_stages.append(self)
        self.follow(dp.fabric.cluster)

    def follow(self, cluster: Cluster) -> None:
        self.targets = {}
        for sandbox in cluster.sandboxes.values():
            service = cluster.services.get(sandbox.service)
            if sandbox.node != self.dp.node or service is None:
                continue
            specs = [p for p in service.ports if p.mode == "host"]
            endpoint = default_route_endpoint(cluster, sandbox) if specs else None
            if endpoint is None or endpoint.network not in self.dp.networks:
                continue
            for spec in specs:
                proto = 6 if spec.protocol == "tcp" else 17
                self.targets[(proto, int(endpoint.ip), spec.target)] = HostTarget(service.name, sandbox.name, endpoint.network)
        self.tasks = {task for _, task, _ in self.targets}

    # ---- from the host namespace to the task ---------------------------------

    def from_gwbridge(self, ctx) -> None:
        """Deliver a frame on `gwbridge` addressed to a local host-mode task, tracked but not translated."""
        rec = ctx.record
        flags = int(rec["flags"])
        if flags & parse.IS_FRAGMENT or not flags & (parse.IS_TCP | parse.IS_UDP):
            ctx.drop("vip-no-service", self.name, "only unfragmented TCP and UDP are published")
            return
        proto = int(rec["ip_proto"])
        src, sport, dst, dport = int(rec["ip_src"]), int(rec["sport"]), int(rec["ip_dst"]), int(rec["dport"])
        target = self.targets.get((proto, dst, dport))
        if target is None:
            ctx.drop("vip-no-service", self.name, f"{ip_text(dst)} publishes no host-mode port {dport}")
            return

        tcp_flags = int(rec["tcp_flags"]) if proto == 6 else 0
        entry, direction = self.ct.lookup(proto, src, sport, dst, dport, ctx.now)
        if entry >= 0 and direction == nat.ORIGINAL:
            self.ct.update(entry, nat.ORIGINAL, tcp_flags, ctx.now)
            if ctx.trace is not None:
                ctx.note("conntrack", "hit", f"entry {entry}")
        else:
            if not opens_connection(proto, tcp_flags):
                ctx.drop("vip-no-connection", self.name, f"TCP flags {tcp_flags:#04x} without a tracked connection")
                return
            entry = self.ct.create(proto, (src, sport, dst, dport), (dst, dport, src, sport), ctx.now, tcp_flags, dst)
            if entry < 0:
                drop_rejected(ctx, entry)
                return
            if ctx.trace is not None:
                ctx.note("conntrack", "new", f"entry {entry}: host-mode port {dport} of {target.service} -> {target.sandbox}")

        view = self.dp.networks[target.network]
        frame = bytearray(ctx.frame)
        frame[0:6] = mac_for_ip_int(dst)
        frame[6:12] = view.gateway_mac.to_bytes(6, "big")
        if ctx.trace is not None:
            ctx.note(self.name, "deliver", f"{ip_text(src)}:{sport} -> {ip_text(dst)}:{dport} on {target.network}, untranslated")
        self.dp.forward_unicast(ctx.result, ctx.index, ctx.port, view, mac_int(dst), bytes(frame), ctx.vnet, ctx.now, ctx.trace, known=True)
        ctx.done = True

    # ---- replies at the task's gateway ------------------------------------------

    def handle(self, ctx) -> bool:
        """Send a task's reply of a tracked host-mode connection out of `gwbridge`; leave every other frame to the gateway."""
        rec = ctx.record
        flags = int(rec["flags"])
        if not flags & parse.IS_IPV4 or flags & parse.IS_FRAGMENT or not flags & (parse.IS_TCP | parse.IS_UDP):
            return False
        src = int(rec["ip_src"])
        if src not in self.tasks:
            return False
        proto = int(rec["ip_proto"])
        sport, dst, dport = int(rec["sport"]), int(rec["ip_dst"]), int(rec["dport"])
        entry, direction = self.ct.lookup(proto, src, sport, dst, dport, ctx.now)
        if entry < 0 or direction != nat.REPLY:
            return False

        self.ct.update(entry, nat.REPLY, int(rec["tcp_flags"]) if proto == 6 else 0, ctx.now)
        frame = bytearray(ctx.frame)
        frame[0:6] = self.host_mac
        frame[6:12] = self.sbox_mac
        if ctx.trace is not None:
            ctx.note("conntrack", "reply", f"entry {entry}")
        if ctx.trace is not None:
            ctx.note(self.name, "to-gwbridge", f"{ip_text(src)}:{sport} -> {ip_text(dst)}:{dport}, untranslated")
        if ctx.trace is not None:
            ctx.trace.verdict = "deliver"
        ctx.emit(self.gwbridge_port, bytes(frame), ctx.vnet)
        ctx.done = True
        return True


def reasons_code(number: int) -> str:
    from tapnet import reasons

    return reasons.code_of(number)


def install(dp) -> None:
    stage = LoadBalancer(dp)
    dp.lb = stage
    dp.ingress = IngressSandbox(dp, stage)
