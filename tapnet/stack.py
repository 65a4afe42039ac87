"""Stack files: compile a compose / `docker stack deploy` YAML file into a Cluster.

Theory of operation. Compilation runs in two phases.

Reading (`tapnet.stackspec`) checks the YAML's shape key by key and turns it
into plain specs, one per network and service plus one for the `x-tapnet`
section. Every error names the dotted key that caused it and gives the fix.
Keys tapnet does not use warn once each and are otherwise ignored.

Compiling (this module) then makes Docker's decisions in a fixed order, so
that the same file always gives the same Cluster:

1. the underlay subnet and the node addresses on it,
2. the networks that exist, with their subnets, gateways and VNIs,
3. the x-tapnet objects that live on those subnets (clients, peers, DNS
   upstreams),
4. published ports that need an automatic number, and the loopback relays,
5. placement of tasks on nodes (a bridge network keeps to one node),
6. addresses, per subnet: the gateway, the ingress-sandbox addresses (ingress
   only), VIPs in service order, then task addresses in service and slot order,
7. sandboxes, with endpoints in Docker's order.

The only I/O is reading the file. The caller passes the root namespace's
interface networks in, so that the underlay and automatic subnets avoid them.
docs/stack-files.md documents every key and rule.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tapnet.model import (
    BRIDGE_MTU,
    BRIDGE_POOL_START,
    BRIDGE_PREFIX,
    DEFAULT_UNDERLAY,
    FIRST_USER_VNI,
    GWBRIDGE_SUBNET,
    INGRESS_NETWORK,
    INGRESS_SUBNET,
    INGRESS_VNI,
    OVERLAY_MTU,
    OVERLAY_POOL,
    OVERLAY_PREFIX,
    UNDERLAY_CANDIDATES,
    VXLAN_PORT,
    Cluster,
    Endpoint,
    ExternalPeer,
    IPv4Address,
    IPv4Network,
    Network,
    Node,
    PortSpec,
    Sandbox,
    Service,
    mac_for_ip,
)
from tapnet.stackspec import (
    DEFAULT_DRIVER,
    DEFAULT_NETWORK,
    PROTOCOLS,
    NetworkSpec,
    PortRequest,
    ServiceSpec,
    StackError,
    StackSpec,
    WarningLog,
    join_key,
    parse_ipv4,
    parse_unicast_mac,
    read_stack,
)

__all__ = [
    "StackError",
    "compile_stack",
    "demo_stack_path",
    "load_demo",
    "load_stack",
    "load_stack_file",
    "load_stack_text",
    "normalize_root_networks",
    "parse_stack_text",
]

log = logging.getLogger(__name__)

MTU_BY_DRIVER = {"overlay": OVERLAY_MTU, "bridge": BRIDGE_MTU}
# swarmkit's dynamic range for published ports given without a number.
DYNAMIC_PORT_FIRST = 30000
DYNAMIC_PORT_LAST = 32767
# Automatic bridge subnets are /16s from 172.17.0.0 up to 172.31.0.0, the end
# of the private block 172.16.0.0/12 that Docker's default bridge pool uses.
BRIDGE_POOL_LAST = IPv4Network("172.31.0.0/16")
# Node n (counting from 0) gets underlay address network + 2 + n. The address
# network + 1 is kept free for the underlay bridge.
UNDERLAY_RESERVED_OFFSET = 1
UNDERLAY_FIRST_NODE_OFFSET = 2


# --------------------------------------------------------------------------
# Public API


def demo_stack_path() -> Path:
    """Return the path of the built-in demo stack file, tapnet/demo.yml."""
    return Path(__file__).with_name("demo.yml")


def load_demo(*, root_networks: Iterable[Any] = ()) -> Cluster:
    """Compile the built-in demo stack."""
    return load_stack_file(demo_stack_path(), root_networks=root_networks)


def load_stack(source: str | os.PathLike[str], *, root_networks: Iterable[Any] = ()) -> Cluster:
    """Compile a stack file given as a path or as YAML text.

    A `PathLike` is always a path. A `str` that contains a newline is YAML
    text, and any other `str` is a path. Use `load_stack_text` for one-line
    YAML.
    """
    if isinstance(source, os.PathLike):
        return load_stack_file(source, root_networks=root_networks)
    if not isinstance(source, str):
        raise TypeError(f"load_stack expects a path or YAML text, got {type(source).__name__}")
    if "\n" in source:
        return load_stack_text(source, root_networks=root_networks)
    return load_stack_file(source, root_networks=root_networks)


def load_stack_file(path: str | os.PathLike[str], *, root_networks: Iterable[Any] = ()) -> Cluster:
    """Read and compile the stack file at `path`."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problem = f"cannot read stack file {name}: {error}"
        raise StackError("", problem, "Check the path and that the file is readable UTF-8 text.") from error
    try:
        return load_stack_text(text, root_networks=root_networks)
    except StackError as error:
        error.source = name
        raise


def load_stack_text(text: str, *, root_networks: Iterable[Any] = ()) -> Cluster:
    """Parse YAML text and compile it."""
    return compile_stack(parse_stack_text(text), root_networks=root_networks)


def parse_stack_text(text: str) -> Any:
    """Parse stack YAML with a safe loader that rejects duplicate keys, and return the document."""
    try:
        return yaml.load(text, Loader=_StackLoader)  # noqa: S506 - _StackLoader is a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = error.problem or error.context or "syntax error"
        raise StackError(where, f"invalid YAML: {problem}", "Fix the YAML syntax at that place.") from error
    except yaml.YAMLError as error:
        raise StackError("", f"invalid YAML: {error}", "Fix the YAML syntax.") from error


def compile_stack(document: Any, *, root_networks: Iterable[Any] = ()) -> Cluster:
    """Compile a parsed stack document (the mapping YAML gives) into a Cluster.

    `root_networks` lists the IPv4 and IPv6 interface networks of the root
    namespace, as `ipaddress` networks, interfaces or strings such as
    "192.0.2.2/24".
    """
    warnings = WarningLog()
    roots = normalize_root_networks(root_networks)
    spec = read_stack(document, warnings)
    builder = _ClusterBuilder(spec, roots, warnings)
    return builder.build()


def normalize_root_networks(items: Iterable[Any]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Turn the caller's root-namespace networks into `ipaddress` networks."""
    networks = []
    for item in items:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            networks.append(item)
        elif isinstance(item, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
            networks.append(item.network)
        elif isinstance(item, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            networks.append(ipaddress.ip_network(item))
        else:
            networks.append(ipaddress.ip_interface(str(item)).network)
    return networks


# --------------------------------------------------------------------------
# YAML loading


class _StackLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `22:22` as a string.

    YAML 1.1 reads unquoted `22:22` as the base-60 integer 1342, which turns a
    port mapping into a wrong port. Compose files mean the string.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            identity = (key_node.tag, key_node.value)
            if identity in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(identity)
        return super().construct_mapping(node, deep=deep)


_INT_TAG = "tag:yaml.org,2002:int"
_StackLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# PyYAML's integer pattern without its base-60 alternative.
_StackLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    list("-+0123456789"),
)


# --------------------------------------------------------------------------
# Compiling: specs to a Cluster


class _AddressPool:
    """The free host addresses of one subnet, handed out lowest first."""

    def __init__(self, subnet: IPv4Network) -> None:
        self.subnet = subnet
        self._next = int(subnet.network_address) + 1
        self._last = int(subnet.broadcast_address) - 1
        self._reserved: set[int] = set()

    def reserve(self, ip: IPv4Address) -> None:
        self._reserved.add(int(ip))

    def is_reserved(self, ip: IPv4Address) -> bool:
        return int(ip) in self._reserved

    def take(self) -> IPv4Address | None:
        while self._next <= self._last and self._next in self._reserved:
            self._next += 1
        if self._next > self._last:
            return None
        ip = IPv4Address(self._next)
        self._reserved.add(self._next)
        return ip


@dataclass(frozen=True)
class _Claim:
    """A subnet in use, with a label for error messages."""

    subnet: IPv4Network
    label: str


class _ClusterBuilder:
    """Builder of a Cluster from specs, deciding in the order the module comment lists."""

    def __init__(
        self,
        spec: StackSpec,
        roots: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        warnings: WarningLog,
    ) -> None:
        self.tapnet = spec.tapnet
        self.network_specs = spec.networks
        self.services = spec.services
        self.roots_v4 = [net for net in roots if net.version == 4]
        self.warnings = warnings
        self.node_names = [name for name, _ip in spec.tapnet.nodes]
        self.networks: dict[str, Network] = {}
        self.pools: dict[str, _AddressPool] = {}

    def build(self) -> Cluster:
        used_specs = self._used_network_specs()
        underlay = self._choose_underlay(used_specs)
        nodes = self._assign_node_addresses(underlay)
        clients = self._check_clients(underlay, nodes)

        self._create_networks(used_specs, underlay)
        peers = self._create_peers(underlay, nodes)
        upstreams = self._check_upstreams(underlay)

        ports = self._resolve_ports()
        relay_ports = self._resolve_relay_ports(ports)

        self._place_tasks()
        ingress_sbox_ips = {
            node.name: self._take(INGRESS_NETWORK, "x-tapnet.nodes", "an ingress sandbox") for node in nodes
        }
        services = self._create_services(ports)
        sandboxes = self._create_sandboxes(services)

        return Cluster(
            nodes=nodes,
            networks=self.networks,
            services=services,
            sandboxes=sandboxes,
            underlay=underlay,
            external_peers=peers,
            dns_upstreams=upstreams,
            clients=clients,
            relay_ports=relay_ports,
            ingress_sbox_ips=ingress_sbox_ips,
            warnings=self.warnings.messages,
        )

    # Step 1: underlay and nodes.

    def _used_network_specs(self) -> list[NetworkSpec]:
        """Return the networks a service or peer uses, in stack order, and warn about the rest.

        `docker stack deploy` likewise creates only the networks its services use.
        """
        used = {name for service in self.services.values() for name in service.networks}
        used.update(str(peer.get("network")) for _key, peer in self.tapnet.peers)
        specs = []
        for name, spec in self.network_specs.items():
            if name in used:
                specs.append(spec)
            else:
                self.warnings.add(f"{spec.key}: not used by any service or peer, not created")
        if DEFAULT_NETWORK in used and DEFAULT_NETWORK not in self.network_specs:
            key = join_key("networks", DEFAULT_NETWORK)
            specs.append(
                NetworkSpec(DEFAULT_NETWORK, key, DEFAULT_DRIVER, None, f"{key}.ipam.config[0].subnet", None)
            )
        return specs

    def _choose_underlay(self, specs: list[NetworkSpec]) -> IPv4Network:
        key = "x-tapnet.underlay"
        configured = self.tapnet.underlay
        if configured is not None:
            for root in self.roots_v4:
                if configured.overlaps(root):
                    problem = f"underlay {configured} overlaps {root}, a network of the root namespace"
                    free = self._free_underlay_candidate(specs)
                    fix = (
                        f"Use a subnet no interface of the machine uses, such as {free}."
                        if free
                        else "Pick a free subnet."
                    )
                    raise StackError(key, problem, fix)
            for subnet, label in (
                (INGRESS_SUBNET, "the ingress network"),
                (GWBRIDGE_SUBNET, "docker_gwbridge"),
            ):
                if configured.overlaps(subnet):
                    problem = f"underlay {configured} overlaps {label} {subnet}"
                    raise StackError(
                        key, problem, "Pick an underlay outside 10.255.0.0/16 and 172.18.0.0/16."
                    )
            return configured

        free = self._free_underlay_candidate(specs)
        if free is None:
            candidates = ", ".join(str(net) for net in UNDERLAY_CANDIDATES)
            raise StackError(
                key,
                f"every default underlay candidate ({candidates}) overlaps a root-namespace or stack network",
                "Set x-tapnet.underlay to a free IPv4 subnet.",
            )
        if free != DEFAULT_UNDERLAY:
            log.info(
                "underlay %s chosen because %s overlaps a root-namespace or stack network",
                free,
                DEFAULT_UNDERLAY,
            )
        return free

    def _free_underlay_candidate(self, specs: list[NetworkSpec]) -> IPv4Network | None:
        in_use = self.roots_v4 + [INGRESS_SUBNET, GWBRIDGE_SUBNET]
        in_use += [spec.subnet for spec in specs if spec.subnet is not None]
        for candidate in UNDERLAY_CANDIDATES:
            if not any(candidate.overlaps(net) for net in in_use):
                return candidate
        return None

    def _assign_node_addresses(self, underlay: IPv4Network) -> list[Node]:
        explicit = {ip: name for name, ip in self.tapnet.nodes if ip is not None}
        nodes = []
        for index, (name, ip) in enumerate(self.tapnet.nodes):
            key = f"x-tapnet.nodes.{name}.underlay_ip"
            if ip is None:
                key = "x-tapnet.nodes"
                position = int(underlay.network_address) + UNDERLAY_FIRST_NODE_OFFSET + index
                if position >= int(underlay.broadcast_address):
                    raise StackError(
                        "x-tapnet.underlay",
                        f"underlay {underlay} is too small for {len(self.tapnet.nodes)} nodes",
                        "Use a larger subnet.",
                    )
                ip = IPv4Address(position)
                owner = explicit.get(ip)
                if owner is not None and owner != name:
                    problem = f"node {name} gets {ip} by position, but node {owner} sets the same underlay_ip"
                    raise StackError(
                        key, problem, "Give every node an explicit underlay_ip, or pick another address."
                    )
            self._check_underlay_host(ip, underlay, key)
            for other in nodes:
                if other.underlay_ip == ip:
                    raise StackError(
                        key,
                        f"nodes {other.name} and {name} share underlay address {ip}",
                        "Give each node its own address.",
                    )
            nodes.append(Node(name, ip))
        return nodes

    def _check_underlay_host(self, ip: IPv4Address, underlay: IPv4Network, key: str) -> None:
        reserved = underlay.network_address + UNDERLAY_RESERVED_OFFSET
        if ip not in underlay or ip in (underlay.network_address, underlay.broadcast_address):
            raise StackError(
                key,
                f"{ip} is not a host address of the underlay {underlay}",
                "Pick an address inside the underlay.",
            )
        if ip == reserved:
            raise StackError(
                key, f"{ip} is reserved for the underlay bridge", f"Pick an address from {reserved + 1} up."
            )

    def _check_clients(self, underlay: IPv4Network, nodes: list[Node]) -> dict[str, IPv4Address]:
        owners = {node.underlay_ip: f"node {node.name}" for node in nodes}
        for name, ip in self.tapnet.clients.items():
            key = join_key("x-tapnet.clients", name)
            self._check_underlay_host(ip, underlay, key)
            if ip in owners:
                raise StackError(
                    key, f"{ip} is already used by {owners[ip]}", "Pick a free underlay address."
                )
            owners[ip] = f"client {name}"
        return dict(self.tapnet.clients)

    # Step 2: networks.

    def _create_networks(self, specs: list[NetworkSpec], underlay: IPv4Network) -> None:
        claims = [
            _Claim(INGRESS_SUBNET, f"the ingress network {INGRESS_SUBNET}"),
            _Claim(GWBRIDGE_SUBNET, f"docker_gwbridge {GWBRIDGE_SUBNET} in each node's host namespace"),
            _Claim(underlay, f"the underlay {underlay}"),
        ]
        self._warn_root_overlap(INGRESS_SUBNET, "ingress network")
        for spec in specs:
            if spec.subnet is None:
                continue
            for claim in claims:
                if spec.subnet.overlaps(claim.subnet):
                    problem = f"subnet {spec.subnet} overlaps {claim.label}"
                    raise StackError(
                        spec.subnet_key, problem, "Pick a subnet that overlaps no other network."
                    )
            self._warn_root_overlap(spec.subnet, spec.subnet_key)
            claims.append(_Claim(spec.subnet, f"network {spec.name} ({spec.subnet_key})"))

        self._add_network(
            Network(
                name=INGRESS_NETWORK,
                driver="overlay",
                subnet=INGRESS_SUBNET,
                gateway=INGRESS_SUBNET.network_address + 1,
                vni=INGRESS_VNI,
                ingress=True,
                mtu=OVERLAY_MTU,
            )
        )
        in_use = [claim.subnet for claim in claims] + self.roots_v4
        next_vni = FIRST_USER_VNI
        for spec in specs:
            subnet = spec.subnet
            if subnet is None:
                subnet = self._automatic_subnet(spec, in_use)
                in_use.append(subnet)
            vni = None
            if spec.driver == "overlay":
                vni = next_vni
                next_vni += 1
            self._add_network(
                Network(
                    name=spec.name,
                    driver=spec.driver,
                    subnet=subnet,
                    gateway=spec.gateway or subnet.network_address + 1,
                    vni=vni,
                    internal=spec.internal,
                    attachable=spec.attachable,
                    mtu=MTU_BY_DRIVER[spec.driver],
                )
            )

    def _warn_root_overlap(self, subnet: IPv4Network, key: str) -> None:
        for root in self.roots_v4:
            if subnet.overlaps(root):
                self.warnings.add(
                    f"{key}: subnet {subnet} overlaps {root} of the root namespace."
                    " Tasks are isolated in their namespaces, but the shared addresses may confuse tools"
                )

    def _add_network(self, network: Network) -> None:
        self.networks[network.name] = network
        pool = _AddressPool(network.subnet)
        pool.reserve(network.gateway)
        self.pools[network.name] = pool

    def _automatic_subnet(self, spec: NetworkSpec, in_use: list[ipaddress.IPv4Network]) -> IPv4Network:
        if spec.driver == "overlay":
            candidates: Iterable[IPv4Network] = OVERLAY_POOL.subnets(new_prefix=OVERLAY_PREFIX)
            pool_text = f"{OVERLAY_POOL} (/{OVERLAY_PREFIX} each)"
        else:
            first = int(BRIDGE_POOL_START.network_address) >> (32 - BRIDGE_PREFIX)
            last = int(BRIDGE_POOL_LAST.network_address) >> (32 - BRIDGE_PREFIX)
            candidates = (
                IPv4Network((number << (32 - BRIDGE_PREFIX), BRIDGE_PREFIX))
                for number in range(first, last + 1)
            )
            pool_text = f"{BRIDGE_POOL_START} to {BRIDGE_POOL_LAST}"
        for candidate in candidates:
            if not any(candidate.overlaps(net) for net in in_use):
                return candidate
        raise StackError(
            spec.subnet_key, f"no free automatic subnet left in {pool_text}", "Configure a subnet."
        )

    # Step 3: objects on the subnets.

    def _create_peers(self, underlay: IPv4Network, nodes: list[Node]) -> list[ExternalPeer]:
        node_ips = {node.underlay_ip: node.name for node in nodes}
        peers = []
        for key, raw in self.tapnet.peers:
            for required in ("network", "ip", "vtep"):
                if raw.get(required) is None:
                    raise StackError(
                        join_key(key, required), f"missing {required}", f"Add `{required}:` to the peer."
                    )
            network = self.networks.get(raw["network"]) if isinstance(raw["network"], str) else None
            if network is None or network.driver != "overlay":
                overlays = ", ".join(name for name, net in self.networks.items() if net.driver == "overlay")
                problem = f"{raw['network']!r} is not an overlay network of this stack"
                raise StackError(join_key(key, "network"), problem, f"Use one of: {overlays}.")

            ip_key = join_key(key, "ip")
            ip = parse_ipv4(raw["ip"], ip_key)
            pool = self.pools[network.name]
            if ip not in network.subnet or ip in (
                network.subnet.network_address,
                network.subnet.broadcast_address,
            ):
                problem = f"{ip} is not a host address of network {network.name} ({network.subnet})"
                raise StackError(ip_key, problem, "Pick an address inside the network's subnet.")
            if pool.is_reserved(ip):
                owner = "the gateway" if ip == network.gateway else "another peer"
                raise StackError(ip_key, f"{ip} is already used by {owner}", "Pick a free address.")
            pool.reserve(ip)

            mac = mac_for_ip(ip)
            if raw.get("mac") is not None:
                mac = parse_unicast_mac(raw["mac"], join_key(key, "mac"))

            vtep_key = join_key(key, "vtep")
            vtep = parse_ipv4(raw["vtep"], vtep_key)
            self._check_underlay_host(vtep, underlay, vtep_key)
            if vtep in node_ips:
                problem = f"{vtep} is the VTEP of node {node_ips[vtep]}"
                raise StackError(vtep_key, problem, "Give the peer its own underlay address.")
            peers.append(ExternalPeer(network.name, ip, mac, vtep))
        return peers

    def _check_upstreams(self, underlay: IPv4Network) -> list[IPv4Address]:
        gateways = {network.gateway: name for name, network in self.networks.items()}
        upstreams = []
        for key, ip in self.tapnet.dns_upstreams:
            inside = ip in underlay or any(ip in network.subnet for network in self.networks.values())
            if not inside:
                raise StackError(
                    key,
                    f"DNS upstream {ip} is outside tapnet's namespaces, and tapnet never sends to such addresses",
                    f"Run the upstream server inside the cluster: on the underlay {underlay} (a client) or in a task.",
                )
            if ip in gateways:
                problem = (
                    f"{ip} is the gateway of network {gateways[ip]}, where tapnet's own resolver answers"
                )
                raise StackError(key, problem, "Name a server other than tapnet itself.")
            upstreams.append(ip)
        return upstreams

    # Step 4: published ports and relays.

    def _resolve_ports(self) -> dict[str, list[PortSpec]]:
        """Give ports without a number one from the dynamic range, and reject two uses of one port."""
        owners: dict[tuple[int, str], str] = {}
        for service in self.services.values():
            for port in service.ports:
                if port.published is not None:
                    self._claim_port(owners, port.published, port, service)

        # Each protocol has its own port space, as in swarmkit's port allocator.
        next_port = {protocol: DYNAMIC_PORT_FIRST for protocol in PROTOCOLS}
        resolved: dict[str, list[PortSpec]] = {}
        for service in self.services.values():
            specs = []
            for port in service.ports:
                published = port.published
                if published is None:
                    published = next_port[port.protocol]
                    while (published, port.protocol) in owners:
                        published += 1
                    if published > DYNAMIC_PORT_LAST:
                        problem = (
                            f"no free {port.protocol} port left in {DYNAMIC_PORT_FIRST}-{DYNAMIC_PORT_LAST}"
                        )
                        raise StackError(port.key, problem, "Give the published port explicitly.")
                    next_port[port.protocol] = published + 1
                    self._claim_port(owners, published, port, service)
                specs.append(PortSpec(published, port.target, port.protocol, port.mode))
            resolved[service.name] = specs
        return resolved

    def _claim_port(
        self, owners: dict[tuple[int, str], str], published: int, port: PortRequest, service: ServiceSpec
    ) -> None:
        if (published, port.protocol) == (VXLAN_PORT, "udp"):
            problem = f"{VXLAN_PORT}/udp is the VXLAN port of every node"
            raise StackError(port.key, problem, "Publish on another port.")
        owner = owners.get((published, port.protocol))
        if owner is not None:
            problem = f"published port {published}/{port.protocol} is already published by {owner}"
            raise StackError(port.key, problem, "Choose another published port.")
        owners[(published, port.protocol)] = f"service {service.name} ({port.key})"

    def _resolve_relay_ports(self, ports: dict[str, list[PortSpec]]) -> dict[int, int]:
        """Map every published port to its 127.0.0.1 relay port, by default the same number."""
        published = sorted({spec.published for specs in ports.values() for spec in specs})
        for port, (key, _loopback) in self.tapnet.relay_ports.items():
            if port not in published:
                raise StackError(key, f"no service publishes port {port}", "Map only published ports.")
        relays = {}
        users: dict[int, int] = {}
        for port in published:
            key, loopback = self.tapnet.relay_ports.get(port, ("x-tapnet.relay_ports", port))
            if loopback in users:
                problem = (
                    f"published ports {users[loopback]} and {port} would both relay on 127.0.0.1:{loopback}"
                )
                raise StackError(key, problem, "Map them to different loopback ports.")
            users[loopback] = port
            relays[port] = loopback
        return relays

    # Step 5: placement.

    def _place_tasks(self) -> None:
        """Assign each task a node: pinned nodes only, least-loaded first, bridges on one node.

        The services that share bridge networks, directly or through a service
        on two bridges, form a group that must live on one node. The group's
        node is the node of its first placed task, chosen among the nodes every
        service of the group may use.
        """
        group_of, group_allowed = self._bridge_groups()
        group_node: dict[str, str] = {}
        load = {name: 0 for name in self.node_names}

        for service in self.services.values():
            self._check_capacity(service)
            group = group_of.get(service.name)
            if group is None:
                allowed = service.pinned_nodes or self.node_names
            elif group in group_node:
                allowed = [group_node[group]]
            else:
                allowed = group_allowed[group]

            if service.replicas is None:
                # Global mode: one task per allowed node, or one task in all
                # when a bridge network ties the service to a single node.
                targets = allowed if group is None else [self._least_loaded(allowed, load)]
                for node in targets:
                    self._place(service, node, load)
                if group is not None:
                    group_node.setdefault(group, targets[0])
                service.replicas = len(targets)
                continue

            for slot in range(1, service.replicas + 1):
                candidates = allowed
                if any(port.mode == "host" for port in service.ports):
                    candidates = [name for name in allowed if name not in service.task_nodes]
                    if not candidates:
                        raise StackError(
                            f"{service.key}.deploy.replicas",
                            f"task {service.name}.{slot} publishes a host-mode port, and every node it may use"
                            f" ({', '.join(allowed)}) already runs a task of {service.name} with that port",
                            "Lower the replicas, add nodes, or publish in ingress mode.",
                        )
                node = self._least_loaded(candidates, load)
                self._place(service, node, load)
                if group is not None and group not in group_node:
                    group_node[group] = node
                    allowed = [node]

        for name, network in self.networks.items():
            if network.driver == "bridge":
                group = group_of[f"network:{name}"]
                network.node = group_node.get(group) or group_allowed[group][0]

    def _check_capacity(self, service: ServiceSpec) -> None:
        """Reject a replica count no subnet of the service can hold, before placing any task."""
        tasks = service.replicas if service.replicas is not None else len(self.node_names)
        networks = list(service.networks)
        if any(port.mode == "ingress" for port in service.ports):
            networks.append(INGRESS_NETWORK)
        for name in networks:
            subnet = self.networks[name].subnet
            if tasks > subnet.num_addresses:
                problem = f"{tasks} tasks cannot fit in network {name} ({subnet})"
                raise StackError(
                    f"{service.key}.deploy.replicas", problem, "Use a larger subnet or fewer tasks."
                )

    def _least_loaded(self, candidates: list[str], load: dict[str, int]) -> str:
        """Return the candidate running the fewest tasks so far. Ties go to the earlier node."""
        return min(candidates, key=lambda name: (load[name], self.node_names.index(name)))

    @staticmethod
    def _place(service: ServiceSpec, node: str, load: dict[str, int]) -> None:
        service.task_nodes.append(node)
        load[node] += 1

    def _bridge_groups(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Group services and bridge networks that must share a node, and find each group's allowed nodes."""
        parent: dict[str, str] = {}

        def find(item: str) -> str:
            parent.setdefault(item, item)
            while parent[item] != item:
                parent[item] = parent[parent[item]]
                item = parent[item]
            return item

        for name, network in self.networks.items():
            if network.driver == "bridge":
                find(f"network:{name}")
        for service in self.services.values():
            for name in service.networks:
                if self.networks[name].driver == "bridge":
                    parent[find(service.name)] = find(f"network:{name}")

        group_of = {item: find(item) for item in list(parent)}
        group_allowed: dict[str, list[str]] = {}
        group_pins: dict[str, list[str]] = {}
        for service in self.services.values():
            group = group_of.get(service.name)
            if group is None:
                continue
            allowed = group_allowed.get(group, self.node_names)
            if service.pinned_nodes is not None:
                group_pins.setdefault(group, []).append(
                    f"{service.name} to {', '.join(service.pinned_nodes)}"
                )
                allowed = [name for name in allowed if name in service.pinned_nodes]
                if not allowed:
                    bridges = sorted(
                        item[len("network:") :]
                        for item, root in group_of.items()
                        if root == group and item.startswith("network:")
                    )
                    raise StackError(
                        f"{service.key}.networks",
                        f"bridge networks are local to one node, but the services on {', '.join(bridges)}"
                        f" are pinned to different nodes ({'; '.join(group_pins[group])})",
                        "Pin all services of these bridge networks to one node, or use overlay networks.",
                    )
            group_allowed[group] = allowed
        for group in group_of.values():
            group_allowed.setdefault(group, self.node_names)
        return group_of, group_allowed

    # Step 6 and 7: addresses, services and sandboxes.

    def _take(self, network: str, key: str, consumer: str) -> IPv4Address:
        ip = self.pools[network].take()
        if ip is None:
            subnet = self.networks[network].subnet
            raise StackError(
                key,
                f"network {network} ({subnet}) has no free address left for {consumer}",
                "Use a larger subnet or fewer tasks.",
            )
        return ip

    def _create_services(self, ports: dict[str, list[PortSpec]]) -> dict[str, Service]:
        services = {}
        for spec in self.services.values():
            service = Service(
                name=spec.name,
                replicas=spec.replicas or 0,
                endpoint_mode=spec.endpoint_mode,
                networks=list(spec.networks),
                aliases=dict(spec.aliases),
                ports=ports[spec.name],
                command=spec.command,
                placement=spec.pinned_nodes,
            )
            if service.endpoint_mode == "vip":
                for network in self._endpoint_networks(service):
                    key = (
                        self.network_specs[network].subnet_key
                        if network in self.network_specs
                        else f"{spec.key}.ports"
                    )
                    service.vips[network] = self._take(network, key, f"the VIP of service {service.name}")
            services[service.name] = service
        return services

    def _endpoint_networks(self, service: Service) -> list[str]:
        """Networks of a task in Docker's endpoint order: ingress first when publishing there."""
        ingress = [INGRESS_NETWORK] if service.publishes_ingress else []
        return ingress + service.networks

    def _create_sandboxes(self, services: dict[str, Service]) -> dict[str, Sandbox]:
        sandboxes = {}
        for spec in self.services.values():
            service = services[spec.name]
            for slot, node in enumerate(spec.task_nodes, start=1):
                name = f"{service.name}.{slot}"
                endpoints = []
                for index, network_name in enumerate(self._endpoint_networks(service)):
                    network = self.networks[network_name]
                    ip = self._take(network_name, f"{spec.key}.deploy.replicas", f"task {name}")
                    aliases = service.aliases.get(network_name, ())
                    endpoints.append(
                        Endpoint(network_name, f"eth{index}", ip, mac_for_ip(ip), network.mtu, aliases)
                    )
                sandboxes[name] = Sandbox(
                    name=name,
                    service=service.name,
                    slot=slot,
                    node=node,
                    endpoints=endpoints,
                    command=list(service.command) if service.command else None,
                    default_gateway=self._default_gateway(endpoints),
                )
        return sandboxes

    def _default_gateway(self, endpoints: list[Endpoint]) -> IPv4Address | None:
        for endpoint in endpoints:
            network = self.networks[endpoint.network]
            if not network.ingress and not network.internal:
                return network.gateway
        return None
