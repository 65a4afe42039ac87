"""Live traffic between sandboxes through tapnet's datapath (root only).

One instance serves every test of this module: `web` runs an HTTP server as
its stack command, `client` shares network `front` with it, and `other` sits
alone on `back`. The subnets differ from the root namespace's addresses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from livekit import REPO, STATE_ROOT, tapnet_env

pytestmark = pytest.mark.root

INSTANCE = "lvt"
HTTP_PORT = 8080
STACK = f"""
services:
  web:
    command: python3 -m http.server {HTTP_PORT} --bind 0.0.0.0
    networks: [front]
  client:
    networks: [front]
  other:
    networks: [back]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 10.78.1.0/24
  back:
    driver: bridge
    ipam:
      config:
        - subnet: 10.78.2.0/24
"""

# Sends a bounded number of frames of seeded random bytes from inside `client`
# through an AF_PACKET socket on its eth0. Half of them go to the gateway's MAC
# with an IPv4 or ARP EtherType, so they reach the parser's malformed-header
# checks instead of only being flooded.
FLOOD_SCRIPT = """
import random, socket, sys
count, gateway_mac, seed = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
sent = 0
for i in range(count):
    frame = bytearray(rng.randbytes(rng.randint(14, 1514)))
    if i % 2:
        frame[0:6] = gateway_mac
        frame[12:14] = rng.choice([b"\\x08\\x00", b"\\x08\\x06"])
    try:
        sock.send(bytes(frame))
        sent += 1
    except OSError:
        pass
print(sent)
"""


@pytest.fixture(scope="module")
def live(module_instances):
    instance = module_instances(INSTANCE, STACK)
    instance.extra["web"] = instance.address("web.1", "front")
    instance.extra["other"] = instance.address("other.1", "back")
    return instance


def ping(instance, sandbox: str, address: str, count: int = 2) -> subprocess.CompletedProcess:
    return instance.exec(sandbox, "ping", "-c", str(count), "-W", "2", "-i", "0.2", address)


def wait_for_http(instance, url: str, timeout: float = 15) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while True:
        result = instance.exec("client.1", "curl", "-sS", "-m", "2", url)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def test_ping_between_sandboxes_on_one_network(live):
    result = ping(live, "client.1", live.extra["web"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0% packet loss" in result.stdout


def test_ping_gateway(live):
    result = ping(live, "client.1", "10.78.1.1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_isolated_network_unreachable_and_counted(live):
    before = live.drops("isolation")

    result = ping(live, "client.1", live.extra["other"], count=1)

    assert result.returncode != 0, result.stdout
    assert live.drops("isolation") > before


def test_curl_reaches_stack_command_server(live):
    result = wait_for_http(live, f"http://{live.extra['web']}:{HTTP_PORT}/")

    assert result.returncode == 0, result.stderr
    assert "Directory listing" in result.stdout


def test_task_output_goes_to_its_log(live):
    wait_for_http(live, f"http://{live.extra['web']}:{HTTP_PORT}/")

    log_text = (STATE_ROOT / INSTANCE / "logs" / "web.1.log").read_text()

    assert '"GET / HTTP/1.1" 200' in log_text


def test_exec_passes_exit_status_through(live):
    assert live.exec("client.1", "sh", "-c", "exit 7").returncode == 7


def test_exec_sees_sandbox_resolv_conf(live):
    result = live.exec("client.1", "cat", "/etc/resolv.conf")

    assert "nameserver 10.78.1.1" in result.stdout


def test_iperf3_tcp_with_offloads(live):
    server = subprocess.Popen(
        [sys.executable, "-m", "tapnet.cli", "exec", "--instance", INSTANCE, "web.1", "--", "iperf3", "-s", "-1", "-p", "5201"],
        cwd=REPO,
        env=tapnet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        before = live.stats()["node1/client.1/eth0"]
        result = None
        for _ in range(20):  # the server needs a moment to listen
            result = live.exec("client.1", "iperf3", "-c", live.extra["web"], "-p", "5201", "-t", "2", "-J", timeout=30)
            if result.returncode == 0:
                break
            time.sleep(0.2)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        report = json.loads(result.stdout)
        after = live.stats()["node1/client.1/eth0"]
    finally:
        server.kill()
        server.wait()

    assert report["end"]["sum_received"]["bytes"] > 1_000_000
    # With TSO on the TAP the client's kernel hands tapnet superframes, so the
    # average frame read from its port is far above the 1500-byte MTU.
    frames = after["rx_packets"] - before["rx_packets"]
    average = (after["rx_bytes"] - before["rx_bytes"]) / frames
    assert average > 4000


def test_random_flood_counted_and_survived(live):
    gateway_mac = "02420a4e0101"  # 02:42 + 10.78.1.1
    drops_before = sum(sum(p["drops"].values()) for p in live.stats().values())

    result = live.exec("client.1", "python3", "-c", FLOOD_SCRIPT, "3000", gateway_mac, "1", timeout=60)

    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 2500
    assert live.cli("ps").returncode == 0
    drops_after = sum(sum(p["drops"].values()) for p in live.stats().values())
    assert drops_after - drops_before > 100
    assert ping(live, "client.1", live.extra["web"]).returncode == 0
