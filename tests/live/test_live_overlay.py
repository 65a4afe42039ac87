"""Live overlay traffic: sandboxes on two nodes, VXLAN through the underlay, a kernel VXLAN peer (root only).

One instance serves most tests: `server` (an HTTP server) on node2 and
`client` on node1 share the overlay `ov1`, and `other` sits alone on `ov2`.
The client namespace `kpeer` on the underlay contains a Linux kernel VXLAN
device on `ov1`, declared to tapnet as an external peer, and a dnsmasq that
serves as DNS upstream. Every subnet differs from the root namespace's
addresses (192.0.2.0/24).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import pytest
import yaml
from scapy.all import rdpcap

from livekit import REPO, STATE_ROOT, capture, end_process, instance_namespaces, netns_run, run_tapnet, tapnet_env

pytestmark = pytest.mark.root

INSTANCE = "lvx"
UNDERLAY = "198.18.82.0/24"
NODE1_VTEP = "198.18.82.2"
NODE2_VTEP = "198.18.82.3"
PEER_VTEP = "198.18.82.50"  # the client namespace kpeer: kernel VXLAN device and DNS upstream
PEER_IP = "10.82.1.200"
PEER_NAMESPACE = f"tn-{INSTANCE}-client-kpeer"
HTTP_PORT = 8080
UPSTREAM_NAME = "upstream.test"
UPSTREAM_ANSWER = "10.82.9.9"
STACK = f"""
x-tapnet:
  nodes: [node1, node2]
  underlay: {UNDERLAY}
  placement:
    client: node1
    server: node2
    other: node2
  clients:
    kpeer: {PEER_VTEP}
  peers:
    - network: ov1
      ip: {PEER_IP}
      vtep: {PEER_VTEP}
  dns_upstreams: [{PEER_VTEP}]
services:
  server:
    command: python3 -m http.server {HTTP_PORT} --bind 0.0.0.0
    networks: [ov1]
  client:
    networks: [ov1]
  other:
    networks: [ov2]
networks:
  ov1:
    driver: overlay
    ipam:
      config:
        - subnet: 10.82.1.0/24
  ov2:
    driver: overlay
    ipam:
      config:
        - subnet: 10.82.2.0/24
"""

# The largest frame on a 1500-byte underlay: 14 bytes of Ethernet header plus the MTU.
UNDERLAY_MAX_FRAME = 14 + 1500


def derived_mac(ip: str) -> str:
    return "02:42:" + ":".join(f"{int(part):02x}" for part in ip.split("."))


@pytest.fixture(scope="module")
def live(module_instances):
    instance = module_instances(INSTANCE, STACK)
    rows = {row["sandbox"]: row for row in instance.ps()}
    instance.extra["server"] = rows["server.1"]["addresses"]["ov1"]
    instance.extra["client"] = rows["client.1"]["addresses"]["ov1"]
    instance.extra["other"] = rows["other.1"]["addresses"]["ov2"]
    instance.extra["nodes"] = {name: row["node"] for name, row in rows.items()}
    return instance


@pytest.fixture(scope="module")
def kernel_peer(live):
    """A Linux VXLAN device on ov1 inside the client namespace kpeer, set up as an operator would by hand.

    tapnet, like Docker, carries no broadcast over the tunnel, so the kernel
    side gets static neighbour entries for the tapnet sandboxes (their MACs
    derive from their IPs) and static FDB entries pointing at their VTEPs.
    """
    view = json.loads(live.cli("inspect", "ov1").stdout)[0]
    vni = view["Overlay"]["VNI"]
    vteps = {node: info["VTEP"].split(":")[0] for node, info in view["Overlay"]["Nodes"].items()}
    try:
        netns_run(
            PEER_NAMESPACE, "ip", "link", "add", "tnvx0", "type", "vxlan", "id", str(vni), "dstport", "4789",
            "local", PEER_VTEP, "remote", vteps["node1"], "nolearning",
        )
        netns_run(PEER_NAMESPACE, "ip", "link", "set", "tnvx0", "address", derived_mac(PEER_IP), "mtu", "1450", "up")
        netns_run(PEER_NAMESPACE, "ip", "addr", "add", f"{PEER_IP}/24", "dev", "tnvx0")
        for sandbox in ("client.1", "server.1"):
            ip = live.address(sandbox, "ov1")
            mac = derived_mac(ip)
            netns_run(PEER_NAMESPACE, "ip", "neigh", "add", ip, "lladdr", mac, "dev", "tnvx0", "nud", "permanent")
            vtep = vteps[live.extra["nodes"][sandbox]]
            netns_run(PEER_NAMESPACE, "bridge", "fdb", "append", mac, "dev", "tnvx0", "dst", vtep)
        yield {"vni": vni, "vteps": vteps}
    finally:
        netns_run(PEER_NAMESPACE, "ip", "link", "delete", "tnvx0", check=False)


def ping(instance, sandbox: str, address: str, count: int = 3) -> subprocess.CompletedProcess:
    return instance.exec(sandbox, "ping", "-c", str(count), "-W", "2", "-i", "0.2", address)


def wait_for_http(run, url: str, timeout: float = 15) -> subprocess.CompletedProcess:
    """Call `run(curl argv)` until it succeeds or `timeout` seconds pass; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = run("curl", "-sS", "-m", "2", url)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def iperf3_server(sandbox: str, port: int) -> subprocess.Popen:
    """Start a one-shot iperf3 server inside a sandbox of the instance (ended by the caller by PID)."""
    argv = [sys.executable, "-m", "tapnet.cli", "exec", "--instance", INSTANCE, sandbox, "--", "iperf3", "-s", "-1", "-p", str(port)]
    return subprocess.Popen(argv, cwd=REPO, env=tapnet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_iperf3(run, address: str, port: int, seconds: int = 2) -> dict:
    """Run an iperf3 client through `run(argv)`, retrying while the server starts; return its JSON report."""
    result = None
    for _ in range(20):
        result = run("iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J")
        # iperf3 3.12 may exit 0 with an "error" member, for example before the server listens.
        if result.returncode == 0 and "error" not in json.loads(result.stdout or "{}"):
            return json.loads(result.stdout)
        time.sleep(0.2)
    raise AssertionError(f"iperf3 to {address}:{port} failed: {result.stdout[-2000:]}{result.stderr}")


def frame_lengths(path: Path) -> list[int]:
    """Lengths on the wire of the IPv4 frames in a capture taken with a short snaplen (from the IPv4 total length)."""
    lengths = []
    with open(path, "rb") as stream:
        for _timestamp, data in dpkt.pcap.Reader(stream):
            if len(data) >= 18 and data[12:14] == b"\x08\x00":
                lengths.append(14 + struct.unpack("!H", data[16:18])[0])
    return lengths


# ---- between tapnet sandboxes on two nodes -------------------------------------


def test_ping_across_nodes(live):
    result = ping(live, "client.1", live.extra["server"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0% packet loss" in result.stdout


def test_cross_node_frames_use_vteps(live):
    before = live.stats()

    assert ping(live, "client.1", live.extra["server"], count=2).returncode == 0

    after = live.stats()
    for port in ("node1/vxlan", "node2/vxlan"):
        assert after[port]["tx_packets"] - before[port]["tx_packets"] >= 2, port
        assert after[port]["rx_packets"] - before[port]["rx_packets"] >= 2, port


def test_curl_across_nodes(live):
    url = f"http://{live.extra['server']}:{HTTP_PORT}/"

    result = wait_for_http(lambda *argv: live.exec("client.1", *argv), url)

    assert result.returncode == 0, result.stderr
    assert "Directory listing" in result.stdout


def test_iperf3_across_nodes_within_underlay_mtu(live, tmp_path):
    pcap = tmp_path / "underlay.pcap"
    server = iperf3_server("server.1", 5201)
    try:
        with capture(f"tn-{INSTANCE}-host-node1", "eth0", pcap, "udp port 4789", snaplen=64):
            report = run_iperf3(lambda *argv: live.exec("client.1", *argv, timeout=30), live.extra["server"], 5201)
    finally:
        end_process(server)
    lengths = frame_lengths(pcap)

    assert report["end"]["sum_received"]["bytes"] > 1_000_000
    assert len(lengths) > 500
    # The sender's kernel hands tapnet 64 KiB superframes. tapnet cuts them to
    # the 1450-byte overlay MTU before encapsulating, so full-size datagrams
    # appear and none exceeds the underlay MTU.
    assert max(lengths) <= UNDERLAY_MAX_FRAME
    assert max(lengths) > 1400
    assert live.drops("udp-tx-error") == 0


def test_overlay_networks_isolated(live):
    before = live.drops("isolation")

    result = ping(live, "client.1", live.extra["other"], count=1)

    assert result.returncode != 0, result.stdout
    assert live.drops("isolation") > before


# ---- views and state -------------------------------------------------------------


def test_inspect_shows_docker_overlay_names(live):
    view = json.loads(live.cli("inspect", "ov1").stdout)[0]
    short_id = view["Id"][:5]

    overlay = view["Overlay"]
    assert overlay["VNI"] == 4097
    assert overlay["Nodes"]["node1"]["Bridge"] == f"ov-001001-{short_id}"
    assert overlay["Nodes"]["node1"]["VXLAN"] == f"vx-001001-{short_id}"
    assert overlay["Nodes"]["node1"]["VTEP"] == f"{NODE1_VTEP}:4789"
    assert overlay["Nodes"]["node2"]["VTEP"] == f"{NODE2_VTEP}:4789"
    assert overlay["Nodes"]["node2"]["HostNamespace"] == f"tn-{INSTANCE}-host-node2"
    assert overlay["ExternalPeers"] == [{"IPAddress": PEER_IP, "MacAddress": derived_mac(PEER_IP), "VTEP": f"{PEER_VTEP}:4789"}]


def test_state_lists_underlay_objects(live):
    objects = json.loads((STATE_ROOT / INSTANCE / "state.json").read_text())["objects"]
    roles = {o["name"]: o.get("role") for o in objects if o["kind"] == "netns"}
    veths = {(o["namespace"], o["name"], o["peer_namespace"]) for o in objects if o["kind"] == "veth"}

    assert roles[f"tn-{INSTANCE}-underlay"] == "underlay"
    assert roles[f"tn-{INSTANCE}-host-node1"] == "host"
    assert roles[f"tn-{INSTANCE}-host-node2"] == "host"
    assert roles[PEER_NAMESPACE] == "client"
    assert veths == {
        (f"tn-{INSTANCE}-underlay", "veth2", f"tn-{INSTANCE}-host-node1"),
        (f"tn-{INSTANCE}-underlay", "veth3", f"tn-{INSTANCE}-host-node2"),
        (f"tn-{INSTANCE}-underlay", "veth50", PEER_NAMESPACE),
    }


def test_host_namespace_has_vtep_and_no_default_route(live):
    namespace = f"tn-{INSTANCE}-host-node1"

    sockets = netns_run(namespace, "ss", "-uanH").stdout
    routes = netns_run(namespace, "ip", "route", "show").stdout
    link = netns_run(namespace, "ip", "-br", "link", "show", "eth0").stdout

    assert f"{NODE1_VTEP}:4789" in sockets
    assert "default" not in routes
    assert derived_mac(NODE1_VTEP) in link


# ---- a Linux kernel VXLAN peer ---------------------------------------------------


def test_kernel_peer_pings_sandboxes_on_both_nodes(live, kernel_peer):
    for sandbox in ("client.1", "server.1"):
        result = netns_run(PEER_NAMESPACE, "ping", "-c", "3", "-W", "2", "-i", "0.2", live.address(sandbox, "ov1"), check=False)

        assert result.returncode == 0, f"{sandbox}: {result.stdout}{result.stderr}"


def test_sandbox_pings_kernel_peer(live, kernel_peer):
    # tapnet replies to ARP for the peer from cluster state (ARP suppression).
    result = ping(live, "server.1", PEER_IP)

    assert result.returncode == 0, result.stdout + result.stderr


def test_kernel_peer_tcp_to_sandbox(live, kernel_peer):
    url = f"http://{live.extra['server']}:{HTTP_PORT}/"

    result = wait_for_http(lambda *argv: netns_run(PEER_NAMESPACE, *argv, check=False), url)

    assert result.returncode == 0, result.stderr
    assert "Directory listing" in result.stdout


def test_kernel_peer_iperf3_to_sandbox(live, kernel_peer):
    server = iperf3_server("client.1", 5202)
    try:
        report = run_iperf3(lambda *argv: netns_run(PEER_NAMESPACE, *argv, check=False), live.extra["client"], 5202)
    finally:
        end_process(server)

    assert report["end"]["sum_received"]["bytes"] > 1_000_000


def test_kernel_peer_capture_replays_to_inner_frames(live, kernel_peer, tmp_path):
    pcap = tmp_path / "kernel-vxlan.pcap"
    out = tmp_path / "replayed.pcapng"
    client = live.extra["client"]
    with capture(PEER_NAMESPACE, "eth0", pcap, f"udp dst port 4789 and src host {PEER_VTEP} and dst host {NODE1_VTEP}"):
        netns_run(PEER_NAMESPACE, "ping", "-c", "3", "-W", "2", "-i", "0.2", client)

    result = run_tapnet("replay", "--stack", str(live.stack_path), "-r", str(pcap), "--port", "node1/vxlan", "-w", str(out), "--summary")

    assert result.returncode == 0, result.stderr
    requests = [bytes(packet) for packet in rdpcap(str(pcap))]
    delivered = [bytes(packet) for packet in rdpcap(str(out)) if packet.sniffed_on == "node1/client.1/eth0"]
    assert len(requests) >= 3
    # Decapsulation strips exactly the 50 bytes of outer headers the kernel added.
    assert delivered == [frame[50:] for frame in requests]
    first = dpkt.ethernet.Ethernet(delivered[0])
    assert first.src == bytes.fromhex(derived_mac(PEER_IP).replace(":", ""))
    assert first.dst == bytes.fromhex(derived_mac(client).replace(":", ""))
    assert isinstance(first.data.data, dpkt.icmp.ICMP)
    assert first.data.data.type == dpkt.icmp.ICMP_ECHO


# ---- DNS forwarding from the host namespace --------------------------------------


def test_unknown_name_forwarded_to_upstream(live, tmp_path):
    dnsmasq = subprocess.Popen(
        [
            "ip", "netns", "exec", PEER_NAMESPACE, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", f"--listen-address={PEER_VTEP}", "--bind-interfaces",
            f"--address=/{UPSTREAM_NAME}/{UPSTREAM_ANSWER}", f"--pid-file={tmp_path / 'dnsmasq.pid'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        result = None
        for _ in range(20):  # dnsmasq needs a moment to bind
            result = live.exec("client.1", "dig", "+short", "+time=2", "+tries=1", UPSTREAM_NAME)
            if result.stdout.strip():
                break
            time.sleep(0.2)
    finally:
        end_process(dnsmasq)

    assert result.stdout.strip() == UPSTREAM_ANSWER, result.stdout + result.stderr


# ---- cleanup after a crash ---------------------------------------------------------


def test_sigkill_then_stop_removes_underlay(live_instances):
    text = STACK.replace(f"underlay: {UNDERLAY}", "underlay: 198.18.83.0/24").replace("198.18.82.", "198.18.83.")
    instance = live_instances("lvxk", text)
    made = instance_namespaces("lvxk")
    assert {"tn-lvxk-underlay", "tn-lvxk-host-node1", "tn-lvxk-host-node2", "tn-lvxk-client-kpeer"} <= set(made)
    daemon = instance.daemon_pid()

    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{daemon}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    result = run_tapnet("stop", "--instance", "lvxk")

    assert result.returncode == 0, result.stderr
    assert "veth pairs" in result.stdout
    assert instance_namespaces("lvxk") == []


# ---- the built-in demo -------------------------------------------------------------


def test_demo_worker_reaches_redis_on_both_nodes(live_instances):
    stack = yaml.safe_load((REPO / "tapnet" / "demo.yml").read_text())
    # A relay port of its own, so a demo running on this machine does not collide.
    stack["x-tapnet"]["relay_ports"] = {3000: 23000}
    demo = live_instances("lvdm", yaml.safe_dump(stack, sort_keys=False))  # stack order decides placement
    rows = {row["sandbox"]: row for row in demo.ps()}
    redis = {name: row for name, row in rows.items() if row["service"] == "redis"}
    assert {row["node"] for row in redis.values()} == {"node1", "node2"}

    for name, row in redis.items():
        url = f"http://{row['addresses']['vote']}:6379/"
        result = wait_for_http(lambda *argv: demo.exec("worker.1", *argv), url)

        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert f"served by {row['addresses']['vote']}" in result.stdout
