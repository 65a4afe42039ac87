"""Stack file compilation: the demo's values, Docker's allocation rules, validation."""

from __future__ import annotations

import ipaddress
import logging
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapnet import model
from tapnet.stack import (
    StackError,
    compile_stack,
    demo_stack_path,
    load_demo,
    load_stack,
    load_stack_file,
    load_stack_text,
    parse_stack_text,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

# The root namespace of the test machine as the runtime would report it.
ROOT_NETWORKS = ("127.0.0.1/8", "192.0.2.2/24", "fd00::2/64", "::1/128")


def compile_yaml(text: str, **kwargs) -> model.Cluster:
    return load_stack_text(textwrap.dedent(text), **kwargs)


def endpoint_summary(sandbox: model.Sandbox) -> list[tuple[str, str, str]]:
    return [(e.ifname, e.network, str(e.ip)) for e in sandbox.endpoints]


# --------------------------------------------------------------------------
# The built-in demo


@pytest.fixture(scope="module")
def demo() -> model.Cluster:
    return load_demo(root_networks=ROOT_NETWORKS)


def test_demo_compiles_without_warnings(demo):
    assert demo.warnings == []


def test_demo_nodes_and_underlay(demo):
    assert demo.underlay == net("198.51.100.0/24")
    assert [(n.name, str(n.underlay_ip)) for n in demo.nodes] == [
        ("node1", "198.51.100.2"),
        ("node2", "198.51.100.3"),
    ]


@pytest.mark.parametrize(
    "name, driver, subnet, gateway, vni, mtu, node",
    [
        ("ingress", "overlay", "10.255.0.0/16", "10.255.0.1", 4096, 1450, None),
        ("vote", "overlay", "10.0.0.0/24", "10.0.0.1", 4097, 1450, None),
        ("front", "bridge", "172.20.0.0/24", "172.20.0.1", None, 1500, "node1"),
        ("back", "bridge", "172.21.0.0/24", "172.21.0.1", None, 1500, "node1"),
    ],
)
def test_demo_network(demo, name, driver, subnet, gateway, vni, mtu, node):
    network = demo.networks[name]
    assert network.driver == driver
    assert network.subnet == net(subnet)
    assert network.gateway == ip(gateway)
    assert network.vni == vni
    assert network.mtu == mtu
    assert network.node == node


def test_demo_network_order_puts_ingress_first(demo):
    assert list(demo.networks) == ["ingress", "vote", "front", "back"]
    assert demo.networks["ingress"].ingress
    assert not any(n.ingress for name, n in demo.networks.items() if name != "ingress")


def test_demo_ingress_sandbox_addresses(demo):
    assert demo.ingress_sbox_ips == {"node1": ip("10.255.0.2"), "node2": ip("10.255.0.3")}


@pytest.mark.parametrize(
    "service, vips",
    [
        ("redis", {"vote": "10.0.0.2"}),
        ("worker", {"vote": "10.0.0.3"}),
        ("web", {"ingress": "10.255.0.4", "vote": "10.0.0.4"}),
        ("proxy", {"front": "172.20.0.2"}),
        ("app", {"front": "172.20.0.3", "back": "172.21.0.2"}),
        ("db", {"back": "172.21.0.3"}),
    ],
)
def test_demo_vips(demo, service, vips):
    assert {name: str(vip) for name, vip in demo.services[service].vips.items()} == vips


@pytest.mark.parametrize(
    "sandbox, node, endpoints, gateway",
    [
        ("redis.1", "node1", [("eth0", "vote", "10.0.0.5")], "10.0.0.1"),
        ("redis.2", "node2", [("eth0", "vote", "10.0.0.6")], "10.0.0.1"),
        ("redis.3", "node1", [("eth0", "vote", "10.0.0.7")], "10.0.0.1"),
        ("worker.1", "node2", [("eth0", "vote", "10.0.0.8")], "10.0.0.1"),
        ("web.1", "node1", [("eth0", "ingress", "10.255.0.5"), ("eth1", "vote", "10.0.0.9")], "10.0.0.1"),
        ("proxy.1", "node1", [("eth0", "front", "172.20.0.4")], "172.20.0.1"),
        ("app.1", "node1", [("eth0", "front", "172.20.0.5"), ("eth1", "back", "172.21.0.4")], "172.20.0.1"),
        ("db.1", "node1", [("eth0", "back", "172.21.0.5")], "172.21.0.1"),
    ],
)
def test_demo_sandbox(demo, sandbox, node, endpoints, gateway):
    box = demo.sandboxes[sandbox]
    assert box.node == node
    assert endpoint_summary(box) == endpoints
    assert box.default_gateway == ip(gateway)


def test_demo_sandbox_order(demo):
    assert list(demo.sandboxes) == [
        "redis.1",
        "redis.2",
        "redis.3",
        "worker.1",
        "web.1",
        "proxy.1",
        "app.1",
        "db.1",
    ]
    assert [box.slot for box in demo.sandboxes.values()] == [1, 2, 3, 1, 1, 1, 1, 1]


def test_demo_endpoint_macs_and_mtus(demo):
    for box in demo.sandboxes.values():
        for endpoint in box.endpoints:
            assert endpoint.mac == b"\x02\x42" + endpoint.ip.packed
            assert endpoint.mtu == demo.networks[endpoint.network].mtu
    assert model.format_mac(demo.sandboxes["web.1"].endpoints[0].mac) == "02:42:0a:ff:00:05"


def test_demo_aliases(demo):
    assert demo.sandboxes["proxy.1"].endpoints[0].aliases == ("edge",)
    assert demo.sandboxes["db.1"].endpoints[0].aliases == ("database",)
    assert demo.services["db"].aliases == {"back": ("database",)}


def test_demo_ports_and_relays(demo):
    assert demo.services["web"].ports == [model.PortSpec(3000, 80, "tcp", "ingress")]
    assert demo.services["web"].publishes_ingress
    assert demo.relay_ports == {3000: 3000}


def test_demo_commands(demo):
    worker = demo.sandboxes["worker.1"].command
    assert worker[:2] == ["/bin/sh", "-c"]
    assert "http://redis:6379/" in worker[2]
    redis = demo.sandboxes["redis.1"].command
    assert redis[0] == "/usr/bin/python3"
    assert redis[-1] == "6379"
    compile(redis[2], "reply-server", "exec")  # the inline server is valid Python


def test_demo_proxy_probe_names_db_address(demo):
    # The proxy's command probes db.1 by address to show bridge isolation.
    assert str(demo.sandboxes["db.1"].endpoints[0].ip) in demo.sandboxes["proxy.1"].command[2]


def test_demo_path_is_packaged_yaml():
    assert demo_stack_path().name == "demo.yml"
    assert load_stack(demo_stack_path()) == load_stack(str(demo_stack_path()))


# --------------------------------------------------------------------------
# Determinism and loading


def test_same_file_gives_same_cluster():
    first = load_demo(root_networks=ROOT_NETWORKS)
    second = load_demo(root_networks=ROOT_NETWORKS)
    assert first == second


def test_text_and_file_compile_alike(tmp_path):
    text = demo_stack_path().read_text()
    path = tmp_path / "stack.yml"
    path.write_text(text)
    assert load_stack(text) == load_stack(path)
    assert load_stack_file(path) == load_stack_text(text)


def test_missing_file_is_stack_error(tmp_path):
    with pytest.raises(StackError, match="cannot read stack file"):
        load_stack(str(tmp_path / "absent.yml"))


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("services:\n  web:\n    deploy:\n      replicas: -1\n")
    with pytest.raises(StackError) as info:
        load_stack(path)
    assert str(info.value).startswith(f"{path}: services.web.deploy.replicas: ")


def test_load_stack_rejects_other_types():
    with pytest.raises(TypeError):
        load_stack(42)


# --------------------------------------------------------------------------
# Validation errors: each YAML snippet must fail naming the key.

INVALID_STACKS = [
    ("yaml-syntax", "services:\n  web:\n    ports: [\n", "line 4"),
    ("yaml-bad-indent", "services:\n  web:\n  networks: x\n - y\n", "line 4"),
    ("yaml-duplicate-key", "services:\n  web: {}\n  web: {}\n", "line 3"),
    ("empty-file", "", "top level"),
    ("top-level-list", "- a\n- b\n", "top level"),
    ("services-not-mapping", "services: [web]\n", "services"),
    ("service-name-underscore", "services:\n  my_web: {}\n", "services.my_web"),
    ("service-name-too-long", f"services:\n  {'a' * 64}: {{}}\n", "services.aaaa"),
    ("service-names-differ-by-case", "services:\n  web: {}\n  Web: {}\n", "services.Web"),
    (
        "network-name-invalid",
        "networks:\n  back_tier: {}\nservices:\n  web:\n    networks: [back_tier]\n",
        "networks.back_tier",
    ),
    ("network-named-ingress", "networks:\n  ingress: {}\n", "networks.ingress"),
    (
        "replicas-negative",
        "services:\n  web:\n    deploy:\n      replicas: -1\n",
        "services.web.deploy.replicas",
    ),
    (
        "replicas-string",
        "services:\n  web:\n    deploy:\n      replicas: three\n",
        "services.web.deploy.replicas",
    ),
    (
        "replicas-float",
        "services:\n  web:\n    deploy:\n      replicas: 1.5\n",
        "services.web.deploy.replicas",
    ),
    (
        "replicas-bool",
        "services:\n  web:\n    deploy:\n      replicas: true\n",
        "services.web.deploy.replicas",
    ),
    (
        "replicas-in-global-mode",
        "services:\n  web:\n    deploy:\n      mode: global\n      replicas: 2\n",
        "services.web.deploy.replicas",
    ),
    (
        "deploy-mode-unknown",
        "services:\n  web:\n    deploy:\n      mode: everywhere\n",
        "services.web.deploy.mode",
    ),
    (
        "endpoint-mode-unknown",
        "services:\n  web:\n    deploy:\n      endpoint_mode: rr\n",
        "services.web.deploy.endpoint_mode",
    ),
    (
        "dnsrr-with-ingress-port",
        "services:\n  web:\n    ports: ['3000:80']\n    deploy:\n      endpoint_mode: dnsrr\n",
        "services.web.deploy.endpoint_mode",
    ),
    ("unknown-network", "services:\n  web:\n    networks: [nowhere]\n", "services.web.networks[0]"),
    ("service-joins-ingress", "services:\n  web:\n    networks: [ingress]\n", "services.web.networks[0]"),
    (
        "network-listed-twice",
        "networks:\n  a: {}\nservices:\n  web:\n    networks: [a, a]\n",
        "services.web.networks[1]",
    ),
    (
        "alias-invalid",
        "networks:\n  a: {}\nservices:\n  web:\n    networks:\n      a:\n        aliases: ['bad alias']\n",
        "services.web.networks.a.aliases[0]",
    ),
    ("port-syntax", "services:\n  web:\n    ports: ['80:']\n", "services.web.ports[0]"),
    ("port-range", "services:\n  web:\n    ports: ['3000-3001:80-81']\n", "services.web.ports[0]"),
    ("port-host-ip", "services:\n  web:\n    ports: ['127.0.0.1:3000:80']\n", "services.web.ports[0]"),
    ("port-zero", "services:\n  web:\n    ports: ['0:80']\n", "services.web.ports[0]"),
    ("port-too-large", "services:\n  web:\n    ports: ['70000:80']\n", "services.web.ports[0]"),
    ("port-target-too-large", "services:\n  web:\n    ports: [65536]\n", "services.web.ports[0]"),
    ("port-protocol", "services:\n  web:\n    ports: ['3000:80/sctp']\n", "services.web.ports[0]"),
    (
        "port-long-missing-target",
        "services:\n  web:\n    ports:\n      - published: 3000\n",
        "services.web.ports[0].target",
    ),
    (
        "port-long-bad-mode",
        "services:\n  web:\n    ports:\n      - {target: 80, mode: bridge}\n",
        "services.web.ports[0].mode",
    ),
    (
        "port-long-bad-published",
        "services:\n  web:\n    ports:\n      - {target: 80, published: 0}\n",
        "services.web.ports[0].published",
    ),
    (
        "port-published-twice",
        "services:\n  a:\n    ports: ['3000:80']\n  b:\n    ports: ['3000:8080']\n",
        "services.b.ports[0]",
    ),
    ("port-vxlan", "services:\n  a:\n    ports: ['4789:4789/udp']\n", "services.a.ports[0]"),
    ("command-empty", "services:\n  web:\n    command: ''\n", "services.web.command"),
    ("command-nested", "services:\n  web:\n    command: [sh, [x]]\n", "services.web.command[1]"),
    ("driver-unknown", "networks:\n  a:\n    driver: macvlan\n", "networks.a.driver"),
    ("network-external", "networks:\n  a:\n    external: true\n", "networks.a.external"),
    ("network-ipv6", "networks:\n  a:\n    enable_ipv6: true\n", "networks.a.enable_ipv6"),
    ("internal-not-bool", "networks:\n  a:\n    internal: maybe\n", "networks.a.internal"),
    (
        "subnet-bad-cidr",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.300.0/24}]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-host-bits",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.5/24}]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-too-small",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.0/31}]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-ipv6",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 'fd10::/64'}]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-two-configs",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.0/24}, {subnet: 10.0.10.0/24}]\n",
        "networks.a.ipam.config[1]",
    ),
    (
        "gateway-outside",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.0/24, gateway: 10.0.8.1}]\n",
        "networks.a.ipam.config[0].gateway",
    ),
    (
        "subnets-overlap",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.0.0/16}]\n  b:\n    ipam:\n      config: [{subnet: 10.0.5.0/24}]\n"
        "services:\n  web:\n    networks: [a, b]\n",
        "networks.b.ipam.config[0].subnet",
    ),
    (
        "subnet-overlaps-ingress",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.255.3.0/24}]\nservices:\n  web:\n    networks: [a]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-overlaps-gwbridge",
        "networks:\n  a:\n    driver: bridge\n    ipam:\n      config: [{subnet: 172.18.5.0/24}]\nservices:\n  web:\n    networks: [a]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "subnet-overlaps-underlay",
        "x-tapnet:\n  underlay: 203.0.113.0/24\nnetworks:\n  a:\n    ipam:\n      config: [{subnet: 203.0.113.0/25}]\n"
        "services:\n  web:\n    networks: [a]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    (
        "replicas-exceed-subnet",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.0/29}]\nservices:\n  web:\n    deploy:\n      replicas: 5\n"
        "    networks: [a]\n",
        "services.web.deploy.replicas",
    ),
    (
        "vips-exceed-subnet",
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.0.9.0/30}]\nservices:\n  one:\n    deploy: {replicas: 0}\n"
        "    networks: [a]\n  two:\n    deploy: {replicas: 0}\n    networks: [a]\n",
        "networks.a.ipam.config[0].subnet",
    ),
    ("nodes-empty", "x-tapnet:\n  nodes: []\n", "x-tapnet.nodes"),
    ("node-name-invalid", "x-tapnet:\n  nodes: [node_1]\n", "x-tapnet.nodes[0]"),
    ("node-listed-twice", "x-tapnet:\n  nodes: [a, a]\n", "x-tapnet.nodes"),
    (
        "node-underlay-ip-outside",
        "x-tapnet:\n  nodes:\n    a: {underlay_ip: 203.0.113.9}\n",
        "x-tapnet.nodes.a.underlay_ip",
    ),
    (
        "node-underlay-ip-reserved",
        "x-tapnet:\n  nodes:\n    a: {underlay_ip: 198.51.100.1}\n",
        "x-tapnet.nodes.a.underlay_ip",
    ),
    (
        "node-underlay-ip-taken-by-position",
        "x-tapnet:\n  nodes:\n    a: {}\n    b: {underlay_ip: 198.51.100.2}\n",
        "x-tapnet.nodes",
    ),
    (
        "placement-unknown-node",
        "x-tapnet:\n  placement:\n    web: node9\nservices:\n  web: {}\n",
        "x-tapnet.placement.web",
    ),
    (
        "placement-unknown-service",
        "x-tapnet:\n  placement:\n    api: node1\nservices:\n  web: {}\n",
        "x-tapnet.placement.api",
    ),
    (
        "constraint-unknown-node",
        "services:\n  web:\n    deploy:\n      placement:\n        constraints: ['node.hostname == node9']\n",
        "services.web.deploy.placement.constraints[0]",
    ),
    ("underlay-bad", "x-tapnet:\n  underlay: 198.51.100.0/33\n", "x-tapnet.underlay"),
    ("underlay-ipv6", "x-tapnet:\n  underlay: 'fd10::/64'\n", "x-tapnet.underlay"),
    ("underlay-overlaps-root", "x-tapnet:\n  underlay: 192.0.2.0/24\n", "x-tapnet.underlay"),
    ("underlay-overlaps-ingress", "x-tapnet:\n  underlay: 10.255.7.0/24\n", "x-tapnet.underlay"),
    ("underlay-overlaps-gwbridge", "x-tapnet:\n  underlay: 172.18.0.0/24\n", "x-tapnet.underlay"),
    ("underlay-too-small", "x-tapnet:\n  underlay: 198.51.100.0/30\n  nodes: [a, b]\n", "x-tapnet.underlay"),
    (
        "peer-network-not-a-name",
        "x-tapnet:\n  peers:\n    - {network: [a], ip: 10.0.0.9, vtep: 198.51.100.50}\n",
        "x-tapnet.peers[0].network",
    ),
    ("client-outside-underlay", "x-tapnet:\n  clients:\n    probe: 192.0.2.50\n", "x-tapnet.clients.probe"),
    ("client-on-node-address", "x-tapnet:\n  clients:\n    probe: 198.51.100.2\n", "x-tapnet.clients.probe"),
    ("client-named-like-node", "x-tapnet:\n  clients:\n    node1: 198.51.100.50\n", "x-tapnet.clients.node1"),
    ("upstream-outside", "x-tapnet:\n  dns_upstreams: [9.9.9.9]\n", "x-tapnet.dns_upstreams[0]"),
    ("upstream-machine-network", "x-tapnet:\n  dns_upstreams: [192.0.2.1]\n", "x-tapnet.dns_upstreams[0]"),
    ("upstream-is-tapnet-gateway", "x-tapnet:\n  dns_upstreams: [10.255.0.1]\n", "x-tapnet.dns_upstreams[0]"),
    ("upstream-not-an-address", "x-tapnet:\n  dns_upstreams: [dns.example]\n", "x-tapnet.dns_upstreams[0]"),
    ("relay-unpublished", "x-tapnet:\n  relay_ports:\n    3000: 13000\n", "x-tapnet.relay_ports.3000"),
    (
        "relay-collision",
        "x-tapnet:\n  relay_ports:\n    3000: 4000\nservices:\n  a:\n    ports: ['3000:80', '4000:81']\n",
        "x-tapnet.relay_ports",
    ),
    ("relay-port-invalid", "x-tapnet:\n  relay_ports:\n    3000: 0\n", "x-tapnet.relay_ports.3000"),
    (
        "peer-missing-vtep",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9}\n",
        "x-tapnet.peers[0].vtep",
    ),
    (
        "peer-on-bridge",
        "x-tapnet:\n  peers:\n    - {network: a, ip: 172.17.0.9, vtep: 198.51.100.50}\nnetworks:\n  a:\n    driver: bridge\n",
        "x-tapnet.peers[0].network",
    ),
    (
        "peer-unknown-network",
        "x-tapnet:\n  peers:\n    - {network: zz, ip: 10.0.0.9, vtep: 198.51.100.50}\n",
        "x-tapnet.peers[0].network",
    ),
    (
        "peer-ip-outside",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.0.0.9, vtep: 198.51.100.50}\n",
        "x-tapnet.peers[0].ip",
    ),
    (
        "peer-ip-gateway",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.0.1, vtep: 198.51.100.50}\n",
        "x-tapnet.peers[0].ip",
    ),
    (
        "peer-vtep-node",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.2}\n",
        "x-tapnet.peers[0].vtep",
    ),
    (
        "peer-vtep-outside",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 192.0.2.7}\n",
        "x-tapnet.peers[0].vtep",
    ),
    (
        "peer-multicast-mac",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.50, mac: '01:00:5e:00:00:01'}\n",
        "x-tapnet.peers[0].mac",
    ),
    (
        "peer-short-mac",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.50, mac: '02:42:0a'}\n",
        "x-tapnet.peers[0].mac",
    ),
    (
        "peer-ip-twice",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.50}\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.51}\n",
        "x-tapnet.peers[1].ip",
    ),
    (
        "unknown-network-mapping-form",
        "services:\n  web:\n    networks:\n      nowhere: {}\n",
        "services.web.networks.nowhere",
    ),
    (
        "replicas-absurd",
        "services:\n  web:\n    deploy:\n      replicas: 1000000000\n",
        "services.web.deploy.replicas",
    ),
    ("command-number", "services:\n  web:\n    command: 5\n", "services.web.command"),
    (
        "peer-bad-mac",
        "x-tapnet:\n  peers:\n    - {network: ingress, ip: 10.255.9.9, vtep: 198.51.100.50, mac: 'zz'}\n",
        "x-tapnet.peers[0].mac",
    ),
]


@pytest.mark.parametrize(
    "text, key", [case[1:] for case in INVALID_STACKS], ids=[case[0] for case in INVALID_STACKS]
)
def test_invalid_stack_names_key(text, key):
    with pytest.raises(StackError) as info:
        load_stack_text(text, root_networks=ROOT_NETWORKS)
    assert key in str(info.value)
    assert info.value.fix  # every error gives a fix


def test_stack_error_is_value_error_with_key():
    with pytest.raises(ValueError) as info:
        load_stack_text("services:\n  web:\n    deploy:\n      replicas: x\n")
    assert info.value.key == "services.web.deploy.replicas"
    assert str(info.value) == (
        "services.web.deploy.replicas: invalid replicas 'x', expected a non-negative integer. Set it to 0, 1, 2, ..."
    )


def test_yaml_error_reports_line_and_column():
    with pytest.raises(StackError) as info:
        parse_stack_text("services:\n  web: {}\n  db: [\n")
    assert info.value.key.startswith("line 4")


def test_duplicate_key_points_at_second():
    with pytest.raises(StackError) as info:
        parse_stack_text("services:\n  web: {}\n  db: {}\n  web: {}\n")
    assert info.value.key == "line 4, column 3"
    assert "duplicate key 'web'" in str(info.value)


def test_merge_keys_are_not_duplicates():
    document = parse_stack_text(
        "x-base: &base {replicas: 2}\nservices:\n  web:\n    deploy:\n      <<: *base\n      replicas: 3\n"
    )
    assert document["services"]["web"]["deploy"] == {"replicas": 3}


def test_colon_pair_stays_a_string():
    # YAML 1.1 would read 22:22 as the base-60 integer 1342.
    cluster = compile_yaml("""
        services:
          ssh:
            ports:
              - 2222:22
              - 22:22/udp
    """)
    assert cluster.services["ssh"].ports == [
        model.PortSpec(2222, 22, "tcp", "ingress"),
        model.PortSpec(22, 22, "udp", "ingress"),
    ]


# --------------------------------------------------------------------------
# Unknown keys warn once each


def test_unknown_keys_warn_once_each(caplog):
    text = """
        version: "3.8"
        services:
          web:
            image: nginx
            environment: {A: "1"}
            deploy:
              replicas: 2
              resources: {limits: {cpus: "0.5"}}
            networks:
              a:
                ipv4_address: 10.0.9.9
            ports:
              - target: 80
                published: 3000
                host_ip: 127.0.0.1
        networks:
          a:
            labels: [x]
            ipam:
              config:
                - subnet: 10.0.9.0/24
                  ip_range: 10.0.9.0/25
        volumes:
          data: {}
        x-tapnet:
          node: [node1]
          peers:
            - {network: a, ip: 10.0.9.200, vtep: 198.51.100.50, name: kernel}
        x-anchors:
          image: ignored-silently
    """
    with caplog.at_level(logging.WARNING, logger="tapnet"):
        cluster = compile_yaml(text)
    expected_keys = [
        "version",
        "volumes",
        "x-tapnet.node",
        "x-tapnet.peers[0].name",
        "networks.a.labels",
        "networks.a.ipam.config[0].ip_range",
        "services.web.image",
        "services.web.environment",
        "services.web.deploy.resources",
        "services.web.networks.a.ipv4_address",
        "services.web.ports[0].host_ip",
    ]
    warned_keys = [message.split(":")[0] for message in cluster.warnings]
    assert sorted(warned_keys) == sorted(expected_keys)
    assert [record.getMessage() for record in caplog.records] == cluster.warnings


def test_unknown_key_suggests_close_name():
    cluster = compile_yaml("services:\n  web:\n    deploy:\n      replica: 2\n")
    assert cluster.warnings == [
        "services.web.deploy.replica: not used by tapnet, ignored (did you mean 'replicas'?)"
    ]
    assert cluster.services["web"].replicas == 1


def test_unsupported_constraint_warns_and_is_ignored():
    cluster = compile_yaml("""
        services:
          web:
            deploy:
              placement:
                constraints: [node.role == manager]
    """)
    assert len(cluster.warnings) == 1
    assert cluster.warnings[0].startswith("services.web.deploy.placement.constraints[0]: ")
    assert cluster.services["web"].placement is None


def test_unused_network_warns_and_is_not_created():
    cluster = compile_yaml("networks:\n  spare: {}\nservices:\n  web: {}\n")
    assert "spare" not in cluster.networks
    assert cluster.warnings == ["networks.spare: not used by any service or peer, not created"]


# --------------------------------------------------------------------------
# Networks, subnets and VNIs


def test_service_without_networks_joins_default():
    cluster = compile_yaml("services:\n  web: {}\n  db: {}\n")
    default = cluster.networks["default"]
    assert default.driver == "overlay"
    assert default.subnet == net("10.0.0.0/24")
    assert default.vni == 4097
    assert cluster.services["web"].networks == ["default"]
    assert endpoint_summary(cluster.sandboxes["db.1"]) == [("eth0", "default", "10.0.0.5")]


def test_declared_default_network_keeps_its_settings():
    cluster = compile_yaml("networks:\n  default:\n    driver: bridge\nservices:\n  web: {}\n")
    assert cluster.networks["default"].driver == "bridge"
    assert cluster.networks["default"].subnet == net("172.17.0.0/16")


def test_vnis_follow_stack_order_of_overlays():
    cluster = compile_yaml("""
        networks:
          c: {}
          br: {driver: bridge}
          a: {}
        services:
          web:
            networks: [a, br, c]
    """)
    assert [(name, n.vni) for name, n in cluster.networks.items()] == [
        ("ingress", 4096),
        ("c", 4097),
        ("br", None),
        ("a", 4098),
    ]


def test_automatic_overlay_subnets_skip_configured_ones():
    cluster = compile_yaml("""
        networks:
          auto1: {}
          fixed:
            ipam:
              config: [{subnet: 10.0.0.0/23}]
          auto2: {}
        services:
          web:
            networks: [auto1, fixed, auto2]
    """)
    assert cluster.networks["auto1"].subnet == net("10.0.2.0/24")
    assert cluster.networks["auto2"].subnet == net("10.0.3.0/24")


def test_automatic_subnets_skip_root_networks():
    cluster = compile_yaml("services:\n  web: {}\n", root_networks=["10.0.0.7/24", "10.0.1.1/24"])
    assert cluster.networks["default"].subnet == net("10.0.2.0/24")


def test_automatic_bridge_subnets_skip_gwbridge():
    cluster = compile_yaml("""
        networks:
          one: {driver: bridge}
          two: {driver: bridge}
          three: {driver: bridge}
        services:
          web:
            networks: [one, two, three]
    """)
    assert [str(cluster.networks[name].subnet) for name in ("one", "two", "three")] == [
        "172.17.0.0/16",
        "172.19.0.0/16",
        "172.20.0.0/16",
    ]


def test_automatic_bridge_subnet_skips_configured():
    cluster = compile_yaml("""
        networks:
          auto: {driver: bridge}
          fixed:
            driver: bridge
            ipam:
              config: [{subnet: 172.17.3.0/24}]
        services:
          web:
            networks: [auto, fixed]
    """)
    assert cluster.networks["auto"].subnet == net("172.19.0.0/16")


def test_configured_subnet_overlapping_root_warns():
    cluster = compile_yaml(
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 10.9.0.0/24}]\nservices:\n  web:\n    networks: [a]\n",
        root_networks=["10.9.0.5/16"],
    )
    assert cluster.networks["a"].subnet == net("10.9.0.0/24")
    assert len(cluster.warnings) == 1
    assert cluster.warnings[0].startswith("networks.a.ipam.config[0].subnet: ")


def test_configured_gateway_is_skipped_by_allocation():
    cluster = compile_yaml("""
        networks:
          a:
            ipam:
              config: [{subnet: 10.0.9.0/24, gateway: 10.0.9.3}]
        services:
          web:
            deploy: {replicas: 2}
            networks: [a]
    """)
    assert cluster.networks["a"].gateway == ip("10.0.9.3")
    assert cluster.services["web"].vips == {"a": ip("10.0.9.1")}
    assert [str(box.endpoints[0].ip) for box in cluster.sandboxes.values()] == ["10.0.9.2", "10.0.9.4"]


def test_internal_network_gives_no_default_gateway():
    cluster = compile_yaml("""
        networks:
          inner: {internal: true}
          outer: {}
        services:
          sealed:
            networks: [inner]
          both:
            networks: [inner, outer]
    """)
    assert cluster.networks["inner"].internal
    assert cluster.sandboxes["sealed.1"].default_gateway is None
    assert cluster.sandboxes["both.1"].default_gateway == cluster.networks["outer"].gateway


def test_smallest_subnet_holds_gateway_and_one_task():
    cluster = compile_yaml("""
        networks:
          tiny:
            ipam:
              config: [{subnet: 10.0.9.0/30}]
        services:
          one:
            deploy: {endpoint_mode: dnsrr}
            networks: [tiny]
    """)
    assert cluster.sandboxes["one.1"].endpoints[0].ip == ip("10.0.9.2")
    assert cluster.services["one"].vips == {}


# --------------------------------------------------------------------------
# Addresses, VIPs, endpoints


def test_vips_before_task_addresses():
    cluster = compile_yaml("""
        services:
          a:
            deploy: {replicas: 2}
          b:
            deploy: {endpoint_mode: dnsrr, replicas: 2}
          c: {}
    """)
    assert cluster.services["a"].vips == {"default": ip("10.0.0.2")}
    assert cluster.services["b"].vips == {}
    assert cluster.services["c"].vips == {"default": ip("10.0.0.3")}
    tasks = {name: str(box.endpoints[0].ip) for name, box in cluster.sandboxes.items()}
    assert tasks == {
        "a.1": "10.0.0.4",
        "a.2": "10.0.0.5",
        "b.1": "10.0.0.6",
        "b.2": "10.0.0.7",
        "c.1": "10.0.0.8",
    }


def test_ingress_endpoint_only_for_ingress_mode_ports():
    cluster = compile_yaml("""
        services:
          mesh:
            ports: ["8080:80"]
          local:
            ports:
              - {target: 80, published: 8081, mode: host}
    """)
    assert [e.network for e in cluster.sandboxes["mesh.1"].endpoints] == ["ingress", "default"]
    assert [e.network for e in cluster.sandboxes["local.1"].endpoints] == ["default"]
    assert set(cluster.services["mesh"].vips) == {"ingress", "default"}
    assert set(cluster.services["local"].vips) == {"default"}


def test_ingress_order_sboxes_vips_tasks():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
        services:
          a:
            ports: ["80"]
          b:
            ports: ["81"]
    """)
    assert list(cluster.ingress_sbox_ips.values()) == [ip("10.255.0.2"), ip("10.255.0.3"), ip("10.255.0.4")]
    assert cluster.services["a"].vips["ingress"] == ip("10.255.0.5")
    assert cluster.services["b"].vips["ingress"] == ip("10.255.0.6")
    assert cluster.sandboxes["a.1"].endpoints[0].ip == ip("10.255.0.7")


def test_dnsrr_may_publish_in_host_mode():
    cluster = compile_yaml("""
        services:
          dns:
            deploy: {endpoint_mode: dnsrr}
            ports:
              - {target: 53, published: 5353, protocol: udp, mode: host}
    """)
    assert cluster.services["dns"].ports == [model.PortSpec(5353, 53, "udp", "host")]
    assert cluster.services["dns"].vips == {}


def test_ports_without_number_take_dynamic_range():
    cluster = compile_yaml("""
        services:
          a:
            ports: ["80", "30000:81"]
          b:
            ports:
              - target: 82
              - {target: 53, protocol: udp}
    """)
    assert [p.published for p in cluster.services["a"].ports] == [30001, 30000]
    assert [p.published for p in cluster.services["b"].ports] == [30002, 30000]


def test_port_on_tcp_and_udp_allowed():
    cluster = compile_yaml("services:\n  dns:\n    ports: ['53:53', '53:53/udp']\n")
    assert [(p.published, p.protocol) for p in cluster.services["dns"].ports] == [(53, "tcp"), (53, "udp")]
    assert cluster.relay_ports == {53: 53}


def test_relay_ports_map_published_ports():
    cluster = compile_yaml("""
        x-tapnet:
          relay_ports:
            3000: 13000
        services:
          a:
            ports: ["3000:80", "3001:81"]
    """)
    assert cluster.relay_ports == {3000: 13000, 3001: 3001}


def test_command_string_runs_through_shell():
    cluster = compile_yaml(
        "services:\n  a:\n    command: echo hi && sleep 1\n  b:\n    command: [sleep, 5]\n  c: {}\n"
    )
    assert cluster.sandboxes["a.1"].command == ["/bin/sh", "-c", "echo hi && sleep 1"]
    assert cluster.sandboxes["b.1"].command == ["sleep", "5"]
    assert cluster.sandboxes["c.1"].command is None


def test_zero_replicas_keep_vip_without_tasks():
    cluster = compile_yaml("services:\n  idle:\n    deploy: {replicas: 0}\n")
    assert cluster.services["idle"].replicas == 0
    assert cluster.services["idle"].vips == {"default": ip("10.0.0.2")}
    assert cluster.sandboxes == {}


# --------------------------------------------------------------------------
# Underlay


def test_underlay_default_without_root_networks():
    cluster = compile_yaml("services: {}\n")
    assert cluster.underlay == model.DEFAULT_UNDERLAY


def test_underlay_skips_candidate_overlapping_root():
    cluster = compile_yaml("x-tapnet:\n  nodes: [a, b]\n", root_networks=["198.51.100.77/24"])
    assert cluster.underlay == net("203.0.113.0/24")
    assert [str(n.underlay_ip) for n in cluster.nodes] == ["203.0.113.2", "203.0.113.3"]


def test_underlay_skips_candidate_overlapping_stack_network():
    cluster = compile_yaml(
        "networks:\n  a:\n    ipam:\n      config: [{subnet: 198.51.100.0/24}]\nservices:\n  web:\n    networks: [a]\n"
    )
    assert cluster.underlay == net("203.0.113.0/24")


def test_underlay_error_when_every_candidate_overlaps():
    roots = [str(candidate) for candidate in model.UNDERLAY_CANDIDATES]
    with pytest.raises(StackError) as info:
        compile_yaml("services: {}\n", root_networks=roots)
    assert info.value.key == "x-tapnet.underlay"


def test_configured_underlay_is_used():
    cluster = compile_yaml("x-tapnet:\n  underlay: 198.18.5.0/24\n", root_networks=ROOT_NETWORKS)
    assert cluster.underlay == net("198.18.5.0/24")
    assert cluster.nodes == [model.Node("node1", ip("198.18.5.2"))]


def test_configured_underlay_overlapping_root_rejected():
    with pytest.raises(StackError) as info:
        compile_yaml("x-tapnet:\n  underlay: 198.51.100.0/24\n", root_networks=["198.51.100.9/24"])
    assert info.value.key == "x-tapnet.underlay"
    assert "203.0.113.0/24" in info.value.fix


def test_ipv6_root_networks_do_not_block_ipv4():
    cluster = compile_yaml("services: {}\n", root_networks=[ipaddress.ip_interface("fd00::2/64")])
    assert cluster.underlay == model.DEFAULT_UNDERLAY


def test_node_mapping_form_with_underlay_ip():
    cluster = compile_yaml("""
        x-tapnet:
          nodes:
            n1: {underlay_ip: 198.51.100.20}
            n2:
          clients:
            probe: 198.51.100.100
    """)
    assert [(n.name, str(n.underlay_ip)) for n in cluster.nodes] == [
        ("n1", "198.51.100.20"),
        ("n2", "198.51.100.3"),
    ]
    assert cluster.clients == {"probe": ip("198.51.100.100")}


def test_node_list_form_with_mappings():
    cluster = compile_yaml("x-tapnet:\n  nodes:\n    - n1\n    - {name: n2, underlay_ip: 198.51.100.9}\n")
    assert [(n.name, str(n.underlay_ip)) for n in cluster.nodes] == [
        ("n1", "198.51.100.2"),
        ("n2", "198.51.100.9"),
    ]


def test_peers_and_upstreams():
    cluster = compile_yaml("""
        x-tapnet:
          peers:
            - {network: vote, ip: 10.0.0.2, vtep: 198.51.100.50}
            - {network: vote, ip: 10.0.0.3, vtep: 198.51.100.50, mac: "02:00:00:00:00:33"}
          clients:
            resolver: 198.51.100.50
          dns_upstreams: [198.51.100.50, 10.0.0.2]
        networks:
          vote:
            ipam:
              config: [{subnet: 10.0.0.0/24}]
        services:
          web:
            networks: [vote]
    """)
    assert cluster.external_peers == [
        model.ExternalPeer("vote", ip("10.0.0.2"), bytes.fromhex("02420a000002"), ip("198.51.100.50")),
        model.ExternalPeer("vote", ip("10.0.0.3"), bytes.fromhex("020000000033"), ip("198.51.100.50")),
    ]
    # Peer addresses are reserved before VIPs and tasks take theirs.
    assert cluster.services["web"].vips == {"vote": ip("10.0.0.4")}
    assert cluster.dns_upstreams == [ip("198.51.100.50"), ip("10.0.0.2")]


def test_peer_network_counts_as_used():
    cluster = compile_yaml("""
        x-tapnet:
          peers:
            - {network: lab, ip: 10.0.0.9, vtep: 198.51.100.50}
        networks:
          lab: {attachable: true}
    """)
    assert cluster.networks["lab"].attachable
    assert cluster.networks["lab"].vni == 4097
    assert cluster.warnings == []


# --------------------------------------------------------------------------
# Placement


def nodes_of(cluster: model.Cluster, service: str) -> list[str]:
    return [box.node for box in cluster.sandboxes.values() if box.service == service]


def test_tasks_go_to_least_loaded_node():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
        services:
          a:
            deploy: {replicas: 4}
          b:
            deploy: {replicas: 2}
    """)
    assert nodes_of(cluster, "a") == ["n1", "n2", "n3", "n1"]
    assert nodes_of(cluster, "b") == ["n2", "n3"]


def test_pinned_service_uses_only_its_nodes():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
          placement:
            a: [n2, n3]
            b: n1
        services:
          a:
            deploy: {replicas: 3}
          b:
            deploy: {replicas: 2}
    """)
    assert nodes_of(cluster, "a") == ["n2", "n3", "n2"]
    assert nodes_of(cluster, "b") == ["n1", "n1"]
    assert cluster.services["a"].placement == ["n2", "n3"]


def test_hostname_constraints_map_to_nodes():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
        services:
          a:
            deploy:
              replicas: 2
              placement:
                constraints: ["node.hostname != n1"]
          b:
            deploy:
              placement:
                constraints: ["node.hostname==n3"]
    """)
    assert cluster.services["a"].placement == ["n2", "n3"]
    assert nodes_of(cluster, "a") == ["n2", "n3"]
    assert nodes_of(cluster, "b") == ["n3"]


def test_global_mode_runs_one_task_per_node():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
          placement:
            agent: [n1, n3]
        services:
          agent:
            deploy: {mode: global}
    """)
    assert cluster.services["agent"].replicas == 2
    assert list(cluster.sandboxes) == ["agent.1", "agent.2"]
    assert nodes_of(cluster, "agent") == ["n1", "n3"]


def test_host_mode_port_keeps_tasks_on_distinct_nodes():
    text = """
        x-tapnet:
          nodes: [n1, n2]
          placement:
            filler: n1
        services:
          filler:
            deploy: {replicas: 3}
          web:
            deploy: {replicas: 2}
            ports:
              - {target: 80, published: 8080, mode: host}
    """
    cluster = compile_yaml(text)
    assert nodes_of(cluster, "web") == ["n2", "n1"]
    with pytest.raises(StackError) as info:
        compile_yaml(text.replace("replicas: 2", "replicas: 3"))
    assert info.value.key == "services.web.deploy.replicas"


def test_bridge_network_keeps_its_services_on_one_node():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2]
        networks:
          local: {driver: bridge}
        services:
          spread:
            deploy: {replicas: 1}
          a:
            deploy: {replicas: 3}
            networks: [local]
          b:
            networks: [local]
    """)
    # spread.1 loads n1, so the bridge's first task goes to n2 and the rest follow.
    assert cluster.networks["local"].node == "n2"
    assert nodes_of(cluster, "a") == ["n2", "n2", "n2"]
    assert nodes_of(cluster, "b") == ["n2"]


def test_bridge_network_follows_a_later_pin():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2]
          placement:
            b: n2
        networks:
          local: {driver: bridge}
        services:
          a:
            networks: [local]
          b:
            networks: [local]
    """)
    assert cluster.networks["local"].node == "n2"
    assert nodes_of(cluster, "a") == ["n2"]


def test_bridges_joined_by_service_share_node():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2]
          placement:
            db: n2
        networks:
          front: {driver: bridge}
          back: {driver: bridge}
        services:
          proxy:
            networks: [front]
          app:
            networks: [front, back]
          db:
            networks: [back]
    """)
    assert cluster.networks["front"].node == "n2"
    assert cluster.networks["back"].node == "n2"
    assert [box.node for box in cluster.sandboxes.values()] == ["n2", "n2", "n2"]


def test_bridge_without_tasks_lives_on_allowed_node():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2]
          placement:
            idle: n2
        networks:
          local: {driver: bridge}
        services:
          idle:
            deploy: {replicas: 0}
            networks: [local]
    """)
    assert cluster.networks["local"].node == "n2"


def test_overlay_services_stay_spread_next_to_bridges():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2]
        networks:
          local: {driver: bridge}
          over: {}
        services:
          db:
            networks: [local, over]
          web:
            deploy: {replicas: 2}
            networks: [over]
    """)
    assert nodes_of(cluster, "db") == ["n1"]
    assert nodes_of(cluster, "web") == ["n2", "n1"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            """
            x-tapnet:
              nodes: [n1, n2]
              placement: {a: n1, b: n2}
            networks:
              local: {driver: bridge}
            services:
              a: {networks: [local]}
              b: {networks: [local]}
            """,
            id="two-pins-on-one-bridge",
        ),
        pytest.param(
            """
            x-tapnet:
              nodes: [n1, n2]
              placement: {a: n1, c: n2}
            networks:
              front: {driver: bridge}
              back: {driver: bridge}
            services:
              a: {networks: [front]}
              b: {networks: [front, back]}
              c: {networks: [back]}
            """,
            id="service-joins-bridges-on-two-nodes",
        ),
        pytest.param(
            """
            x-tapnet:
              nodes: [n1, n2]
            networks:
              local: {driver: bridge}
            services:
              a:
                networks: [local]
                deploy:
                  placement:
                    constraints: ["node.hostname == n1"]
              b:
                networks: [local]
                deploy:
                  placement:
                    constraints: ["node.hostname == n2"]
            """,
            id="constraints-on-one-bridge",
        ),
    ],
)
def test_bridge_spread_over_nodes_is_rejected(text):
    with pytest.raises(StackError) as info:
        compile_yaml(text)
    assert "local to one node" in str(info.value)
    assert info.value.key.endswith(".networks")


def test_placement_combines_pin_and_constraint():
    cluster = compile_yaml("""
        x-tapnet:
          nodes: [n1, n2, n3]
          placement:
            a: [n1, n2]
        services:
          a:
            deploy:
              replicas: 2
              placement:
                constraints: ["node.hostname != n1"]
    """)
    assert cluster.services["a"].placement == ["n2"]
    assert nodes_of(cluster, "a") == ["n2", "n2"]


def test_compile_stack_accepts_a_parsed_mapping():
    document = {"services": {"web": {"deploy": {"replicas": 2}}}}
    cluster = compile_stack(document)
    assert list(cluster.sandboxes) == ["web.1", "web.2"]


def test_stack_error_with_message_only():
    error = StackError("stack file x.yml not found")
    assert error.key == ""
    assert str(error) == "stack file x.yml not found"


# --------------------------------------------------------------------------
# Robustness: any document compiles or raises StackError, nothing else.


KEY_NAMES = [
    "services",
    "networks",
    "x-tapnet",
    "deploy",
    "replicas",
    "mode",
    "endpoint_mode",
    "placement",
    "constraints",
    "ports",
    "target",
    "published",
    "protocol",
    "command",
    "aliases",
    "driver",
    "internal",
    "ipam",
    "config",
    "subnet",
    "gateway",
    "nodes",
    "underlay",
    "underlay_ip",
    "peers",
    "network",
    "ip",
    "mac",
    "vtep",
    "clients",
    "dns_upstreams",
    "relay_ports",
    "name",
    "web",
    "db",
    "vote",
    "node1",
    "node2",
    "ingress",
    "default",
    "external",
    "image",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=70000),
    st.sampled_from(
        [
            "",
            "web",
            "vote",
            "node1",
            "node2",
            "overlay",
            "bridge",
            "host",
            "ingress",
            "dnsrr",
            "global",
            "udp",
            "3000:80",
            "80",
            "22:22",
            "10.0.0.0/24",
            "10.255.0.0/24",
            "198.51.100.7",
            "198.51.100.2",
            "10.0.0.9",
            "02:42:0a:00:00:09",
            "node.hostname == node2",
            "fd00::/64",
            "1.2.3.4",
        ]
    ),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(KEY_NAMES), children, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_document_compiles_or_raises_stack_error(document):
    try:
        cluster = compile_stack(document, root_networks=ROOT_NETWORKS)
    except StackError as error:
        assert str(error)
    else:
        assert isinstance(cluster, model.Cluster)


def shaped(strategy):
    """Return the strategy, or now and then a wrong-typed value in its place."""
    wrong = st.one_of(SCALARS, st.lists(SCALARS, max_size=2))
    return st.one_of(*[strategy] * 8, wrong)


PORT_ENTRIES = st.one_of(
    SCALARS,
    st.fixed_dictionaries(
        {"target": SCALARS},
        optional={"published": SCALARS, "protocol": SCALARS, "mode": SCALARS},
    ),
)
SERVICE = st.fixed_dictionaries(
    {},
    optional={
        "deploy": shaped(
            st.fixed_dictionaries(
                {},
                optional={
                    "replicas": SCALARS,
                    "mode": SCALARS,
                    "endpoint_mode": SCALARS,
                    "placement": shaped(st.fixed_dictionaries({"constraints": shaped(st.lists(SCALARS))})),
                },
            )
        ),
        "ports": shaped(st.lists(PORT_ENTRIES, max_size=3)),
        "networks": shaped(
            st.one_of(
                st.lists(st.sampled_from(["vote", "front", "back", "default", "nowhere"]), max_size=3),
                st.dictionaries(
                    st.sampled_from(["vote", "front", "back"]),
                    st.one_of(st.none(), st.fixed_dictionaries({"aliases": shaped(st.lists(SCALARS))})),
                ),
            )
        ),
        "command": SCALARS,
    },
)
NETWORK = st.fixed_dictionaries(
    {},
    optional={
        "driver": SCALARS,
        "internal": SCALARS,
        "ipam": shaped(
            st.fixed_dictionaries(
                {
                    "config": shaped(
                        st.lists(
                            st.fixed_dictionaries({"subnet": SCALARS}, optional={"gateway": SCALARS}),
                            max_size=2,
                        )
                    )
                }
            )
        ),
    },
)
TAPNET = st.fixed_dictionaries(
    {},
    optional={
        "nodes": shaped(st.lists(st.sampled_from(["node1", "node2", "node3"]), min_size=1, max_size=3)),
        "placement": shaped(st.dictionaries(st.sampled_from(["web", "db", "api"]), SCALARS, max_size=2)),
        "underlay": SCALARS,
        "peers": shaped(
            st.lists(
                st.fixed_dictionaries(
                    {}, optional={"network": SCALARS, "ip": SCALARS, "mac": SCALARS, "vtep": SCALARS}
                ),
                max_size=2,
            )
        ),
        "clients": shaped(
            st.dictionaries(st.sampled_from(["probe", "node1", "bad_name"]), SCALARS, max_size=2)
        ),
        "dns_upstreams": shaped(st.lists(SCALARS, max_size=2)),
        "relay_ports": shaped(st.dictionaries(SCALARS, SCALARS, max_size=2)),
    },
)
STRUCTURED_DOCUMENTS = st.fixed_dictionaries(
    {
        "services": st.dictionaries(st.sampled_from(["web", "db", "api"]), shaped(SERVICE), max_size=3),
    },
    optional={
        "networks": st.dictionaries(st.sampled_from(["vote", "front", "back"]), shaped(NETWORK), max_size=3),
        "x-tapnet": TAPNET,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURED_DOCUMENTS)
def test_shaped_document_compiles_or_raises_stack_error(document):
    try:
        cluster = compile_stack(document, root_networks=ROOT_NETWORKS)
    except StackError as error:
        assert str(error)
    else:
        assert len(cluster.sandboxes) == sum(service.replicas for service in cluster.services.values())


def test_empty_values_mean_defaults():
    cluster = compile_yaml("""
        services:
          web:
            deploy:
              mode:
              replicas:
              endpoint_mode:
            ports:
              - target: 80
                published: 8080
                protocol:
                mode:
            networks: [a]
        networks:
          a:
            driver:
            ipam:
              driver:
    """)
    assert cluster.networks["a"].driver == "overlay"
    assert cluster.services["web"].replicas == 1
    assert cluster.services["web"].endpoint_mode == "vip"
    assert cluster.services["web"].ports == [model.PortSpec(8080, 80, "tcp", "ingress")]
    assert cluster.warnings == []
