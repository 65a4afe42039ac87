"""The sans-I/O datapath: frames in, frames out, with a reason for every drop.

Theory of operation
-------------------
A `Fabric` contains one `Datapath` per node of the cluster. Ports (anything
frames enter or leave by) have global integer ids so that one `FrameBatch`
can carry frames of every node, as the single runtime process and the replay
both need. `Fabric.process(batch, now, rng)` parses the whole batch with one
numba call (`tapnet.parse`), then hands each frame to its node's datapath.

A node's datapath keeps, per network present on the node, a learning bridge
(`tapnet.switch.Bridge`) and the network's gateway (`.1`, MAC 02:42 + IP).
For each frame it runs these steps in order:

1. drop malformed frames (the parser's reason) and frames from unknown ports;
2. learn the source MAC on the ingress port of the frame's network;
3. run the L2 stages (`Datapath.l2_stages`); any of them may consume the
   frame (ARP suppression, VIP ARP, VXLAN decap plug in here);
4. frames for the gateway MAC go to the L3 stages (`Datapath.l3_stages`:
   DNS responder, VIP DNAT plug in here), then to the gateway itself, which
   answers ARP and ICMP echo and drops everything else with a reason
   (`isolation`, `internal`, `no-egress`, `gateway-no-service`, ...);
5. everything else is bridged: broadcast, multicast and unknown unicast
   flood to the other ports of the same network; known unicast goes to the
   one port its MAC was learned on.

Invariants: a frame never leaves by a port of another network than the one
it entered on (isolation holds by construction, because a bridge only knows
its own ports); nothing reads a clock or draws randomness except through
`now` and `rng`; each input frame ends with exactly one verdict (deliver,
flood, reply or drop), counted per port.

A stage is any object with a `name` and a `handle(ctx) -> bool` method;
returning True means the stage consumed the frame (it emitted or dropped it
through `ctx`). Stages see a `FrameContext`, never the runtime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tapnet import gateway, offload, parse, reasons, vxlan
from tapnet.batch import FrameBatch
from tapnet.model import Cluster, Network, port_name
from tapnet.switch import Bridge, is_multicast
from tapnet import trace as trace_module
from tapnet.trace import TraceRecord, describe


@dataclass
class Port:
    id: int
    name: str
    node: str
    kind: str  # "tap": a sandbox endpoint; "vxlan": the node's VTEP
    network: str | None = None
    sandbox: str | None = None
    ifname: str | None = None
    mac: int = 0
    ip: int = 0
    offload: bool = True  # takes GSO superframes and partial checksums
    removed: bool = False  # its sandbox left the cluster; frames from it are dropped as unknown-port


@dataclass
class NetworkView:
    """One network as a node's datapath sees it, with addresses as integers for speed."""

    model: Network
    net: int
    mask: int
    gateway_ip: int
    gateway_mac: int
    bridge: Bridge
    # Addresses this node replies to ARP for besides the gateway (VIPs, the ingress sandbox): IP -> MAC.
    arp_table: dict[int, int] = field(default_factory=dict)
    # MACs owned by a stage rather than an endpoint (VIPs, the ingress sandbox): MAC -> stage.
    service_macs: dict[int, "Stage"] = field(default_factory=dict)
    # Optional check of unicast IPv4 frames before they are bridged: returns a
    # reason code to drop the frame, or None (the ingress network's port filter).
    guard: object = None

    def contains(self, ip: int) -> bool:
        return ip & self.mask == self.net


@dataclass
class Emit:
    port: int
    frame: bytes
    vnet: bytes | None
    index: int  # index in the batch of the input frame that caused this emission
    record: TraceRecord | None = None


@dataclass
class Result:
    emits: list[Emit] = field(default_factory=list)
    records: list[TraceRecord | None] = field(default_factory=list)


class Stage(Protocol):
    name: str

    def handle(self, ctx: "FrameContext") -> bool: ...


class FrameContext:
    """One frame on its way through a node's datapath, as stages see it."""

    __slots__ = ("dp", "result", "index", "port", "network", "frame", "vnet", "record", "now", "rng", "trace", "done")

    def __init__(self, dp, result, index, port, network, frame, vnet, record, now, rng, trace):
        self.dp: Datapath = dp
        self.result: Result = result
        self.index = index
        self.port: Port = port
        self.network: NetworkView = network
        self.frame: bytes = frame
        self.vnet: bytes | None = vnet
        self.record = record  # the parser's record for this frame: `record["field"]`, as a `Row`
        self.now: float = now
        self.rng: np.random.Generator = rng
        self.trace: TraceRecord | None = trace
        self.done = False

    def emit(self, port: int, frame: bytes, vnet: bytes | None = None) -> None:
        self.dp.transmit(self.result, port, frame, vnet, self.index, self.trace)

    def reply(self, frame: bytes, stage: str, decision: str, detail: str = "") -> None:
        """Send `frame` back out of the ingress port."""
        self.note(stage, decision, detail)
        self.emit(self.port.id, frame)
        if self.trace is not None:
            self.trace.verdict = "reply"
        self.done = True

    def drop(self, reason: str, stage: str, detail: str = "") -> None:
        self.dp.count_drop(self.port.id, reason)
        if self.trace is not None:
            self.trace.add(stage, "drop", detail or reasons.BY_CODE[reason].meaning)
            self.trace.verdict = "drop"
            self.trace.reason = reason
        self.done = True

    def note(self, stage: str, decision: str, detail: str = "") -> None:
        if self.trace is not None:
            self.trace.add(stage, decision, detail)


ip_text = trace_module._ip
mac_text = trace_module._mac


class Datapath:
    """One node's datapath."""

    def __init__(self, fabric: "Fabric", cluster: Cluster, node: str):
        self.fabric = fabric
        self.node = node
        self.networks: dict[str, NetworkView] = {}
        self.l2_stages: list[Stage] = []
        self.l3_stages: list[Stage] = []
        # Stages that own a port kind other than "tap" and "vxlan" (for example
        # "upstream" for DNS forwarding): frames read from such a port go to them.
        self.port_handlers: dict[str, Stage] = {}
        # Source addresses whose frames may be replies of a translated connection,
        # and the stage that translates them back (`translate_reply`).
        self.nat_watch: set[int] = set()
        self.nat_stage = None
        # (net, mask, name) of every network of the cluster, for isolation versus no-egress.
        self.cluster_subnets = [
            (int(n.subnet.network_address), int(n.subnet.netmask), n.name) for n in cluster.networks.values()
        ]
        self.peers = vxlan.PeerTable.build(cluster, node)
        self.vxlan_port: int | None = None  # id of `<node>/vxlan`, set by attach
        self.ip_id = 0  # outer IPv4 identification, one counter per VTEP
        for network in cluster.networks_on(node):
            self.networks[network.name] = NetworkView(
                model=network,
                net=int(network.subnet.network_address),
                mask=int(network.subnet.netmask),
                gateway_ip=int(network.gateway),
                gateway_mac=int.from_bytes(network.gateway_mac, "big"),
                bridge=Bridge(network.name, []),
            )

    def attach(self, port: Port) -> None:
        if port.kind == "vxlan":
            self.vxlan_port = port.id
        if port.network is not None:
            self.networks[port.network].bridge.ports.append(port.id)
            self.networks[port.network].bridge.ports.sort()

    # ---- counters -------------------------------------------------------

    def count_drop(self, port: int, reason: str) -> None:
        self.fabric.drops[(port, reason)] += 1

    def transmit(self, result: Result, port: int, frame: bytes, vnet, index: int, trace) -> None:
        fabric = self.fabric
        fabric.tx_packets[port] += 1
        fabric.tx_bytes[port] += len(frame)
        result.emits.append(Emit(port, frame, vnet, index, trace))
        if trace is not None:
            trace.egress.append(fabric.ports[port].name)

    # ---- the per-frame pipeline ------------------------------------------

    def handle(self, result: Result, i: int, port: Port, frame: bytes, vnet, records, cols, inner, now, rng, trace) -> None:
        status = cols.status[i]
        if status == reasons.MALFORMED_VXLAN and port.kind != "vxlan":
            status = 0  # UDP to port 4789 between sandboxes is plain UDP; its UDP header parsed whole
        if status:
            reason = reasons.code_of(status)
            self.count_drop(port.id, reason)
            if trace is not None:
                trace.add("parse", "drop", reasons.BY_NUMBER[status].meaning)
                trace.verdict, trace.reason = "drop", reason
            return
        if port.kind == "vxlan":
            self._from_tunnel(result, i, port, frame, cols, inner, trace)
            return
        if port.kind != "tap":
            handler = self.port_handlers.get(port.kind)
            ctx = FrameContext(self, result, i, port, None, frame, vnet, Row(cols, i), now, rng, trace)
            if handler is None or not handler.handle(ctx):
                if not ctx.done:
                    self._drop(port.id, "unknown-port", "datapath", trace, f"nothing handles {port.kind} ports")
            return
        self._bridge(result, i, port, self.networks[port.network], frame, vnet, records, cols, now, rng, trace)

    def _bridge(self, result, i, port: Port, network: NetworkView, frame, vnet, records, cols, now, rng, trace) -> None:
        bridge = network.bridge
        src = cols.src_mac[i]
        dst = cols.dst_mac[i]
        if is_multicast(src) or src == 0:
            self._drop(port.id, "invalid-src-mac", "switch", trace, mac_text(src))
            return
        if not bridge.learn(src, port.id, now):
            self.fabric.decisions["fdb-full"] += 1
            if trace is not None:
                trace.add("switch", "fdb-full", f"{mac_text(src)} not learned on {network.model.name}")
        elif trace is not None:
            trace.add("switch", "learn", f"{mac_text(src)} on {port.name} in {network.model.name}")

        ctx = None
        if self.l2_stages or (dst == network.gateway_mac and self.l3_stages):
            ctx = FrameContext(self, result, i, port, network, frame, vnet, Row(cols, i), now, rng, trace)
            for stage in self.l2_stages:
                if stage.handle(ctx) or ctx.done:
                    return

        if dst == network.gateway_mac:
            if ctx is not None:
                for stage in self.l3_stages:
                    if stage.handle(ctx) or ctx.done:
                        return
            self._to_gateway(result, i, port, network, frame, cols, trace)
            return

        if dst in network.service_macs:
            ctx = ctx or FrameContext(self, result, i, port, network, frame, vnet, Row(cols, i), now, rng, trace)
            if not network.service_macs[dst].handle(ctx) and not ctx.done:
                self._drop(port.id, "vip-no-service", "lb", trace, f"nothing answers at {mac_text(dst)}")
            return

        if self.nat_watch and cols.ip_src[i] in self.nat_watch and cols.flags[i] & parse.IS_IPV4:
            frame = self.nat_stage.translate_reply(self, port, frame, vnet, cols, i, now, trace)
            if frame is None:
                return

        if network.guard is not None and not is_multicast(dst):
            reason = network.guard(cols, i)
            if reason is not None:
                self._drop(port.id, reason, "lb", trace, f"{ip_text(cols.ip_dst[i])} port {cols.dport[i]}")
                return

        if is_multicast(dst):
            if cols.ethertype[i] == gateway.ETH_P_ARP and cols.arp_op[i] == gateway.ARP_REQUEST:
                self._answer_arp(result, i, port, network, self.peers.by_network.get(network.model.name), cols, trace)
            self._flood(result, i, port, bridge, frame, vnet, trace, "broadcast" if dst == 0xFFFFFFFFFFFF else "multicast")
            return
        self.forward_unicast(result, i, port, network, dst, frame, vnet, now, trace)

    def forward_unicast(
        self, result, i, port: Port, network: NetworkView, dst: int, frame, vnet, now, trace, known: bool = False
    ) -> None:
        """Send a unicast frame toward `dst` inside `network`: tunnel, learned port, or flood.

        With `known`, a local endpoint not learned yet is reached through cluster
        state instead of a flood (stages that chose the destination themselves).
        """
        peers = self.peers.by_network.get(network.model.name)
        if peers is not None:
            vtep = peers.mac_to_vtep.get(dst)
            if vtep is not None:
                self._to_tunnel(result, i, port, peers, vtep, frame, vnet, trace)
                return

        bridge = network.bridge
        out = bridge.lookup(dst, now)
        if out is None and known:
            out = self.fabric.endpoint_ports.get((network.model.name, dst))
        if out is None:
            self._flood(result, i, port, bridge, frame, vnet, trace, "unknown unicast")
            return
        if out == port.id:
            self._drop(port.id, "same-port", "switch", trace, f"{mac_text(dst)} learned on the ingress port")
            return
        if trace is not None:
            trace.add("switch", "fdb-hit", f"{mac_text(dst)} on {self.fabric.ports[out].name}")
            trace.verdict = "deliver"
        self.transmit(result, out, frame, vnet, i, trace)

    def _answer_arp(self, result, i, port, network: NetworkView, peers, cols, trace) -> None:
        """Answer a broadcast ARP request for the gateway, or for a remote endpoint (ARP suppression)."""
        target = cols.arp_tpa[i]
        if target == network.gateway_ip:
            mac, stage, decision = network.gateway_mac, "gateway", "arp-reply"
        elif target in network.arp_table:
            mac, stage, decision = network.arp_table[target], "lb", "arp-reply"
        elif peers is not None and target in peers.ip_to_mac:
            mac, stage, decision = peers.ip_to_mac[target], "vxlan", "arp-suppress"
        else:
            return
        reply = gateway.arp_reply(cols.arp_sha[i], cols.arp_spa[i], mac, target)
        if trace is not None:
            trace.add(stage, decision, f"{ip_text(target)} is-at {mac_text(mac)}")
            trace.verdict = "reply"
        self.transmit(result, port.id, reply, None, i, trace)

    def _to_tunnel(self, result, i, port, peers: vxlan.OverlayPeers, vtep: int, frame, vnet, trace) -> None:
        """Encapsulate a frame for a remote endpoint and emit it on this node's VTEP port."""
        if vnet is not None:
            try:
                if vnet[1] & 0x7F:  # gso_type other than VIRTIO_NET_HDR_GSO_NONE: a superframe
                    frames = offload.segment(frame, vnet)
                else:
                    frames = [offload.complete_checksum(frame, vnet)]
            except ValueError as error:
                self._drop(port.id, "offload-failed", "vxlan", trace, str(error))
                return
        else:
            frames = [frame]
        for inner in frames:
            self.ip_id = (self.ip_id + 1) & 0xFFFF
            outer = vxlan.encapsulate(
                inner, peers.vni, self.peers.vtep_ip, vtep, self.peers.vtep_mac,
                vxlan.derived_mac(vtep), self.ip_id,
            )
            self.transmit(result, self.vxlan_port, outer, None, i, trace)
        if trace is not None:
            detail = f"vni {peers.vni} to vtep {ip_text(vtep)}"
            if len(frames) > 1:
                detail += f", {len(frames)} segments"
            trace.add("vxlan", "encap", detail)
            trace.verdict = "deliver"

    def _from_tunnel(self, result, i, port: Port, frame, cols, inner, trace) -> None:
        """Check a datagram that arrived on the VTEP and deliver its inner frame to a local endpoint."""
        if not cols.flags[i] & parse.IS_VXLAN:
            self._drop(port.id, "not-vxlan", "vxlan", trace)
            return
        src = cols.ip_src[i]
        if src not in self.peers.known_vteps:
            self._drop(port.id, "vxlan-unknown-vtep", "vxlan", trace, f"from {ip_text(src)}")
            return
        if not cols.vxlan_flags[i] & vxlan.VXLAN_FLAG_I:
            self._drop(port.id, "vxlan-i-flag-clear", "vxlan", trace, f"flags {cols.vxlan_flags[i]:#04x}")
            return
        vni = cols.vni[i]
        peers = self.peers.by_vni.get(vni)
        if peers is None or peers.network not in self.networks:
            self._drop(port.id, "vxlan-unknown-vni", "vxlan", trace, f"vni {vni}")
            return
        status = inner.status[i]
        if status:
            self._drop(port.id, reasons.code_of(status), "vxlan", trace, "inner frame: " + reasons.BY_NUMBER[status].meaning)
            return
        dst = inner.dst_mac[i]
        if is_multicast(dst):
            self._drop(port.id, "vxlan-broadcast", "vxlan", trace, f"inner destination {mac_text(dst)}")
            return
        view = self.networks[peers.network]
        if dst in view.service_macs:
            start = cols.inner_off[i]
            inner_frame = frame[start : cols.payload_off[i] + cols.payload_len[i]]
            if trace is not None:
                trace.add("vxlan", "decap", f"vni {vni} from vtep {ip_text(src)} to network {peers.network}")
            ctx = FrameContext(self, result, i, port, view, inner_frame, None, Row(inner, i), self.fabric.now, None, trace)
            if not view.service_macs[dst].handle(ctx) and not ctx.done:
                self._drop(port.id, "vxlan-unknown-mac", "vxlan", trace, f"nothing answers at {mac_text(dst)}")
            return
        if dst not in peers.local_macs:
            self._drop(port.id, "vxlan-unknown-mac", "vxlan", trace, f"{mac_text(dst)} on network {peers.network}")
            return
        bridge = self.networks[peers.network].bridge
        out = self.local_port_of(peers.network, dst)
        if out is None:
            self._drop(port.id, "vxlan-unknown-mac", "vxlan", trace, f"{mac_text(dst)} has no port")
            return
        start = cols.inner_off[i]
        end = cols.payload_off[i] + cols.payload_len[i]
        delivered = frame[start:end]
        if trace is not None:
            trace.add("vxlan", "decap", f"vni {vni} from vtep {ip_text(src)} to network {bridge.network}")
        if self.nat_watch and inner.ip_src[i] in self.nat_watch and inner.flags[i] & parse.IS_IPV4:
            delivered = self.nat_stage.translate_reply(self, port, delivered, None, inner, i, self.fabric.now, trace)
            if delivered is None:
                return
        if trace is not None:
            trace.add("switch", "deliver", f"{mac_text(dst)} on {self.fabric.ports[out].name}")
            trace.verdict = "deliver"
        self.transmit(result, out, delivered, None, i, trace)

    def local_port_of(self, network: str, mac: int) -> int | None:
        return self.fabric.endpoint_ports.get((network, mac))

    def _drop(self, port: int, reason: str, stage: str, trace, detail: str = "") -> None:
        self.count_drop(port, reason)
        if trace is not None:
            trace.add(stage, "drop", detail or reasons.BY_CODE[reason].meaning)
            trace.verdict, trace.reason = "drop", reason

    def _flood(self, result, i, port, bridge, frame, vnet, trace, why: str) -> None:
        targets = bridge.flood_ports(port.id)
        if trace is not None:
            trace.add("switch", "flood", f"{why} to {len(targets)} port(s) of {bridge.network}")
        if not targets:
            if trace is not None and not trace.egress:
                trace.verdict = "flood"
            return
        for target in targets:
            self.transmit(result, target, frame, vnet, i, trace)
        if trace is not None and not trace.verdict:
            trace.verdict = "flood"

    def _to_gateway(self, result, i, port, network: NetworkView, frame, cols, trace) -> None:
        """Reply as the gateway to ARP and ICMP echo, and drop everything else with its reason."""
        ethertype = cols.ethertype[i]
        if ethertype == gateway.ETH_P_ARP:
            if cols.arp_op[i] == gateway.ARP_REQUEST and cols.arp_tpa[i] == network.gateway_ip:
                reply = gateway.arp_reply(cols.arp_sha[i], cols.arp_spa[i], network.gateway_mac, network.gateway_ip)
                if trace is not None:
                    trace.add("gateway", "arp-reply", f"{ip_text(network.gateway_ip)} is-at {mac_text(network.gateway_mac)}")
                    trace.verdict = "reply"
                self.transmit(result, port.id, reply, None, i, trace)
                return
            self._drop(port.id, "gateway-no-service", "gateway", trace, "ARP not asking for the gateway")
            return
        if ethertype != gateway.ETH_P_IP:
            self._drop(port.id, "unsupported-ethertype", "gateway", trace, f"ethertype 0x{ethertype:04x}")
            return

        dst = cols.ip_dst[i]
        if dst == network.gateway_ip:
            if cols.flags[i] & parse.IS_FRAGMENT:
                self._drop(port.id, "ip-fragment", "gateway", trace)
                return
            if cols.flags[i] & parse.IS_ICMP and cols.icmp_type[i] == gateway.ICMP_ECHO_REQUEST:
                reply = gateway.icmp_echo_reply(
                    frame, cols.l3_off[i], cols.ip_ihl[i], cols.ip_tot_len[i], network.gateway_mac
                )
                if trace is not None:
                    trace.add("gateway", "echo-reply", f"from {ip_text(dst)} id {cols.icmp_id[i]} seq {cols.icmp_seq[i]}")
                    trace.verdict = "reply"
                self.transmit(result, port.id, reply, None, i, trace)
                return
            self._drop(port.id, "gateway-no-service", "gateway", trace, f"proto {cols.ip_proto[i]} to {ip_text(dst)}")
            return

        if network.contains(dst):
            self._drop(port.id, "gateway-no-service", "gateway", trace, f"{ip_text(dst)} is on-link; not routed")
            return
        if network.model.internal:
            self._drop(port.id, "internal", "gateway", trace, f"{ip_text(dst)} outside internal network {network.model.name}")
            return
        for net, mask, name in self.cluster_subnets:
            if dst & mask == net:
                self._drop(port.id, "isolation", "gateway", trace, f"{ip_text(dst)} is on network {name}, not {network.model.name}")
                return
        self._drop(port.id, "no-egress", "gateway", trace, f"{ip_text(dst)} is outside the cluster")

    def tick(self, now: float, result: Result) -> None:
        """Run this node's timers: MAC ageing, then each stage's own `tick(now, result)`."""
        for view in self.networks.values():
            view.bridge.expire(now)
        for stage in self.stages_with("tick"):
            stage.tick(now, result)

    def stages_with(self, method: str) -> list:
        """Return every installed stage that has `method`, each once, in installation order."""
        seen, out = set(), []
        stages = [*self.l2_stages, *self.l3_stages, *self.port_handlers.values()]
        stages += [s for view in self.networks.values() for s in view.service_macs.values()]
        if self.nat_stage is not None:
            stages.append(self.nat_stage)
        for stage in stages:
            if id(stage) not in seen and hasattr(stage, method):
                seen.add(id(stage))
                out.append(stage)
        return out

    def follow(self, cluster: Cluster) -> None:
        """Adopt a changed cluster: new peer table, and no FDB entry for a MAC that moved away."""
        self.peers = vxlan.PeerTable.build(cluster, self.node)
        self.cluster_subnets = [
            (int(n.subnet.network_address), int(n.subnet.netmask), n.name) for n in cluster.networks.values()
        ]
        for name, peers in self.peers.by_network.items():
            view = self.networks.get(name)
            if view is None:
                continue
            for mac in peers.mac_to_vtep:
                entry = view.bridge.fdb.pop(mac, None)
                if entry is not None and not entry.static:
                    view.bridge.learned -= 1
        for stage in self.stages_with("follow"):
            stage.follow(cluster)


OFFLOAD_FLAGS = parse.NEEDS_CSUM | parse.IS_GSO

# Timers (MAC ageing, stage timeouts) run at least this often, in seconds of datapath time.
TICK_INTERVAL = 1.0

# Modules whose `install(datapath)` adds their stages to each node's
# datapath, in this order. A module that is not there yet is skipped.
STAGE_MODULES = ("tapnet.dns", "tapnet.lb")


def install_stages(dp: "Datapath") -> None:
    import importlib

    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.install(dp)


class _Columns:
    """Record fields as Python lists, converted on first use: cheap indexing per frame.

    A field costs one vectorised `tolist` per batch, and only when a frame of
    the batch needs it, so a batch of one frame does not pay for every field.
    """

    FIELDS = (
        "status", "flags", "dst_mac", "src_mac", "ethertype", "l3_off", "l4_off",
        "arp_op", "arp_sha", "arp_spa", "arp_tpa",
        "ip_src", "ip_dst", "ip_proto", "ip_ihl", "ip_tot_len",
        "icmp_type", "icmp_id", "icmp_seq", "sport", "dport",
        "tcp_flags", "payload_off", "payload_len", "ip6_next", "vxlan_flags", "vni", "inner_off",
    )

    def __init__(self, records: np.ndarray):
        self._records = records

    def __getattr__(self, name: str) -> list:
        values = self._records[name].tolist()
        setattr(self, name, values)
        return values


class Row:
    """One frame's parser record, read field by field as `row["dport"]`, from the batch's columns.

    Indexing a numpy structured array element costs about a microsecond per
    field. The columns are plain lists, so stages that read many fields of a
    frame do not pay that.
    """

    __slots__ = ("_columns", "_index")

    def __init__(self, columns: "_Columns", index: int):
        self._columns = columns
        self._index = index

    def __getitem__(self, name: str):
        return getattr(self._columns, name)[self._index]


class Fabric:
    """Every node's datapath, with one global port numbering."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.ports: list[Port] = []
        self._by_name: dict[str, int] = {}
        self.nodes: dict[str, Datapath] = {node.name: Datapath(self, cluster, node.name) for node in cluster.nodes}
        self.drops: Counter[tuple[int, str]] = Counter()
        self.decisions: Counter[str] = Counter()
        self.rx_packets: list[int] = []
        self.rx_bytes: list[int] = []
        self.tx_packets: list[int] = []
        self.tx_bytes: list[int] = []
        self.next_trace_id = 1
        self.now = 0.0  # time of the frame being processed
        self.next_tick: float | None = None  # when timers are next due, on the datapath's clock
        self.endpoint_ports: dict[tuple[str, int], int] = {}  # (network, MAC) -> port of a local endpoint
        self._records = None
        self._inner = None
        for node in cluster.nodes:
            self.add_port(Port(id=-1, name=f"{node.name}/vxlan", node=node.name, kind="vxlan", offload=False))
            self.add_port(Port(id=-1, name=f"{node.name}/upstream", node=node.name, kind="upstream", offload=False))
            self.add_port(Port(id=-1, name=f"{node.name}/gwbridge", node=node.name, kind="gwbridge"))
        for dp in self.nodes.values():
            install_stages(dp)
        for sandbox in cluster.sandboxes.values():
            for endpoint in sandbox.endpoints:
                self.add_port(self._endpoint_port(sandbox, endpoint))

    def add_port(self, port: Port) -> int:
        if port.name in self._by_name:
            raise ValueError(f"duplicate port name {port.name!r}")
        port.id = len(self.ports)
        self.ports.append(port)
        self._by_name[port.name] = port.id
        for counter in (self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes):
            counter.append(0)
        self.nodes[port.node].attach(port)
        if port.kind == "tap":
            self.endpoint_ports[(port.network, port.mac)] = port.id
        return port.id

    def update_cluster(self, cluster: Cluster) -> list[int]:
        """Follow a changed cluster (tasks added or removed); return the ids of new ports.

        Ports of removed sandboxes stop at once: their FDB entries go and
        frames still read from them count as `unknown-port`. Port ids are never
        reused, so the runtime's fd table stays valid. Networks must not change.
        """
        wanted = {}
        for sandbox in cluster.sandboxes.values():
            for endpoint in sandbox.endpoints:
                wanted[port_name(sandbox.node, sandbox.name, endpoint.ifname)] = (sandbox, endpoint)
        for port in self.ports:
            if port.kind == "tap" and not port.removed and port.name not in wanted:
                port.removed = True
                del self._by_name[port.name]
                self.endpoint_ports.pop((port.network, port.mac), None)
                self.nodes[port.node].networks[port.network].bridge.remove_port(port.id)
        added = []
        for name, (sandbox, endpoint) in wanted.items():
            if name not in self._by_name:
                added.append(self.add_port(self._endpoint_port(sandbox, endpoint)))
        self.cluster = cluster
        for dp in self.nodes.values():
            dp.follow(cluster)
        return added

    def _endpoint_port(self, sandbox, endpoint) -> Port:
        return Port(
            id=-1,
            name=port_name(sandbox.node, sandbox.name, endpoint.ifname),
            node=sandbox.node,
            kind="tap",
            network=endpoint.network,
            sandbox=sandbox.name,
            ifname=endpoint.ifname,
            mac=int.from_bytes(endpoint.mac, "big"),
            ip=int(endpoint.ip),
        )

    @property
    def port_names(self) -> list[str]:
        return [p.name for p in self.ports]

    def port_id(self, name: str) -> int:
        return self._by_name[name]

    def process(self, batch: FrameBatch, now: float | None, rng: np.random.Generator, trace: bool = False) -> Result:
        """Run every frame of `batch` through its node's datapath.

        `now` is the time for the whole batch (live runtime); None means each
        frame's own `batch.timestamps` entry (replay).
        """
        result = Result()
        count = batch.count
        if count == 0:
            return result
        if self._records is None or len(self._records) < count:
            self._records = np.zeros(max(count, batch.capacity_frames), dtype=parse.RECORD_DTYPE)
        # Finish partial checksums of ordinary frames once per batch, so only
        # GSO superframes reach the stages with offload work left to do.
        offload.complete_partial(batch.buf, batch.offsets, batch.lengths, batch.vnet, count)
        records = parse.parse_batch(batch, out=self._records)[:count]
        cols = _Columns(records)
        inner = None
        if any(cols.flags[i] & parse.IS_VXLAN for i in range(count)):
            if self._inner is None or len(self._inner) < len(self._records):
                self._inner = np.zeros(len(self._records), dtype=parse.RECORD_DTYPE)
            inner = _Columns(parse.parse_inner(batch, records, out=self._inner))
        data = batch.buf[: batch.used].tobytes()
        offsets = batch.offsets[:count].tolist()
        lengths = batch.lengths[:count].tolist()
        port_ids = batch.ports[:count].tolist()
        times = batch.timestamps[:count].tolist() if now is None else None
        n_ports = len(self.ports)

        for i in range(count):
            pid = port_ids[i]
            t = times[i] if times is not None else now
            start = offsets[i]
            frame = data[start : start + lengths[i]]
            # The virtio-net header matters only for partial checksums and GSO.
            vnet = batch.vnet[i].tobytes() if cols.flags[i] & OFFLOAD_FLAGS else None
            self.now = t
            if self.next_tick is None:
                self.next_tick = t + TICK_INTERVAL
            elif t >= self.next_tick:
                self._run_timers(result, t, i)
            record = None
            if trace:
                record = TraceRecord(
                    self.next_trace_id,
                    t,
                    self.ports[pid].node if 0 <= pid < n_ports else "?",
                    self.ports[pid].name if 0 <= pid < n_ports else f"port {pid}",
                    describe(cols, i),
                )
                self.next_trace_id += 1
                result.records.append(record)
            if not 0 <= pid < n_ports or self.ports[pid].removed:
                self.drops[(-1, "unknown-port")] += 1
                if record is not None:
                    record.add("datapath", "drop", f"no port with id {pid}")
                    record.verdict, record.reason = "drop", "unknown-port"
                continue
            port = self.ports[pid]
            self.rx_packets[pid] += 1
            self.rx_bytes[pid] += lengths[i]
            self.nodes[port.node].handle(result, i, port, frame, vnet, records, cols, inner, t, rng, record)
        return result

    def tick(self, now: float) -> Result:
        """Run every node's timers; frames they send (timeouts, retransmissions) are in the result.

        `process` also runs them when a frame's time passes the next deadline,
        so replay fires timers at packet times whatever the batch size; the
        live runtime calls `tick` as well so that timers run while no frame
        arrives.
        """
        result = Result()
        self._run_timers(result, now, -1)
        return result

    def _run_timers(self, result: Result, now: float, index: int) -> None:
        first = len(result.emits)
        for dp in self.nodes.values():
            dp.tick(now, result)
        for emit in result.emits[first:]:
            emit.index = index  # the frame at whose time the timers ran
        self.next_tick = now + TICK_INTERVAL

    def counters(self) -> dict[str, dict]:
        out = {}
        for port in self.ports:
            out[port.name] = {
                "rx_packets": self.rx_packets[port.id],
                "rx_bytes": self.rx_bytes[port.id],
                "tx_packets": self.tx_packets[port.id],
                "tx_bytes": self.tx_bytes[port.id],
                "drops": {},
            }
        for (pid, reason), n in sorted(self.drops.items()):
            name = self.ports[pid].name if pid >= 0 else "(unknown port)"
            out.setdefault(name, {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "drops": {}})
            out[name]["drops"][reason] = n
        return out

    def drops_by_reason(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for (_, reason), n in self.drops.items():
            totals[reason] += n
        return dict(sorted(totals.items()))

    def fdb(self, now: float) -> list[dict]:
        """Rows shaped like `bridge fdb show`: MAC, port, network, node, age, static."""
        rows = []
        for dp in self.nodes.values():
            for view in dp.networks.values():
                for mac, port, age, static in view.bridge.rows(now):
                    rows.append(
                        {
                            "mac": mac_text(mac),
                            "port": self.ports[port].name,
                            "network": view.model.name,
                            "node": dp.node,
                            "age": round(age, 3),
                            "static": static,
                        }
                    )
        return rows
