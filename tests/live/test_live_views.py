"""`tapnet trace`, `capture`, `fdb`, `neigh`, `stats` and `diagram` against a running instance (root only).

One instance serves the module: `web` runs an HTTP server, `client` shares
network `front` with it. The subnet differs from the root namespace's
addresses; every frame stays between the instance's own namespaces.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from livekit import REPO, tapnet_env

pytestmark = pytest.mark.root

INSTANCE = "lvw"
HTTP_PORT = 8080
STACK = f"""
services:
  web:
    command: python3 -m http.server {HTTP_PORT} --bind 0.0.0.0
    networks: [front]
  client:
    networks: [front]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 10.78.9.0/24
"""
CLIENT_TIMEOUT = 60  # seconds a trace or capture client may run in one test


@pytest.fixture(scope="module")
def live(module_instances):
    instance = module_instances(INSTANCE, STACK)
    instance.extra["web"] = instance.address("web.1", "front")
    instance.extra["client"] = instance.address("client.1", "front")
    return instance


def start_client(*args: str) -> subprocess.Popen:
    """Start `tapnet ARGS --instance lvw` in the background; the test ends it."""
    return subprocess.Popen(
        [sys.executable, "-m", "tapnet.cli", *args, "--instance", INSTANCE],
        cwd=REPO,
        env=tapnet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drive_until_done(client: subprocess.Popen, action, timeout: float = CLIENT_TIMEOUT) -> tuple[str, str]:
    """Repeat `action()` until `client` exits (it may subscribe only after the first tries); return its output."""
    deadline = time.monotonic() + timeout
    try:
        while client.poll() is None and time.monotonic() < deadline:
            action()
            time.sleep(0.3)
        return client.communicate(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()


def ping_web(live) -> None:
    live.exec("client.1", "ping", "-c", "1", "-W", "1", live.extra["web"])


def fetch_web(live) -> None:
    live.exec("client.1", "curl", "-sS", "-m", "2", "-o", "/dev/null", f"http://{live.extra['web']}:{HTTP_PORT}/")


def test_trace_prints_icmp_stories_as_json(live):
    client = start_client("trace", "--json", "-c", "2", "icmp and host " + live.extra["web"])
    output, errors = drive_until_done(client, lambda: ping_web(live))

    assert client.returncode == 0, errors
    request, reply = [json.loads(line) for line in output.splitlines()]
    assert request["ingress"] == "node1/client.1/eth0"
    assert request["summary"].startswith(f"IP {live.extra['client']} > {live.extra['web']}: ICMP echo request")
    assert request["verdict"] == "deliver"
    assert request["egress"] == ["node1/web.1/eth0"]
    assert [e["stage"] for e in request["hops"][0]["events"]][0] == "switch"
    assert reply["ingress"] == "node1/web.1/eth0"
    assert "ICMP echo reply" in reply["summary"]
    assert reply["id"] > request["id"]


def test_trace_show_finds_story_later(live):
    client = start_client("trace", "--json", "-c", "1", "icmp")
    output, errors = drive_until_done(client, lambda: ping_web(live))
    story = json.loads(output)

    shown = live.cli("trace", "--show", str(story["id"]), "--json")
    assert json.loads(shown.stdout) == story
    text = live.cli("trace", "--show", str(story["id"])).stdout
    assert text.startswith(f"trace {story['id']} ")
    assert "verdict: deliver to node1/web.1/eth0" in text


def test_trace_with_unmatched_filter_ends_after_duration(live):
    client = start_client("trace", "--duration", "2", "udp port 9")
    output, errors = drive_until_done(client, lambda: ping_web(live), timeout=20)
    assert client.returncode == 0, errors
    assert output == ""
    assert "0 traces" in errors


def test_trace_rejects_invalid_filter(live):
    result = live.cli("trace", "host and", check=False)
    assert result.returncode == 1
    assert "invalid filter 'host and'" in result.stderr


def test_capture_writes_pcapng_tshark_accepts(live, tmp_path):
    path = tmp_path / "web.pcapng"
    client = start_client("capture", "-w", str(path), "-c", "20", f"tcp port {HTTP_PORT}")
    _, errors = drive_until_done(client, lambda: fetch_web(live))
    assert client.returncode == 0, errors
    assert "20 frames captured" in errors

    problems = subprocess.run(
        [
            "tshark", "-r", str(path),
            "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
            "-Y", "_ws.malformed || _ws.expert.severity >= error",
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert problems.returncode == 0, problems.stderr
    assert problems.stdout == ""

    fields = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t", "-e", "frame.interface_name", "-e", "frame.comment", "-e", "tcp.port"],
        capture_output=True, text=True, timeout=60,
    )
    rows = [line.split("\t") for line in fields.stdout.splitlines()]
    assert len(rows) == 20
    assert {row[0] for row in rows} == {"node1/client.1/eth0", "node1/web.1/eth0"}
    assert all(row[1].startswith("trace ") for row in rows)
    assert all(str(HTTP_PORT) in row[2].split(",") for row in rows)


def test_capture_ends_cleanly_on_sigint(live, tmp_path):
    path = tmp_path / "interrupted.pcapng"
    client = start_client("capture", "-w", str(path), "icmp")
    try:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while (not path.exists() or path.stat().st_size < 200) and time.monotonic() < deadline:
            ping_web(live)
            time.sleep(0.3)
        client.send_signal(signal.SIGINT)
        _, errors = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()

    assert client.returncode == 0, errors
    count = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"], capture_output=True, text=True, timeout=60)
    assert count.returncode == 0, count.stderr
    assert len(count.stdout.split()) >= 2


def test_fdb_shows_learned_macs(live):
    ping_web(live)
    lines = live.cli("fdb").stdout.splitlines()
    web_mac = "02:42:" + ":".join(f"{int(part):02x}" for part in live.extra["web"].split("."))
    assert any(line.startswith(f"{web_mac} dev node1/web.1/eth0 master front used ") for line in lines), lines


def test_neigh_shows_gateway_and_vips(live):
    rows = json.loads(live.cli("neigh", "--json", "--network", "front").stdout)
    roles = {row["ip"]: row["role"] for row in rows}
    assert roles["10.78.9.1"] == "gateway"
    assert sorted(role for role in roles.values()) == ["gateway", "vip", "vip"]


def test_stats_counts_port_traffic(live):
    ping_web(live)
    stats = live.stats()
    assert stats["node1/client.1/eth0"]["rx_packets"] > 0
    text = live.cli("stats").stdout
    assert "node1/web.1/eth0:" in text


def test_diagram_of_running_instance(live, tmp_path):
    path = tmp_path / "lvw.svg"
    live.cli("diagram", "-o", str(path))
    svg = path.read_text()
    for name in ("node1", "web.1", "client.1", "front", "10.78.9.0/24"):
        assert name in svg
