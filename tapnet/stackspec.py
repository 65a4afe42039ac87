"""Reading stack files: check a parsed compose document key by key and turn it into specs.

This is the first of the two phases of `tapnet.stack`. It checks the shape
and the values of every key tapnet uses, and every error it raises names the
dotted key at fault (`services.web.ports[0]`) and the fix. Keys tapnet does
not use warn once each. Decisions that need the whole stack (addresses,
placement, overlaps) are left to the compile phase in `tapnet.stack`.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from tapnet.model import (
    DEFAULT_NODES,
    INGRESS_NETWORK,
    IPv4Address,
    IPv4Network,
    parse_mac,
)

log = logging.getLogger(__name__)

# Compose and swarm defaults, with their source.
DEFAULT_DRIVER = "overlay"  # `docker stack deploy` creates overlay networks by default
DEFAULT_NETWORK = "default"  # the network a service without `networks` joins, as in compose
DEFAULT_REPLICAS = 1
DEFAULT_ENDPOINT_MODE = "vip"
DRIVERS = ("overlay", "bridge")
ENDPOINT_MODES = ("vip", "dnsrr")
DEPLOY_MODES = ("replicated", "global")
PROTOCOLS = ("tcp", "udp")
PUBLISH_MODES = ("ingress", "host")
MAX_SUBNET_PREFIX_LENGTH = 30  # a /30 has room for the gateway and one more host address

# Keys tapnet reads, per level. Any other key warns once and is ignored.
# Keys starting with "x-" are compose extension fields and are skipped silently.
TOP_LEVEL_KEYS = ("services", "networks", "x-tapnet")
SERVICE_KEYS = ("command", "deploy", "networks", "ports")
DEPLOY_KEYS = ("endpoint_mode", "mode", "placement", "replicas")
DEPLOY_PLACEMENT_KEYS = ("constraints",)
SERVICE_NETWORK_KEYS = ("aliases",)
PORT_KEYS = ("mode", "protocol", "published", "target")
NETWORK_KEYS = ("attachable", "driver", "enable_ipv6", "external", "internal", "ipam")
IPAM_KEYS = ("config", "driver")
IPAM_CONFIG_KEYS = ("gateway", "subnet")
TAPNET_KEYS = ("clients", "dns_upstreams", "nodes", "peers", "placement", "relay_ports", "underlay")
TAPNET_NODE_KEYS = ("name", "underlay_ip")
TAPNET_PEER_KEYS = ("ip", "mac", "network", "vtep")

# RFC 1123 host name label: letters, digits and hyphens, 1 to 63 characters,
# not starting or ending with a hyphen.
DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Short port syntax: "80", "3000:80", "3000:80/udp".
SHORT_PORT = re.compile(r"(?:(?P<published>[0-9]+):)?(?P<target>[0-9]+)(?:/(?P<protocol>[A-Za-z]+))?")
# Placement constraints tapnet maps onto its nodes: node.hostname == NAME and !=.
HOSTNAME_CONSTRAINT = re.compile(r"\s*node\.hostname\s*(?P<op>==|!=)\s*(?P<node>\S+)\s*")
MAC_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


class StackError(ValueError):
    """An invalid stack file: the dotted key at fault, the problem and the fix.

    `StackError(key, problem, fix)` is the form this package raises.
    `StackError(message)` carries a complete message with no key, for callers
    that reject a stack before reading it (a missing file, for example).
    """

    def __init__(self, key: str, problem: str | None = None, fix: str = "") -> None:
        if problem is None:
            key, problem = "", key
        super().__init__(key, problem, fix)
        self.key = key
        self.problem = problem
        self.fix = fix
        self.source: str | None = None  # the file name, set by load_stack_file

    def __str__(self) -> str:
        parts = [part for part in (self.source, self.key) if part]
        prefix = "".join(f"{part}: " for part in parts)
        fix = f". {self.fix}" if self.fix else ""
        return f"{prefix}{self.problem}{fix}"


@dataclass
class StackSpec:
    """A whole stack document after reading."""

    tapnet: TapnetSpec
    networks: dict[str, NetworkSpec]
    services: dict[str, ServiceSpec]


def read_stack(document: Any, warnings: WarningLog) -> StackSpec:
    """Check a parsed stack document and return its specs. Unknown keys go to `warnings`."""
    if document is None:
        raise StackError("top level", "the stack file is empty", "Add a `services` section.")
    top = expect_mapping(document, "top level")
    warnings.unknown_keys(top, "", TOP_LEVEL_KEYS)

    tapnet = read_tapnet(top.get("x-tapnet"), warnings)
    node_names = [name for name, _ip in tapnet.nodes]
    networks = read_networks(top.get("networks"), warnings)
    services = read_services(top.get("services"), node_names, warnings)
    check_references(tapnet, networks, services)
    return StackSpec(tapnet, networks, services)


class WarningLog:
    """Warnings for the Cluster, each also logged once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        log.warning("%s", message)
        self.messages.append(message)

    def unknown_keys(self, mapping: dict[Any, Any], key: str, known: tuple[str, ...]) -> None:
        for name in mapping:
            if name in known or (isinstance(name, str) and name.startswith("x-")):
                continue
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.add(f"{join_key(key, name)}: not used by tapnet, ignored{hint}")


def _value(mapping: dict[Any, Any], name: str, default: Any) -> Any:
    """Return mapping[name], or `default` when the key is missing or empty, as compose reads `name:`."""
    value = mapping.get(name)
    return default if value is None else value


def join_key(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


def expect_mapping(value: Any, key: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StackError(
            key, f"expected a mapping, got {_type_name(value)}", "Write it as `name: value` lines."
        )
    return value


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise StackError(key, f"expected a list, got {_type_name(value)}", "Write it as `- item` lines.")
    return value


def _bool(value: Any, key: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise StackError(key, f"expected true or false, got {value!r}", "Set it to true or false.")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise StackError(key, f"expected a non-empty string, got {value!r}", "Quote the value as a string.")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        allowed = " or ".join(choices)
        raise StackError(key, f"invalid value {value!r}, expected {allowed}", f"Set it to {allowed}.")
    return value


def _port_number(value: Any, key: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise StackError(
            key, f"invalid port {value!r}, expected a number from 1 to 65535", "Use a port from 1 to 65535."
        )
    return value


def _label(value: Any, key: str, kind: str) -> str:
    if not isinstance(value, str) or not DNS_LABEL.fullmatch(value):
        raise StackError(
            key,
            f"invalid {kind} name {value!r}: it must be a DNS label",
            "Use 1 to 63 letters, digits and hyphens, starting and ending with a letter or digit"
            " (for example `back-tier` instead of `back_tier`).",
        )
    return value


def _dns_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not all(DNS_LABEL.fullmatch(part) for part in value.split(".")):
        raise StackError(
            key,
            f"invalid alias {value!r}: it must be a DNS name",
            "Use DNS labels of letters, digits and hyphens, separated by dots.",
        )
    return value


def parse_ipv4(value: Any, key: str) -> IPv4Address:
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        raise StackError(
            key, f"invalid IP address {value!r}", "Write an IPv4 address such as 198.51.100.10."
        ) from None
    if address.version != 4:
        raise StackError(key, f"IPv6 address {value} is not supported", "Use an IPv4 address.")
    return address


def parse_unicast_mac(value: Any, key: str) -> bytes:
    text = str(value)
    if not MAC_ADDRESS.fullmatch(text):
        raise StackError(
            key,
            f"invalid MAC address {text!r}",
            "Write six hex bytes separated by colons, like 02:42:0a:00:00:09.",
        )
    mac = parse_mac(text)
    if mac[0] & 1:
        raise StackError(
            key, f"{text} is a multicast MAC address", "Use a unicast address (even first byte), like 02:..."
        )
    return mac


def _subnet(value: Any, key: str) -> IPv4Network:
    try:
        subnet = ipaddress.ip_network(str(value))
    except ValueError as error:
        try:
            loose = ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            problem = f"invalid subnet {value!r}: {error}"
            raise StackError(key, problem, "Write a subnet in CIDR form such as 10.0.9.0/24.") from None
        problem = f"invalid subnet {value!r}: host bits are set"
        raise StackError(key, problem, f"Use the network address, {loose}.") from None
    if subnet.version != 4:
        raise StackError(
            key,
            f"IPv6 subnet {subnet} is not supported",
            "tapnet networks are IPv4 only; use an IPv4 subnet.",
        )
    if subnet.prefixlen > MAX_SUBNET_PREFIX_LENGTH:
        problem = f"subnet {subnet} is too small"
        raise StackError(key, problem, f"Use a /{MAX_SUBNET_PREFIX_LENGTH} or larger, such as /24.")
    return subnet


@dataclass
class TapnetSpec:
    """The `x-tapnet` section, read but not yet checked against the rest."""

    nodes: list[tuple[str, IPv4Address | None]]
    placement: dict[str, list[str]]
    underlay: IPv4Network | None
    peers: list[tuple[str, dict[str, Any]]]  # (key, raw peer mapping)
    clients: dict[str, IPv4Address]
    dns_upstreams: list[tuple[str, IPv4Address]]
    relay_ports: dict[int, tuple[str, int]]  # published port -> (key, loopback port)


@dataclass
class NetworkSpec:
    """One entry of the top-level `networks`, or the on-demand `default` network."""

    name: str
    key: str
    driver: str
    subnet: IPv4Network | None
    subnet_key: str
    gateway: IPv4Address | None
    internal: bool = False
    attachable: bool = False


@dataclass
class PortRequest:
    """One entry of a service's `ports`, before automatic published ports are chosen."""

    key: str
    published: int | None  # None: take one from the dynamic range
    target: int
    protocol: str
    mode: str


@dataclass
class ServiceSpec:
    """One entry of `services`. Placement fills in `task_nodes` during compilation."""

    name: str
    key: str
    replicas: int | None  # None in global mode: one task per allowed node
    endpoint_mode: str
    networks: list[str]
    network_keys: list[str]  # the key of each entry of `networks`, for messages
    aliases: dict[str, tuple[str, ...]]
    ports: list[PortRequest]
    command: list[str] | None
    constraint_nodes: list[str] | None  # from deploy.placement.constraints
    pinned_nodes: list[str] | None = None  # constraints and x-tapnet placement combined
    task_nodes: list[str] = field(default_factory=list)  # the node of each task, in slot order


def read_tapnet(value: Any, warnings: WarningLog) -> TapnetSpec:
    section = expect_mapping(value, "x-tapnet")
    warnings.unknown_keys(section, "x-tapnet", TAPNET_KEYS)

    nodes = _read_nodes(section.get("nodes"), warnings)
    node_names = [name for name, _ip in nodes]

    placement = {}
    placement_key = "x-tapnet.placement"
    for service, targets in expect_mapping(section.get("placement"), placement_key).items():
        key = join_key(placement_key, service)
        names = [targets] if isinstance(targets, str) else _list(targets, key)
        if not names:
            raise StackError(key, "empty node list", "Name at least one node, or remove the entry.")
        for index, name in enumerate(names):
            _check_node_name(name, f"{key}[{index}]" if not isinstance(targets, str) else key, node_names)
        placement[str(service)] = list(dict.fromkeys(names))

    underlay = None
    if section.get("underlay") is not None:
        underlay = _subnet(section["underlay"], "x-tapnet.underlay")

    peers = []
    for index, peer in enumerate(_list(section.get("peers"), "x-tapnet.peers")):
        key = f"x-tapnet.peers[{index}]"
        peer = expect_mapping(peer, key)
        warnings.unknown_keys(peer, key, TAPNET_PEER_KEYS)
        peers.append((key, peer))

    clients = {}
    for name, ip in expect_mapping(section.get("clients"), "x-tapnet.clients").items():
        key = join_key("x-tapnet.clients", name)
        clients[_label(name, key, "client")] = parse_ipv4(ip, key)

    upstreams = []
    for index, ip in enumerate(_list(section.get("dns_upstreams"), "x-tapnet.dns_upstreams")):
        key = f"x-tapnet.dns_upstreams[{index}]"
        upstreams.append((key, parse_ipv4(ip, key)))

    relay_ports = {}
    for published, loopback in expect_mapping(section.get("relay_ports"), "x-tapnet.relay_ports").items():
        key = join_key("x-tapnet.relay_ports", published)
        relay_ports[_port_number(published, key)] = (key, _port_number(loopback, key))

    return TapnetSpec(nodes, placement, underlay, peers, clients, upstreams, relay_ports)


def _read_nodes(value: Any, warnings: WarningLog) -> list[tuple[str, IPv4Address | None]]:
    key = "x-tapnet.nodes"
    if value is None:
        return [(name, None) for name in DEFAULT_NODES]

    entries: list[tuple[str, Any, Any]] = []  # (key, name, settings mapping or None)
    if isinstance(value, dict):
        entries = [(join_key(key, name), name, settings) for name, settings in value.items()]
    else:
        for index, item in enumerate(_list(value, key)):
            item_key = f"{key}[{index}]"
            if isinstance(item, dict):
                entries.append((item_key, item.get("name"), item))
            else:
                entries.append((item_key, item, None))
    if not entries:
        raise StackError(
            key, "no nodes listed", "List at least one node name, or remove the key to get node1."
        )

    nodes = []
    for item_key, name, settings in entries:
        _label(name, item_key, "node")
        settings = expect_mapping(settings, item_key)
        known = TAPNET_NODE_KEYS if isinstance(value, list) else ("underlay_ip",)
        warnings.unknown_keys(settings, item_key, known)
        ip = settings.get("underlay_ip")
        nodes.append((name, None if ip is None else parse_ipv4(ip, join_key(item_key, "underlay_ip"))))

    names = [name for name, _ip in nodes]
    for name in names:
        if names.count(name) > 1:
            raise StackError(key, f"node {name!r} is listed twice", "Give every node a different name.")
    return nodes


def _check_node_name(name: Any, key: str, node_names: list[str]) -> None:
    if name not in node_names:
        known = ", ".join(node_names)
        raise StackError(key, f"unknown node {name!r}", f"Use one of the nodes in x-tapnet.nodes: {known}.")


def read_networks(value: Any, warnings: WarningLog) -> dict[str, NetworkSpec]:
    specs = {}
    for name, settings in expect_mapping(value, "networks").items():
        key = join_key("networks", name)
        _label(name, key, "network")
        if name == INGRESS_NETWORK:
            raise StackError(key, "the ingress network is created by tapnet", "Rename the network.")
        specs[name] = _read_network(name, key, expect_mapping(settings, key), warnings)
    _check_unique_ignoring_case(list(specs), "networks", "network")
    return specs


def _read_network(name: str, key: str, settings: dict[Any, Any], warnings: WarningLog) -> NetworkSpec:
    warnings.unknown_keys(settings, key, NETWORK_KEYS)
    if settings.get("external"):
        raise StackError(
            join_key(key, "external"),
            "external networks are not supported: tapnet creates every network itself",
            "Remove `external` and describe the network in this file.",
        )
    if settings.get("enable_ipv6"):
        raise StackError(
            join_key(key, "enable_ipv6"), "IPv6 networks are not supported", "Remove `enable_ipv6`."
        )
    driver = _value(settings, "driver", DEFAULT_DRIVER)
    driver = _choice(driver, join_key(key, "driver"), DRIVERS)

    ipam_key = join_key(key, "ipam")
    ipam = expect_mapping(settings.get("ipam"), ipam_key)
    warnings.unknown_keys(ipam, ipam_key, IPAM_KEYS)
    if _value(ipam, "driver", "default") != "default":
        warnings.add(
            f"{ipam_key}.driver: IPAM driver {ipam['driver']!r} ignored, tapnet allocates addresses itself"
        )
    configs = _list(ipam.get("config"), join_key(ipam_key, "config"))
    subnet_key = f"{ipam_key}.config[0].subnet"
    subnet = gateway = None
    for index, config in enumerate(configs):
        config_key = f"{ipam_key}.config[{index}]"
        config = expect_mapping(config, config_key)
        warnings.unknown_keys(config, config_key, IPAM_CONFIG_KEYS)
        if index > 0:
            raise StackError(
                config_key, "only one subnet per network is supported", "Remove the extra config entries."
            )
        if config.get("subnet") is None:
            if config.get("gateway") is not None:
                raise StackError(
                    config_key, "gateway given without subnet", "Add the subnet the gateway belongs to."
                )
            continue
        subnet = _subnet(config["subnet"], subnet_key)
        if config.get("gateway") is not None:
            gateway = _gateway(config["gateway"], join_key(config_key, "gateway"), subnet)

    internal = _bool(settings.get("internal"), join_key(key, "internal"))
    attachable = _bool(settings.get("attachable"), join_key(key, "attachable"))
    return NetworkSpec(name, key, driver, subnet, subnet_key, gateway, internal, attachable)


def _gateway(value: Any, key: str, subnet: IPv4Network) -> IPv4Address:
    gateway = parse_ipv4(value, key)
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise StackError(
            key, f"gateway {gateway} is not a host address of {subnet}", "Pick an address inside the subnet."
        )
    return gateway


def _check_unique_ignoring_case(names: list[str], key: str, kind: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            problem = f"{kind} names {other!r} and {name!r} differ only in case, and DNS names ignore case"
            raise StackError(join_key(key, name), problem, f"Rename one of the {kind}s.")


def read_services(value: Any, node_names: list[str], warnings: WarningLog) -> dict[str, ServiceSpec]:
    specs = {}
    for name, settings in expect_mapping(value, "services").items():
        key = join_key("services", name)
        _label(name, key, "service")
        specs[name] = _read_service(name, key, expect_mapping(settings, key), node_names, warnings)
    _check_unique_ignoring_case(list(specs), "services", "service")
    return specs


def _read_service(
    name: str, key: str, settings: dict[Any, Any], node_names: list[str], warnings: WarningLog
) -> ServiceSpec:
    warnings.unknown_keys(settings, key, SERVICE_KEYS)

    deploy_key = join_key(key, "deploy")
    deploy = expect_mapping(settings.get("deploy"), deploy_key)
    warnings.unknown_keys(deploy, deploy_key, DEPLOY_KEYS)
    replicas = _read_replicas(deploy, deploy_key)
    mode_key = join_key(deploy_key, "endpoint_mode")
    endpoint_mode = _choice(_value(deploy, "endpoint_mode", DEFAULT_ENDPOINT_MODE), mode_key, ENDPOINT_MODES)
    constraint_nodes = _read_constraints(
        deploy.get("placement"), join_key(deploy_key, "placement"), node_names, warnings
    )

    networks, network_keys, aliases = _read_service_networks(
        settings.get("networks"), join_key(key, "networks"), warnings
    )
    ports = _read_ports(settings.get("ports"), join_key(key, "ports"), warnings)
    if endpoint_mode == "dnsrr":
        for port in ports:
            if port.mode == "ingress":
                raise StackError(
                    mode_key,
                    f"endpoint_mode dnsrr cannot publish in ingress mode ({port.key}): the routing mesh needs a VIP",
                    "Publish the port with `mode: host`, or use endpoint_mode vip.",
                )
    command = _read_command(settings.get("command"), join_key(key, "command"))
    return ServiceSpec(
        name, key, replicas, endpoint_mode, networks, network_keys, aliases, ports, command, constraint_nodes
    )


def _read_replicas(deploy: dict[Any, Any], deploy_key: str) -> int | None:
    mode = _choice(_value(deploy, "mode", "replicated"), join_key(deploy_key, "mode"), DEPLOY_MODES)
    key = join_key(deploy_key, "replicas")
    replicas = deploy.get("replicas")
    if mode == "global":
        if replicas is not None:
            raise StackError(
                key, "replicas cannot be set in global mode", "Remove `replicas` or use mode replicated."
            )
        return None
    if replicas is None:
        return DEFAULT_REPLICAS
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise StackError(
            key, f"invalid replicas {replicas!r}, expected a non-negative integer", "Set it to 0, 1, 2, ..."
        )
    return replicas


def _read_constraints(value: Any, key: str, node_names: list[str], warnings: WarningLog) -> list[str] | None:
    placement = expect_mapping(value, key)
    warnings.unknown_keys(placement, key, DEPLOY_PLACEMENT_KEYS)
    constraints_key = join_key(key, "constraints")
    allowed = list(node_names)
    constrained = False
    for index, constraint in enumerate(_list(placement.get("constraints"), constraints_key)):
        item_key = f"{constraints_key}[{index}]"
        match = HOSTNAME_CONSTRAINT.fullmatch(constraint) if isinstance(constraint, str) else None
        if match is None:
            warnings.add(
                f"{item_key}: constraint {constraint!r} ignored, tapnet maps only node.hostname == and !="
            )
            continue
        node = match["node"]
        _check_node_name(node, item_key, node_names)
        constrained = True
        if match["op"] == "==":
            allowed = [name for name in allowed if name == node]
        else:
            allowed = [name for name in allowed if name != node]
    if not constrained:
        return None
    if not allowed:
        raise StackError(
            constraints_key, "no node satisfies every constraint", "Relax the node.hostname constraints."
        )
    return allowed


def _read_service_networks(
    value: Any, key: str, warnings: WarningLog
) -> tuple[list[str], list[str], dict[str, tuple[str, ...]]]:
    networks: list[str] = []
    keys: list[str] = []
    aliases: dict[str, tuple[str, ...]] = {}
    if isinstance(value, dict):
        entries = list(value.items())
    else:
        entries = [(name, None) for name in _list(value, key)]

    for index, (name, settings) in enumerate(entries):
        item_key = join_key(key, name) if isinstance(value, dict) else f"{key}[{index}]"
        name = _string(name, item_key)
        if name == INGRESS_NETWORK:
            raise StackError(
                item_key,
                "services cannot join the ingress network directly",
                "Publish a port in ingress mode instead; tapnet then adds the ingress endpoint.",
            )
        if name in networks:
            raise StackError(item_key, f"network {name!r} is listed twice", "List each network once.")
        networks.append(name)
        keys.append(item_key)
        settings = expect_mapping(settings, item_key)
        warnings.unknown_keys(settings, item_key, SERVICE_NETWORK_KEYS)
        alias_key = join_key(item_key, "aliases")
        names = [
            _dns_name(alias, f"{alias_key}[{i}]")
            for i, alias in enumerate(_list(settings.get("aliases"), alias_key))
        ]
        if names:
            aliases[name] = tuple(dict.fromkeys(names))

    if not networks:
        networks.append(DEFAULT_NETWORK)
        keys.append(key)
    return networks, keys, aliases


def _read_ports(value: Any, key: str, warnings: WarningLog) -> list[PortRequest]:
    ports = []
    for index, entry in enumerate(_list(value, key)):
        item_key = f"{key}[{index}]"
        if isinstance(entry, dict):
            ports.append(_read_long_port(entry, item_key, warnings))
        else:
            ports.append(_read_short_port(entry, item_key))
    return ports


def _read_short_port(entry: Any, key: str) -> PortRequest:
    if isinstance(entry, int) and not isinstance(entry, bool):
        return PortRequest(key, None, _port_number(entry, key), "tcp", "ingress")
    text = str(entry)
    match = SHORT_PORT.fullmatch(text)
    if match is None:
        if "-" in text:
            fix = "List each port on its own line; port ranges are not supported."
        elif text.count(":") >= 2:
            fix = "Remove the host IP: tapnet publishes on every node's underlay address."
        else:
            fix = 'Write it as "TARGET", "PUBLISHED:TARGET" or "PUBLISHED:TARGET/udp".'
        raise StackError(key, f"invalid port {text!r}", fix)
    protocol = _choice(match["protocol"].lower() if match["protocol"] else "tcp", key, PROTOCOLS)
    published = None if match["published"] is None else _port_number(int(match["published"]), key)
    return PortRequest(key, published, _port_number(int(match["target"]), key), protocol, "ingress")


def _read_long_port(entry: dict[Any, Any], key: str, warnings: WarningLog) -> PortRequest:
    warnings.unknown_keys(entry, key, PORT_KEYS)
    if entry.get("target") is None:
        raise StackError(
            join_key(key, "target"), "missing target port", "Add `target:` with the port the task listens on."
        )
    target = _port_number(entry["target"], join_key(key, "target"))
    published = entry.get("published")
    if published is not None:
        published = _port_number(published, join_key(key, "published"))
    protocol = _choice(_value(entry, "protocol", "tcp"), join_key(key, "protocol"), PROTOCOLS)
    mode = _choice(_value(entry, "mode", "ingress"), join_key(key, "mode"), PUBLISH_MODES)
    return PortRequest(key, published, target, protocol, mode)


def _read_command(value: Any, key: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise StackError(key, "empty command", "Write the command to run, or remove the key.")
        return ["/bin/sh", "-c", value]
    if not isinstance(value, list):
        problem = f"expected a string or a list, got {_type_name(value)}"
        raise StackError(key, problem, "Write a shell command line, or a list of words.")
    words = value
    if not words:
        raise StackError(key, "empty command", "Write the command to run, or remove the key.")
    for index, word in enumerate(words):
        if isinstance(word, (dict, list)) or word is None:
            raise StackError(
                f"{key}[{index}]", f"expected a string, got {_type_name(word)}", "Quote each word."
            )
    return [str(word) for word in words]


def check_references(
    tapnet: TapnetSpec, networks: dict[str, NetworkSpec], services: dict[str, ServiceSpec]
) -> None:
    """Check that names used in one section exist in the other."""
    for service in services.values():
        for name, key in zip(service.networks, service.network_keys):
            if name != DEFAULT_NETWORK and name not in networks:
                known = ", ".join(networks) or "none"
                raise StackError(
                    key,
                    f"unknown network {name!r} (declared networks: {known})",
                    f"Declare {name!r} under the top-level `networks`, or fix the name.",
                )

    for name, nodes in tapnet.placement.items():
        key = join_key("x-tapnet.placement", name)
        service = services.get(name)
        if service is None:
            raise StackError(key, f"no service named {name!r}", "Use a service name from `services`.")
        if service.constraint_nodes is not None:
            nodes = [node for node in nodes if node in service.constraint_nodes]
            if not nodes:
                problem = "no node is allowed by both this entry and deploy.placement.constraints"
                raise StackError(key, problem, "Make the two agree.")
        service.pinned_nodes = nodes
    for service in services.values():
        if service.pinned_nodes is None:
            service.pinned_nodes = service.constraint_nodes

    for name in tapnet.clients:
        if name in services or name in (node for node, _ip in tapnet.nodes):
            key = join_key("x-tapnet.clients", name)
            raise StackError(
                key, f"client name {name!r} is also a service or node name", "Rename the client."
            )
