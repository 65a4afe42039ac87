"""Cluster model: the plain data a stack file compiles into.

Every other part of tapnet reads these objects and none of them writes back,
except `tapnet scale` style changes, which build a new `Cluster` and hand it to
the datapaths. Addresses are `ipaddress` objects, MACs are 6-byte `bytes`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

# Docker and swarm defaults, with their source.
INGRESS_NETWORK = "ingress"
INGRESS_SUBNET = IPv4Network("10.255.0.0/16")  # swarm's classic ingress subnet
INGRESS_VNI = 4096  # libnetwork overlay: first VNI of the allocator
FIRST_USER_VNI = 4097
OVERLAY_POOL = IPv4Network("10.0.0.0/8")  # automatic overlay subnets, /24 each
OVERLAY_PREFIX = 24
BRIDGE_POOL_START = IPv4Network("172.17.0.0/16")  # docker0, then 172.18, ...
BRIDGE_PREFIX = 16
GWBRIDGE_SUBNET = IPv4Network("172.18.0.0/16")  # docker_gwbridge in each host namespace
INGRESS_SBOX_GWBRIDGE_IP = IPv4Address("172.18.0.2")
BRIDGE_MTU = 1500
OVERLAY_MTU = 1450  # 1500 minus 50 bytes of outer Ethernet, IPv4, UDP and VXLAN headers
VXLAN_PORT = 4789  # IANA port for VXLAN (RFC 7348)
DEFAULT_UNDERLAY = IPv4Network("198.51.100.0/24")  # TEST-NET-2, never routed
# Tried in order when the default underlay overlaps an address of the root namespace.
UNDERLAY_CANDIDATES = (
    IPv4Network("198.51.100.0/24"),
    IPv4Network("203.0.113.0/24"),
    IPv4Network("198.18.0.0/24"),
    IPv4Network("198.19.0.0/24"),
)
DEFAULT_NODES = ("node1",)


def mac_for_ip(ip: IPv4Address) -> bytes:
    """Return Docker's endpoint MAC: 02:42 followed by the four IPv4 bytes."""
    return b"\x02\x42" + ip.packed


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"invalid MAC address {text!r}: expected six hex bytes like 02:42:0a:00:00:05")
    return bytes(int(p, 16) for p in parts)


@dataclass(frozen=True)
class Node:
    name: str
    underlay_ip: IPv4Address


@dataclass(frozen=True)
class PortSpec:
    """One entry of a service's `ports`: published port on the nodes, target port in the task."""

    published: int
    target: int
    protocol: str = "tcp"  # "tcp" or "udp"
    mode: str = "ingress"  # "ingress" (routing mesh) or "host"


@dataclass
class Network:
    name: str
    driver: str  # "bridge" or "overlay"
    subnet: IPv4Network
    gateway: IPv4Address
    vni: int | None  # overlays only
    internal: bool = False
    attachable: bool = False
    ingress: bool = False
    mtu: int = BRIDGE_MTU
    node: str | None = None  # the one node a bridge network lives on; None for overlays

    @property
    def gateway_mac(self) -> bytes:
        return mac_for_ip(self.gateway)


@dataclass
class Endpoint:
    """One interface of a sandbox on one network."""

    network: str
    ifname: str  # eth0, eth1, ... in Docker's order
    ip: IPv4Address
    mac: bytes
    mtu: int
    aliases: tuple[str, ...] = ()


@dataclass
class Sandbox:
    """A container's network namespace; tasks are named `<service>.<slot>`."""

    name: str
    service: str
    slot: int
    node: str
    endpoints: list[Endpoint]
    command: list[str] | None = None
    default_gateway: IPv4Address | None = None  # None when every network is internal or ingress

    def endpoint_on(self, network: str) -> Endpoint | None:
        for endpoint in self.endpoints:
            if endpoint.network == network:
                return endpoint
        return None


@dataclass
class Service:
    name: str
    replicas: int
    endpoint_mode: str  # "vip" or "dnsrr"
    networks: list[str]  # in the order the stack lists them (ingress not included)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # network -> aliases
    ports: list[PortSpec] = field(default_factory=list)
    command: list[str] | None = None
    vips: dict[str, IPv4Address] = field(default_factory=dict)  # network -> VIP, ingress included
    placement: list[str] | None = None  # node names the tasks may run on

    @property
    def publishes_ingress(self) -> bool:
        return any(p.mode == "ingress" for p in self.ports)


@dataclass(frozen=True)
class ExternalPeer:
    """A VXLAN peer outside tapnet (for example a kernel VXLAN device in a test namespace)."""

    network: str
    ip: IPv4Address
    mac: bytes
    vtep: IPv4Address


@dataclass
class Cluster:
    nodes: list[Node]
    networks: dict[str, Network]  # in allocation order; ingress first
    services: dict[str, Service]
    sandboxes: dict[str, Sandbox]  # by sandbox name, in creation order
    underlay: IPv4Network
    external_peers: list[ExternalPeer] = field(default_factory=list)
    dns_upstreams: list[IPv4Address] = field(default_factory=list)
    clients: dict[str, IPv4Address] = field(default_factory=dict)  # client namespace name -> underlay IP
    relay_ports: dict[int, int] = field(default_factory=dict)  # published port -> 127.0.0.1 port
    ingress_sbox_ips: dict[str, IPv4Address] = field(default_factory=dict)  # node -> ingress address
    warnings: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def sandboxes_on(self, node: str) -> list[Sandbox]:
        return [s for s in self.sandboxes.values() if s.node == node]

    def networks_on(self, node: str) -> list[Network]:
        """Networks with a presence on `node`: every overlay, and bridges placed there."""
        return [n for n in self.networks.values() if n.driver == "overlay" or n.node == node]


def port_name(node: str, sandbox: str, ifname: str) -> str:
    """Name a sandbox port as traces, captures and replay do: `<node>/<sandbox>/<ifname>`."""
    return f"{node}/{sandbox}/{ifname}"
