"""The embedded DNS resolver with real clients: dig, getent and curl inside sandboxes (root only).

One instance serves every test of this module. dnsmasq (from the Debian
package dnsmasq-base) runs in the foreground in the instance's client
namespace on the underlay and is the stack's first DNS upstream. The second
upstream address has no server, so it never replies. The subnets differ
from the root namespace's addresses, and every query stays inside the
instance's namespaces.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from tapnet.netns import client_namespace_name

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("dig") is None or shutil.which("dnsmasq") is None, reason="needs dig and dnsmasq"),
]

INSTANCE = "lvdns"
HTTP_PORT = 8080
UPSTREAM = "198.51.100.60"  # dnsmasq, in the client namespace `resolver`
SILENT_UPSTREAM = "198.51.100.61"  # inside the underlay, with nothing behind it
BIG_TASKS = 36  # their A answer takes 614 bytes: more than 512 and 600, less than 1232
STACK = f"""
x-tapnet:
  underlay: 198.51.100.0/24
  clients:
    resolver: {UPSTREAM}
  dns_upstreams: [{UPSTREAM}, {SILENT_UPSTREAM}]
services:
  web:
    command: python3 -m http.server {HTTP_PORT} --bind 0.0.0.0
    deploy:
      replicas: 2
      endpoint_mode: dnsrr
    networks:
      front:
        aliases: [www]
  big:
    deploy:
      replicas: {BIG_TASKS}
      endpoint_mode: dnsrr
    networks: [front]
  client:
    networks: [front]
  other:
    networks: [back]
  locked:
    networks: [vault]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 10.79.1.0/24
  back:
    driver: bridge
    ipam:
      config:
        - subnet: 10.79.2.0/24
  vault:
    driver: bridge
    internal: true
    ipam:
      config:
        - subnet: 10.79.3.0/24
"""
# Names only dnsmasq knows; the address is data in an answer and is never contacted.
UPSTREAM_HOSTS = "203.0.113.80 outside.example\n"


@pytest.fixture(scope="module")
def live(module_instances):
    instance = module_instances(INSTANCE, STACK)
    instance.extra["web"] = {instance.address(f"web.{n}", "front") for n in (1, 2)}
    return instance


@pytest.fixture(scope="module")
def upstream(live, tmp_path_factory):
    """dnsmasq in the client namespace, stopped by its PID after the module's tests."""
    directory = tmp_path_factory.mktemp("dnsmasq")
    hosts = directory / "hosts"
    hosts.write_text(UPSTREAM_HOSTS)
    log_path = directory / "dnsmasq.log"
    namespace = client_namespace_name(INSTANCE, "resolver")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                "ip", "netns", "exec", namespace,
                "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "-C", "/dev/null",
                f"--addn-hosts={hosts}", f"--listen-address={UPSTREAM}", "--bind-interfaces",
                "--pid-file=", "--user=root", "--log-queries", "--log-facility=-",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_upstream(namespace, process, log_path)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_upstream(namespace: str, process: subprocess.Popen, log_path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dnsmasq exited {process.returncode}: {log_path.read_text()}")
        probe = subprocess.run(
            ["ip", "netns", "exec", namespace, "dig", f"@{UPSTREAM}", "+short", "+time=1", "+tries=1", "outside.example"],
            capture_output=True, text=True,
        )
        if "203.0.113.80" in probe.stdout:
            return
        time.sleep(0.2)
    raise AssertionError(f"dnsmasq did not answer within {timeout} s: {log_path.read_text()}")


def dig(instance, sandbox: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return instance.exec(sandbox, "dig", "+time=3", "+tries=2", *args, timeout=timeout)


def a_records(output: str) -> list[str]:
    return re.findall(r"\sIN\s+A\s+(\d+\.\d+\.\d+\.\d+)", output)


def header_flags(output: str) -> set[str]:
    """Return the header flags dig prints (";; flags: qr rd ra tc; QUERY: ...")."""
    match = re.search(r";; flags: ([a-z ]*);", output)
    return set(match.group(1).split()) if match else set()


def status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    return match.group(1) if match else "(no status)"


def test_dig_service_returns_task_addresses(live):
    result = dig(live, "client.1", "web")
    assert status(result.stdout) == "NOERROR", result.stdout
    assert set(a_records(result.stdout)) == live.extra["web"]


def test_dig_tasks_and_sandbox_names(live):
    assert set(a_records(dig(live, "client.1", "tasks.web").stdout)) == live.extra["web"]
    assert a_records(dig(live, "client.1", "web.2").stdout) == [live.address("web.2", "front")]
    assert a_records(dig(live, "client.1", "web.1.front").stdout) == [live.address("web.1", "front")]


def test_answer_ttl_is_600(live):
    result = dig(live, "client.1", "+noall", "+answer", "web.1")
    assert re.search(r"\s600\s+IN\s+A\s", result.stdout), result.stdout


def test_getent_resolves_alias(live):
    result = live.exec("client.1", "getent", "hosts", "www")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in live.extra["web"]


def test_curl_by_service_name(live):
    deadline = time.monotonic() + 15
    while True:
        result = live.exec("client.1", "curl", "-sS", "-m", "3", f"http://web:{HTTP_PORT}/")
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result.returncode == 0, result.stderr
    assert "Directory listing" in result.stdout


def test_reverse_lookup_names_sandbox(live):
    result = dig(live, "client.1", "+short", "-x", live.address("web.1", "front"))
    assert result.stdout.strip() == "web.1.front."


def test_large_answer_retried_over_tcp(live):
    # Without EDNS0 the limit is 512 bytes (dig 9.18 offers 1232 by default).
    result = dig(live, "client.1", "+noedns", "tasks.big")
    assert "Truncated, retrying in TCP mode" in result.stdout, result.stdout
    assert len(a_records(result.stdout)) == BIG_TASKS


def test_dig_over_tcp(live):
    result = dig(live, "client.1", "+tcp", "web")
    assert set(a_records(result.stdout)) == live.extra["web"]


def test_edns_size_sets_truncation(live):
    result = dig(live, "client.1", "+ignore", "+bufsize=600", "tasks.big")
    assert "tc" in header_flags(result.stdout), result.stdout
    assert 0 < len(a_records(result.stdout)) < BIG_TASKS


def test_aaaa_of_known_name_is_empty(live):
    result = dig(live, "client.1", "AAAA", "web")
    assert status(result.stdout) == "NOERROR"
    assert "ANSWER: 0" in result.stdout


def test_internal_sandbox_resolves_nothing_outside(live, upstream):
    result = dig(live, "locked.1", "outside.example")
    assert status(result.stdout) == "NXDOMAIN", result.stdout


def test_name_on_other_network_is_not_answered_locally(live, upstream):
    result = dig(live, "other.1", "web")
    assert a_records(result.stdout) == [], result.stdout


def test_unknown_name_answered_by_upstream(live, upstream):
    result = dig(live, "client.1", "outside.example")
    assert status(result.stdout) == "NOERROR", result.stdout
    assert a_records(result.stdout) == ["203.0.113.80"]


def test_getent_unknown_name_via_upstream(live, upstream):
    result = live.exec("client.1", "getent", "hosts", "outside.example")
    assert result.stdout.split()[:2] == ["203.0.113.80", "outside.example"], result.stdout + result.stderr


def test_upstreams_silent_gives_servfail(live, upstream):
    upstream.terminate()
    upstream.wait(timeout=10)
    # Each upstream gets 4 s, and the timers run about once a second.
    result = live.exec("client.1", "dig", "+time=15", "+tries=1", "gone.example", timeout=40)
    assert status(result.stdout) == "SERVFAIL", result.stdout
