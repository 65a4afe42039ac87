"""Service VIPs on a live instance: DNS to the VIP, round-robin over tasks, `tapnet scale`, and the load-balancer views (root only).

`web` runs a small HTTP server that replies with the address the request
reached, so each reply names the task that served it. The tasks spread over
two nodes, so some requests cross the VXLAN tunnel. The tests run in order
on one instance: they scale `web` up and then down.
"""

from __future__ import annotations

import json
import time

import pytest

from livekit import ETC_NETNS_DIR, NETNS_DIR, STATE_ROOT

pytestmark = pytest.mark.root

INSTANCE = "lvip"
SUBNET = "10.81.1.0/24"
STACK = f"""
x-tapnet:
  nodes: [node1, node2]
  placement:
    client: node1
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
services:
  web:
    command: [/usr/bin/python3, -c, *reply-server, "80"]
    deploy:
      replicas: 2
    networks: [apps]
  client:
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


def task_addresses(instance) -> dict[str, str]:
    return {row["sandbox"]: row["addresses"]["apps"] for row in instance.ps() if row["service"] == "web"}


def served_by(instance, requests: int) -> list[str]:
    """Fetch http://web/ from client.1 `requests` times; return the address named by each reply."""
    servers = []
    for _ in range(requests):
        result = instance.exec("client.1", "curl", "-sS", "-m", "3", "http://web/")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("served by "), result.stdout
        servers.append(result.stdout.split()[-1])
    return servers


def wait_until_serving(instance, sandboxes: dict[str, str], timeout: float = 20.0) -> None:
    """Wait until the server of every task in `sandboxes` accepts requests on the task's own address."""
    deadline = time.monotonic() + timeout
    for address in sandboxes.values():
        while True:
            result = instance.exec("client.1", "curl", "-sS", "-m", "2", f"http://{address}/")
            if result.returncode == 0 or time.monotonic() > deadline:
                assert result.returncode == 0, f"task at {address} does not serve: {result.stderr}"
                break
            time.sleep(0.3)


def test_service_name_resolves_to_vip(live):
    vip = json.loads(live.cli("inspect", "web").stdout)[0]["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]

    result = live.exec("client.1", "getent", "hosts", "web")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == vip


def test_repeated_requests_reach_every_task(live):
    tasks = task_addresses(live)
    wait_until_serving(live, tasks)

    servers = served_by(live, 6)

    assert set(servers) == set(tasks.values())


def test_views_show_connections_to_vip(live):
    vip = json.loads(live.cli("inspect", "web").stdout)[0]["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]
    served_by(live, 2)

    conntrack = json.loads(live.cli("conntrack", "--json", "--node", "node1").stdout)
    lb = json.loads(live.cli("lb", "--json").stdout)
    text = live.cli("conntrack").stdout
    inspect = json.loads(live.cli("inspect", "web").stdout)[0]

    entries = conntrack["node1"]["entries"]
    assert any(e["orig"]["dst"] == vip and e["orig"]["dport"] == 80 for e in entries)
    assert conntrack["node1"]["count"] == len(entries)
    assert f"dst={vip} sport=" in text
    web_rows = [row for row in lb["node1"] if row["service"] == "web"]
    assert len(web_rows) == 1
    assert {b["sandbox"] for b in web_rows[0]["backends"]} == {"web.1", "web.2"}
    assert sum(b["active"] for b in web_rows[0]["backends"]) >= 2
    assert inspect["LoadBalancer"]["VirtualServers"]["node1"][0]["vip"] == vip
    assert inspect["LoadBalancer"]["Connections"]["node1"]


def test_conntrack_rejects_unknown_node(live):
    result = live.cli("conntrack", "--node", "nowhere", check=False)

    assert result.returncode == 1
    assert "no node named 'nowhere'" in result.stderr


def test_scale_up_adds_served_task(live):
    result = live.cli("scale", "web=3", timeout=120)
    tasks = task_addresses(live)

    assert "added web.3" in result.stdout
    assert set(tasks) == {"web.1", "web.2", "web.3"}
    assert (NETNS_DIR / f"tn-{INSTANCE}-web.3").exists()
    assert (ETC_NETNS_DIR / f"tn-{INSTANCE}-web.3" / "resolv.conf").exists()
    wait_until_serving(live, tasks)
    assert set(served_by(live, 6)) == set(tasks.values())


def test_scale_down_leaves_only_remaining_task(live):
    result = live.cli("scale", "web=1", timeout=120)
    tasks = task_addresses(live)

    assert "removed web.2, web.3" in result.stdout
    assert set(tasks) == {"web.1"}
    assert set(served_by(live, 4)) == {tasks["web.1"]}
    for sandbox in ("web.2", "web.3"):
        assert not (NETNS_DIR / f"tn-{INSTANCE}-{sandbox}").exists()
        assert not (ETC_NETNS_DIR / f"tn-{INSTANCE}-{sandbox}").exists()
    state = json.loads((STATE_ROOT / INSTANCE / "state.json").read_text())
    assert not [o for o in state["objects"] if o.get("sandbox") in ("web.2", "web.3")]
    assert live.exec("client.1", "getent", "hosts", "tasks.web").stdout.split()[0] == tasks["web.1"]


def test_scale_rejects_unknown_service(live):
    result = live.cli("scale", "nothing=2", check=False)

    assert result.returncode == 1
    assert "unknown service 'nothing'" in result.stderr


def test_scale_rejects_malformed_request(live):
    result = live.cli("scale", "web", check=False)

    assert result.returncode == 1
    assert "expected SERVICE=REPLICAS" in result.stderr
