"""The ingress routing mesh on a live instance, and a SYN flood against a VIP (root only).

`web` publishes 3000:80 and runs only on node1, so a request to node2's
underlay address crosses the VXLAN tunnel on the ingress network. A client
namespace on the underlay reaches every node's address; the test process
reaches the loopback relay on 127.0.0.1 only. The instance runs with a small
conntrack table (`--conntrack-max`), so a bounded SYN flood fills it.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from livekit import (
    START_TIMEOUT,
    LiveInstance,
    end_process,
    instance_etc_dirs,
    instance_namespaces,
    netns_run,
    run_tapnet,
    stop_and_check,
)
from tapnet.model import format_mac, mac_for_ip

pytestmark = pytest.mark.root

INSTANCE = "lmesh"
OTHER_INSTANCE = "lmeshb"
UNDERLAY = "198.51.100.0/24"
NODE_ADDRESSES = {"node1": "198.51.100.2", "node2": "198.51.100.3"}  # `.(n + 2)` in node order
CLIENT_ADDRESS = "198.51.100.60"
SUBNET = "10.82.1.0/24"
SPOOFED_SOURCE = "10.82.1.250"  # free in SUBNET, so the tasks' SYN-ACKs reach no one and entries stay unreplied
PUBLISHED = 3000
CONNTRACK_MAX = 256
FLOOD_FRAMES = 3000
ROOT_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mesh_stack(subnet: str, relay_port: int) -> str:
    return f"""
x-tapnet:
  nodes: [node1, node2]
  underlay: {UNDERLAY}
  placement:
    web: node1
    echo: node1
    client: node1
  clients:
    probe: {CLIENT_ADDRESS}
  relay_ports:
    {PUBLISHED}: {relay_port}
x-reply-server: &reply-server |
  import http.server, sys
  class Reply(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
          body = ("served by %s\\n" % self.connection.getsockname()[0]).encode()
          self.send_response(200)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
  http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Reply).serve_forever()
x-echo-server: &echo-server |
  import socketserver
  class Echo(socketserver.StreamRequestHandler):
      def handle(self):
          for line in self.rfile:
              self.wfile.write(line)
  socketserver.ThreadingTCPServer.allow_reuse_address = True
  socketserver.ThreadingTCPServer(("0.0.0.0", 7), Echo).serve_forever()
services:
  web:
    command: [/usr/bin/python3, -c, *reply-server, "80"]
    deploy:
      replicas: 2
    ports: ["{PUBLISHED}:80"]
    networks: [apps]
  echo:
    command: [/usr/bin/python3, -c, *echo-server]
    networks: [apps]
  client:
    networks: [apps]
networks:
  apps:
    driver: overlay
    ipam:
      config:
        - subnet: {subnet}
"""


# Sends the frames of a file, one hex line each, through an AF_PACKET socket on
# eth0, paced so that the TAP queue (1000 frames) does not overflow. Prints how
# many were sent.
SEND_SCRIPT = """
import socket, sys, time
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
sent = 0
for i, line in enumerate(open(sys.argv[1])):
    try:
        sock.send(bytes.fromhex(line.strip()))
        sent += 1
    except OSError:
        pass
    if i % 100 == 99:
        time.sleep(0.02)
print(sent)
"""


def syn_flood_frames(client_ip: str, vip: str, count: int, seed: int) -> list[bytes]:
    """Build `count` TCP SYNs from SPOOFED_SOURCE to `vip`:80, with distinct random source ports, sent from client.1's MAC."""
    rng = random.Random(seed)
    template = Ether(src=format_mac(mac_for_ip(ipaddress.IPv4Address(client_ip))), dst=format_mac(mac_for_ip(ipaddress.IPv4Address(vip))))
    return [
        bytes(template / IP(src=SPOOFED_SOURCE, dst=vip) / TCP(sport=sport, dport=80, flags="S", seq=rng.getrandbits(32)))
        for sport in rng.sample(range(1024, 65536), count)
    ]


# Holds one TCP connection to the echo service across the flood: echoes a line,
# waits for a line on stdin, then echoes another on the same connection.
ESTABLISHED_SCRIPT = """
import socket, sys
sock = socket.create_connection(("echo", 7), timeout=20)
stream = sock.makefile("rwb")
for word in (b"before", b"after"):
    if word == b"after":
        sys.stdin.readline()
    stream.write(word + b"\\n")
    stream.flush()
    print(stream.readline().decode().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def relay_port() -> int:
    return free_loopback_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, relay_port):
    assert not instance_namespaces(INSTANCE), f"namespaces of {INSTANCE} exist before the test"
    root_forwarding = ROOT_IP_FORWARD.read_text()
    path = tmp_path_factory.mktemp("mesh") / f"{INSTANCE}.yml"
    path.write_text(mesh_stack(SUBNET, relay_port))
    try:
        completed = run_tapnet(
            "start", str(path), "--instance", INSTANCE, "--detach", "--conntrack-max", str(CONNTRACK_MAX), timeout=START_TIMEOUT
        )
        instance = LiveInstance(INSTANCE, path, completed.stdout)
        assert completed.returncode == 0, completed.stderr + instance.daemon_log()[-3000:]
        instance.extra["root_forwarding"] = root_forwarding
        wait_for_tasks(instance)
        yield instance
    finally:
        problems = stop_and_check(INSTANCE)
        assert not problems, "; ".join(problems)


def wait_for_tasks(instance, timeout: float = 20.0) -> None:
    """Wait until every web task and the echo task accept connections."""
    deadline = time.monotonic() + timeout
    targets = [(row["addresses"]["apps"], 80) for row in instance.ps() if row["service"] == "web"] + [("echo", 7)]
    for host, port in targets:
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
        while True:
            result = instance.exec("client.1", "python3", "-c", probe, timeout=10)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, f"{host}:{port} not served: {result.stderr}"
            time.sleep(0.3)


def ingress_addresses(instance) -> set[str]:
    return {row["addresses"]["ingress"] for row in instance.ps() if row["service"] == "web"}


def curl_from_client(instance, url: str) -> str:
    result = netns_run(f"tn-{instance.name}-client-probe", "curl", "-sS", "-m", "5", url, check=False)
    assert result.returncode == 0, f"{url}: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize("node", sorted(NODE_ADDRESSES))
def test_published_port_answers_on_every_node(live, node):
    servers = {curl_from_client(live, f"http://{NODE_ADDRESSES[node]}:{PUBLISHED}/").split()[-1] for _ in range(4)}

    assert servers == ingress_addresses(live)


def test_relay_answers_on_loopback(live, relay_port):
    servers = set()
    for _ in range(4):
        result = subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{relay_port}/"], capture_output=True, text=True, timeout=15)
        assert result.returncode == 0, result.stderr
        servers.add(result.stdout.split()[-1])

    assert servers == ingress_addresses(live)


def test_rules_and_forwarding_inside_host_namespaces_only(live):
    for node, address in NODE_ADDRESSES.items():
        namespace = f"tn-{INSTANCE}-host-{node}"
        rules = netns_run(namespace, "nft", "list", "table", "ip", "tapnet").stdout
        forwarding = netns_run(namespace, "sysctl", "-n", "net.ipv4.ip_forward").stdout
        link = netns_run(namespace, "ip", "-o", "addr", "show", "dev", "gwbridge").stdout

        assert f"ip daddr {address} tcp dport {PUBLISHED} dnat to 172.18.0.2:{PUBLISHED}" in rules
        assert "hook prerouting" in rules
        assert "hook output" in rules
        assert forwarding.strip() == "1"
        assert "172.18.0.1/16" in link
    assert ROOT_IP_FORWARD.read_text() == live.extra["root_forwarding"]


def test_scaled_tasks_join_and_leave_mesh(live):
    live.cli("scale", "web=3", timeout=120)
    wait_for_tasks(live)
    three = ingress_addresses(live)
    servers_after_up = {curl_from_client(live, f"http://{NODE_ADDRESSES['node2']}:{PUBLISHED}/").split()[-1] for _ in range(6)}

    live.cli("scale", "web=2", timeout=120)
    two = ingress_addresses(live)
    servers_after_down = {curl_from_client(live, f"http://{NODE_ADDRESSES['node2']}:{PUBLISHED}/").split()[-1] for _ in range(6)}

    assert len(three) == 3
    assert servers_after_up == three
    assert len(two) == 2
    assert servers_after_down == two


def test_relay_port_in_use_fails_start(live, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / f"{OTHER_INSTANCE}.yml"
        path.write_text(mesh_stack("10.82.2.0/24", port))
        try:
            completed = run_tapnet("start", str(path), "--instance", OTHER_INSTANCE, "--detach", timeout=START_TIMEOUT)

            assert completed.returncode == 1
            assert f"relay port 127.0.0.1:{port} for published port {PUBLISHED} is already in use" in completed.stderr
            assert instance_namespaces(OTHER_INSTANCE) == []
            assert instance_etc_dirs(OTHER_INSTANCE) == []
        finally:
            problems = stop_and_check(OTHER_INSTANCE)
            assert not problems, "; ".join(problems)


def test_syn_flood_fills_conntrack_and_spares_other_flows(live, tmp_path):
    web_vip = json.loads(live.cli("inspect", "web").stdout)[0]["Endpoint"]["VirtualIPs"]
    vip = next(v["Addr"].split("/")[0] for v in web_vip if v["NetworkID"] == "apps")
    client_ip = live.address("client.1", "apps")
    namespace = f"tn-{INSTANCE}-client.1"
    established = subprocess.Popen(
        ["ip", "netns", "exec", namespace, "python3", "-c", ESTABLISHED_SCRIPT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert established.stdout.readline().strip() == "before", established.stderr.read()
        before = json.loads(live.cli("conntrack", "--json", "--count", "--node", "node1").stdout)["node1"]

        frames_path = tmp_path / "syn-flood.hex"
        frames_path.write_text("".join(frame.hex() + "\n" for frame in syn_flood_frames(client_ip, vip, FLOOD_FRAMES, seed=7)))
        flood = live.exec("client.1", "python3", "-c", SEND_SCRIPT, str(frames_path), timeout=120)
        assert flood.returncode == 0, flood.stderr
        assert int(flood.stdout) == FLOOD_FRAMES

        curl = live.exec("client.1", "curl", "-sS", "-m", "5", "http://web/")
        established.stdin.write("go\n")
        established.stdin.flush()
        after_echo = established.stdout.readline().strip()
        after = json.loads(live.cli("conntrack", "--json", "--count", "--node", "node1").stdout)["node1"]
    finally:
        end_process(established)

    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.startswith("served by ")
    assert after_echo == "after"
    assert after["max"] == CONNTRACK_MAX
    assert after["count"] == CONNTRACK_MAX
    # Every flood SYN beyond the free room evicted an unreplied entry, less up to 200 SYNs the TAP queue may drop.
    # No flow was rejected, because an unreplied entry can always be evicted.
    assert after["evictions"] - before["evictions"] >= FLOOD_FRAMES - CONNTRACK_MAX - 200
    assert after["overflows"] == before["overflows"]
    assert live.cli("ps").returncode == 0
