"""Benchmark: dnsperf against tapnet's embedded DNS resolver and against dnsmasq, in one run.

    sudo python perf/bench_dns.py [--seconds S] [--runs N] [--outstanding Q] [--json FILE]

Two setups answer the same queries for the same names:

- tapnet: `tapnet start --detach` of a stack with a dnsrr service `web`
  (two tasks) and a sandbox `client.1` on one bridge network. dnsperf runs
  inside client.1 against the network's gateway, where tapnet's resolver
  answers; every query and answer crosses client.1's TAP and the Python
  datapath.
- dnsmasq: two namespaces of their own, `tn-bdns-dnsclient` and
  `tn-bdns-dnsmasq`, joined by a veth pair created inside them. dnsmasq
  (Debian dnsmasq-base) runs in the foreground in the second one with
  `--no-resolv --no-hosts -C /dev/null --addn-hosts=FILE`, where FILE holds
  the names of the tapnet stack with the same addresses. dnsperf runs in the
  first one.

Queries (A, in equal parts): `web` (two addresses), `tasks.web`, `web.1` and
`client.1`. Every name is known to both servers, so nothing is forwarded.
dnsperf keeps Q queries outstanding for S seconds per run; the script prints
the median over the runs of queries per second, mean latency and lost
queries.

Every namespace and link this script makes is named `tn...`, nothing is
created in the root namespace, and traffic goes only between those
namespaces. Everything is removed again at the end, also after an error or
Ctrl-C (SIGTERM is handled like Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

INSTANCE = "bdns"
TAPNET_SUBNET = "10.80.1.0/24"  # must differ from every root-namespace address
PAIR_SUBNET = "10.80.2.0/24"  # the veth pair between dnsperf's and dnsmasq's namespaces
CLIENT_NAMESPACE = "tn-bdns-dnsclient"
SERVER_NAMESPACE = "tn-bdns-dnsmasq"
CLIENT_ADDRESS = "10.80.2.1"
SERVER_ADDRESS = "10.80.2.2"
QUERY_NAMES = ("web", "tasks.web", "web.1", "client.1")
TAPNET_TIMEOUT = 200.0  # seconds for `tapnet start`; the first start of new code compiles numba
DNSMASQ_START_TIMEOUT = 10.0  # seconds for dnsmasq to answer its first query

STACK = f"""\
services:
  web:
    deploy:
      replicas: 2
      endpoint_mode: dnsrr
    networks: [bench]
  client:
    networks: [bench]
networks:
  bench:
    driver: bridge
    ipam:
      config:
        - subnet: {TAPNET_SUBNET}
"""


class BenchError(Exception):
    pass


@dataclass
class Measurement:
    setup: str
    run: int
    qps: float
    latency_ms: float
    lost: int
    completed: int


def run(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip() or completed.stdout.strip()}")
    return completed


def in_ns(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def tapnet(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, "-m", "tapnet.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and completed.returncode != 0:
        raise BenchError(f"tapnet {' '.join(args)} exited {completed.returncode}: {completed.stderr.strip()}")
    return completed


def check_environment() -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (namespaces, TAP devices); run it with sudo")
    for tool in ("ip", "dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found; install iproute2, dnsperf and dnsmasq-base")
    ours = [ipaddress.ip_network(TAPNET_SUBNET), ipaddress.ip_network(PAIR_SUBNET)]
    for line in run(["ip", "-o", "addr", "show"]).stdout.splitlines():
        address = ipaddress.ip_interface(line.split()[3])
        for subnet in ours:
            if address.version == subnet.version and address.network.overlaps(subnet):
                raise BenchError(f"{subnet} overlaps {address} of the root namespace; edit the subnets at the top of this script")


def parse_dnsperf(output: str) -> tuple[float, float, int, int]:
    """Return (queries per second, mean latency in ms, queries lost, queries completed) from dnsperf's report."""

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise BenchError(f"dnsperf output lacks {pattern!r}:\n{output}")
        return float(match.group(1))

    qps = number(r"Queries per second:\s+([\d.]+)")
    latency = number(r"Average Latency \(s\):\s+([\d.]+)") * 1000
    lost = int(number(r"Queries lost:\s+(\d+)"))
    completed = int(number(r"Queries completed:\s+(\d+)"))
    return qps, latency, lost, completed


def dnsperf(namespace: str, server: str, queries: Path, seconds: float, outstanding: int) -> tuple[float, float, int, int]:
    argv = in_ns(namespace, "dnsperf", "-s", server, "-d", str(queries), "-l", str(seconds), "-q", str(outstanding), "-t", "2")
    return parse_dnsperf(run(argv, timeout=seconds + 30).stdout)


# ---- setups -------------------------------------------------------------------


@contextlib.contextmanager
def tapnet_instance(directory: Path):
    """Start the benchmark stack; yield (client namespace, resolver address, {name: addresses})."""
    stack_path = directory / "bench-dns.yml"
    stack_path.write_text(STACK)
    try:
        tapnet("start", str(stack_path), "--instance", INSTANCE, "--detach", timeout=TAPNET_TIMEOUT)
        rows = json.loads(tapnet("ps", "--instance", INSTANCE, "--json").stdout)
        by_sandbox = {row["sandbox"]: row for row in rows}
        addresses = {
            "web": [by_sandbox["web.1"]["addresses"]["bench"], by_sandbox["web.2"]["addresses"]["bench"]],
            "web.1": [by_sandbox["web.1"]["addresses"]["bench"]],
            "client.1": [by_sandbox["client.1"]["addresses"]["bench"]],
        }
        namespace = by_sandbox["client.1"]["namespace"]
        resolver = str(next(ipaddress.ip_network(TAPNET_SUBNET).hosts()))
        yield namespace, resolver, addresses
    finally:
        tapnet("stop", "--instance", INSTANCE, timeout=60, check=False)


@contextlib.contextmanager
def dnsmasq_pair(directory: Path, addresses: dict[str, list[str]]):
    """Create the two namespaces with their veth pair and start dnsmasq; yield the server address."""
    hosts = directory / "hosts"
    lines = []
    for name, ips in addresses.items():
        lines += [f"{ip} {name}" for ip in ips]
    lines += [f"{ip} tasks.web" for ip in addresses["web"]]
    hosts.write_text("\n".join(lines) + "\n")

    created: list[str] = []
    process = None
    try:
        for namespace in (CLIENT_NAMESPACE, SERVER_NAMESPACE):
            run(["ip", "netns", "add", namespace])
            created.append(namespace)
            run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        # The pair is created inside the client namespace, so no link ever appears in the root namespace.
        run(["ip", "-n", CLIENT_NAMESPACE, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", SERVER_NAMESPACE])
        prefix = ipaddress.ip_network(PAIR_SUBNET).prefixlen
        for namespace, address in ((CLIENT_NAMESPACE, CLIENT_ADDRESS), (SERVER_NAMESPACE, SERVER_ADDRESS)):
            run(["ip", "-n", namespace, "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
            run(["ip", "-n", namespace, "link", "set", "eth0", "up"])

        process = subprocess.Popen(
            in_ns(
                SERVER_NAMESPACE, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "-C", "/dev/null",
                f"--addn-hosts={hosts}", f"--listen-address={SERVER_ADDRESS}", "--bind-interfaces",
                "--pid-file=", "--user=root", "--cache-size=1000",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_dnsmasq(process)
        yield SERVER_ADDRESS
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in reversed(created):
            run(["ip", "netns", "delete", namespace], check=False)


def wait_for_dnsmasq(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + DNSMASQ_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"dnsmasq exited {process.returncode}: {process.stderr.read()}")
        probe = run(in_ns(CLIENT_NAMESPACE, "dig", f"@{SERVER_ADDRESS}", "+short", "+time=1", "+tries=1", "web.1"), check=False)
        if probe.stdout.strip():
            return
        time.sleep(0.2)
    raise BenchError(f"dnsmasq did not answer within {DNSMASQ_START_TIMEOUT:g} s")


# ---- main -------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> list[Measurement]:
    results = []
    with tempfile.TemporaryDirectory(prefix="tn-bench-dns-") as tmp:
        directory = Path(tmp)
        queries = directory / "queries"
        queries.write_text("".join(f"{name} A\n" for name in QUERY_NAMES))
        with tapnet_instance(directory) as (client, resolver, addresses), dnsmasq_pair(directory, addresses) as server:
            for number in range(1, args.runs + 1):
                for setup, namespace, address in (("tapnet", client, resolver), ("dnsmasq", CLIENT_NAMESPACE, server)):
                    qps, latency, lost, completed = dnsperf(namespace, address, queries, args.seconds, args.outstanding)
                    results.append(Measurement(setup, number, qps, latency, lost, completed))
                    print(f"run {number} {setup:8} {qps:10.0f} queries/s  {latency:8.3f} ms  lost {lost}", flush=True)
    return results


def summary(results: list[Measurement]) -> dict[str, dict[str, float]]:
    out = {}
    for setup in ("tapnet", "dnsmasq"):
        rows = [r for r in results if r.setup == setup]
        out[setup] = {
            "qps": statistics.median(r.qps for r in rows),
            "latency_ms": statistics.median(r.latency_ms for r in rows),
            "lost": statistics.median(r.lost for r in rows),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="dnsperf run length in seconds (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per setup (default 3)")
    parser.add_argument("--outstanding", type=int, default=100, help="queries dnsperf keeps outstanding (default 100)")
    parser.add_argument("--json", type=Path, help="also write the measurements and medians to this JSON file")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        check_environment()
        results = measure(args)
    except (BenchError, subprocess.TimeoutExpired) as error:
        print(f"bench_dns: {error}", file=sys.stderr)
        return 1

    medians = summary(results)
    print("\nmedian over runs:")
    for setup, values in medians.items():
        print(f"  {setup:8} {values['qps']:10.0f} queries/s  {values['latency_ms']:8.3f} ms  lost {values['lost']:g}")
    ratio = medians["tapnet"]["qps"] / medians["dnsmasq"]["qps"]
    print(f"  tapnet / dnsmasq: {ratio:.2f} of the query rate")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in results], "median": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
