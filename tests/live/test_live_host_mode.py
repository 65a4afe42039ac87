"""A port published in host mode on a live instance (root only).

`web` runs one task, on node1, and publishes 8080 -> 80 in host mode. A
client namespace on the underlay reaches it at node1's address only, and the
task's reply server reports the client's own address as peer.
"""

from __future__ import annotations

import time

import pytest

from livekit import netns_run

pytestmark = pytest.mark.root

INSTANCE = "lhost"
UNDERLAY = "198.51.100.0/24"
NODE_ADDRESSES = {"node1": "198.51.100.2", "node2": "198.51.100.3"}  # `.(n + 2)` in node order
CLIENT_ADDRESS = "198.51.100.61"
SUBNET = "10.83.1.0/24"
PUBLISHED = 8080
CURL_TIMEOUT = 3  # seconds for one request

STACK = f"""
x-tapnet:
  nodes: [node1, node2]
  underlay: {UNDERLAY}
  placement:
    web: node1
  clients:
    probe: {CLIENT_ADDRESS}
services:
  web:
    command:
      - /usr/bin/python3
      - -c
      - |
        import http.server
        class Peer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = ("peer %s\\n" % self.client_address[0]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        http.server.ThreadingHTTPServer(("0.0.0.0", 80), Peer).serve_forever()
    ports:
      - {{target: 80, published: {PUBLISHED}, mode: host}}
    networks: [apps]
networks:
  apps:
    driver: overlay
    ipam:
      config:
        - subnet: {SUBNET}
"""


@pytest.fixture(scope="module")
def live(module_instances):
    return module_instances(INSTANCE, STACK)


def curl_from_client(node: str) -> tuple[int, str, str]:
    result = netns_run(
        f"tn-{INSTANCE}-client-probe", "curl", "-sS", "-m", str(CURL_TIMEOUT), f"http://{NODE_ADDRESSES[node]}:{PUBLISHED}/",
        check=False, timeout=CURL_TIMEOUT + 10,
    )
    return result.returncode, result.stdout, result.stderr


def wait_for_answer(timeout: float = 20.0) -> str:
    """Return the first response body from node1's published port, retrying while the task's server starts."""
    deadline = time.monotonic() + timeout
    while True:
        code, out, err = curl_from_client("node1")
        if code == 0:
            return out
        assert time.monotonic() < deadline, f"no answer on node1:{PUBLISHED}: {err}"
        time.sleep(0.3)


def test_task_runs_on_node1(live):
    assert [row["node"] for row in live.ps() if row["service"] == "web"] == ["node1"]


def test_node_with_task_answers_with_client_address(live):
    answer = wait_for_answer()

    assert answer.strip() == f"peer {CLIENT_ADDRESS}"


def test_node_without_task_does_not_answer(live):
    wait_for_answer()

    code, out, err = curl_from_client("node2")

    assert code != 0, out
    assert out == ""


def test_rule_only_in_host_namespace_of_task_node(live):
    task_ip = live.address("web.1", "apps")
    node1 = netns_run(f"tn-{INSTANCE}-host-node1", "nft", "list", "table", "ip", "tapnet").stdout
    node2 = netns_run(f"tn-{INSTANCE}-host-node2", "nft", "list", "table", "ip", "tapnet", check=False)
    route = netns_run(f"tn-{INSTANCE}-host-node1", "ip", "route", "show", task_ip).stdout

    assert f"ip daddr {NODE_ADDRESSES['node1']} tcp dport {PUBLISHED} dnat to {task_ip}:80" in node1
    assert str(PUBLISHED) not in node2.stdout
    assert "via 172.18.0.2 dev gwbridge" in route
