"""Benchmark: two sandboxes on a Linux bridge, on vde_switch and on tapnet, measured in one run.

    sudo python perf/bench_live.py [--seconds S] [--runs N] [--payload BYTES] [--skip-demo] [--json FILE]

Each setup joins two network namespaces, A and B, on one layer-2 segment:

- linux bridge: a bridge in a namespace of its own, and a veth pair from it
  to each of A and B;
- vde_switch: `vde_switch` (Debian vde2) started inside a namespace of its
  own with two TAP ports, each TAP then moved into A or B (the switch keeps
  its fd);
- tapnet: `tapnet start --detach` of a stack with two services on one bridge
  network (sandboxes a.1 and b.1).

Every namespace and link this script makes is named `tn...`, and nothing is
created in the root namespace. Everything is removed again at the end, also
after an error or Ctrl-C (SIGTERM is handled like Ctrl-C).

Per setup and run, from A to B:

- small packets: `udp_mmsg` (perf/udp_mmsg.c, built with gcc into perf/out/)
  sends UDP datagrams of PAYLOAD bytes with sendmmsg as fast as it can. The
  sink in B counts with recvmmsg what arrives during S seconds after a 0.5 s
  warm-up. The default payload of 18 bytes makes 60-byte Ethernet frames,
  which are 64 bytes on a wire with the FCS. For vde_switch and tapnet the
  switch process's CPU time per datagram received is measured too;
- TCP throughput: iperf3 for S seconds;
- ping round trip: the median of PING_COUNT echoes 50 ms apart.

Also measured: the time from `tapnet start` to the first successful ping
(with numba's cache warmed before), and the daemon's RSS, for the benchmark
stack and for the built-in demo. The script ends with the ratios against
the project's goals, from the medians over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "perf" / "out"
SENDER_SOURCE = REPO / "perf" / "udp_mmsg.c"
SENDER_BINARY = OUT_DIR / "udp_mmsg"

# Subnets of the three setups; each must differ from every root-namespace address.
SUBNETS = {"linux bridge": "10.77.1.0/24", "vde_switch": "10.77.2.0/24", "tapnet": "10.77.3.0/24"}
UDP_PORT = 9000
IPERF_PORT = 5201
PING_COUNT = 20
PING_INTERVAL = 0.05  # seconds between echoes (root may go below ping's 0.2 s floor)
SMALL_PACKET_WARMUP = 0.5  # seconds the sink skips after the first datagram
DEMO_SETTLE = 3.0  # seconds the demo runs before its RSS is read
STARTUP_PING_DEADLINE = 30.0  # seconds after `tapnet start` returns to wait for a first ping reply
TAPNET_TIMEOUT = 200.0  # seconds for `tapnet start`; the first start of new code compiles numba

# The project's goals, checked on the medians of this run.
GOAL_SMALL_PACKETS_VS_VDE = 1.3  # tapnet's rate at least this times vde_switch's
GOAL_TCP_VS_BRIDGE = 0.8  # tapnet's TCP throughput at least this times the Linux bridge's
GOAL_STARTUP_SECONDS = 5.0
GOAL_DEMO_RSS_MB = 300.0

TAPNET_STACK = """\
services:
  a:
    networks: [bench]
  b:
    networks: [bench]
networks:
  bench:
    driver: bridge
    ipam:
      config:
        - subnet: {subnet}
"""

# Loads or compiles numba's cache the way the daemon does, and runs the frames
# of the measurements through a datapath of the same stack, so that code the
# datapath compiles at its first frame is cached too. The start-up time measured
# afterwards is then that of a warm cache.
WARM_UP_CODE = """
import sys
import numpy as np
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from tapnet import runtime, stack, tapio
from tapnet.batch import FrameBatch
from tapnet.model import format_mac

cluster = stack.load_stack(sys.argv[1])
fabric = runtime.build_fabric(cluster)
tapio.warm_up()
a, b = (cluster.sandboxes[name].endpoints[0] for name in ("a.1", "b.1"))
mac_a, mac_b, ip_a, ip_b = format_mac(a.mac), format_mac(b.mac), str(a.ip), str(b.ip)
frames = [
    Ether(src=mac_a, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac_a, psrc=ip_a, pdst=ip_b),
    Ether(src=mac_b, dst=mac_a) / ARP(op=2, hwsrc=mac_b, psrc=ip_b, hwdst=mac_a, pdst=ip_a),
    Ether(src=mac_a, dst=mac_b) / IP(src=ip_a, dst=ip_b) / ICMP(),
    Ether(src=mac_a, dst=mac_b) / IP(src=ip_a, dst=ip_b) / UDP(sport=40000, dport=9000) / (b"x" * 18),
]
port_a, port_b = (fabric.port_id(f"{cluster.sandboxes[name].node}/{name}/eth0") for name in ("a.1", "b.1"))
ports = [port_a, port_b, port_a, port_a]
batch = FrameBatch(len(frames), 4096)
for port, frame in zip(ports, frames):
    batch.append(port, bytes(frame))
fabric.process(batch, 1.0, np.random.default_rng(0))
"""


class BenchError(Exception):
    """A setup or measurement failed; the message names the step."""


@dataclass
class Setup:
    """Two namespaces A and B on one segment, with the addresses to measure between."""

    name: str
    ns_a: str
    ns_b: str
    ip_a: str
    ip_b: str
    extra: dict = field(default_factory=dict)
    target: str | None = None  # address A sends to, when not B's own (a VIP that DNATs to B)

    @property
    def destination(self) -> str:
        return self.target or self.ip_b


@dataclass
class Figures:
    pps: float | None = None  # datagrams per second received by the sink
    sent_pps: float | None = None
    cpu_us: float | None = None  # the switch process's CPU time per datagram received, in microseconds
    tcp_bps: float | None = None
    ping_ms: float | None = None
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- helpers


def run(argv: list[str], timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` with text output; raise BenchError on a non-zero status when `check`."""
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv)} timed out after {timeout:g} s") from None
    if check and completed.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip() or completed.stdout.strip()}")
    return completed


def in_ns(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def tapnet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapnet.cli", *args]


def tapnet_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a process this script started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """Return the next line of the process's stdout, or raise BenchError after `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError(f"{' '.join(process.args)} printed nothing within {timeout:g} s")
    return process.stdout.readline()


def root_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Return the network of every address in the root namespace (`ip -o addr`)."""
    networks = []
    for line in run(["ip", "-o", "addr", "show"]).stdout.splitlines():
        match = re.search(r"\sinet6?\s(\S+)", line)
        if match:
            networks.append(ipaddress.ip_interface(match.group(1)).network)
    return networks


def check_subnets() -> None:
    in_use = root_networks()
    for setup, subnet in SUBNETS.items():
        network = ipaddress.ip_network(subnet)
        for other in in_use:
            if other.version == network.version and other.overlaps(network):
                raise BenchError(f"subnet {subnet} of the {setup} setup overlaps {other} of the root namespace; edit SUBNETS")


def host(subnet: str, index: int) -> str:
    return str(ipaddress.ip_network(subnet)[index])


def build_sender() -> Path:
    """Compile perf/udp_mmsg.c into perf/out/ unless the binary is newer than the source."""
    if SENDER_BINARY.exists() and SENDER_BINARY.stat().st_mtime >= SENDER_SOURCE.stat().st_mtime:
        return SENDER_BINARY
    if shutil.which("gcc") is None:
        raise BenchError("gcc not found; install it (apt-get install gcc) to build the small-packet sender")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    run(["gcc", "-O2", "-Wall", "-o", str(SENDER_BINARY), str(SENDER_SOURCE)], timeout=120)
    return SENDER_BINARY


def add_namespace(cleanup: contextlib.ExitStack, name: str) -> str:
    if not name.startswith("tn"):
        raise ValueError(f"namespace {name!r} must start with 'tn'")
    if Path("/run/netns", name).exists():
        raise BenchError(f"namespace {name} already exists; remove it (ip netns delete {name}) or wait for the run that owns it")
    run(["ip", "netns", "add", name])
    cleanup.callback(run, ["ip", "netns", "delete", name], check=False)
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return name


def configure_endpoint(namespace: str, ifname: str, address: str, prefix: int) -> None:
    run(["ip", "-n", namespace, "addr", "add", f"{address}/{prefix}", "dev", ifname])
    run(["ip", "-n", namespace, "link", "set", ifname, "up"])


def rss_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of `pid` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# ---------------------------------------------------------------- setups


def make_linux_bridge(cleanup: contextlib.ExitStack, tag: str) -> Setup:
    subnet = SUBNETS["linux bridge"]
    prefix = ipaddress.ip_network(subnet).prefixlen
    switch = add_namespace(cleanup, f"tnbench{tag}-br-sw")
    setup = Setup("linux bridge", add_namespace(cleanup, f"tnbench{tag}-br-a"), add_namespace(cleanup, f"tnbench{tag}-br-b"), host(subnet, 2), host(subnet, 3))

    run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", switch, "link", "set", "br0", "up"])
    for side, namespace, address in (("a", setup.ns_a, setup.ip_a), ("b", setup.ns_b, setup.ip_b)):
        # Both ends are created inside tn namespaces: the peer goes straight into A or B.
        run(["ip", "-n", switch, "link", "add", f"port-{side}", "type", "veth", "peer", "name", "eth0", "netns", namespace])
        run(["ip", "-n", switch, "link", "set", f"port-{side}", "master", "br0", "up"])
        configure_endpoint(namespace, "eth0", address, prefix)
    return setup


def make_vde_switch(cleanup: contextlib.ExitStack, tag: str, scratch: Path) -> Setup:
    if shutil.which("vde_switch") is None:
        raise BenchError("vde_switch not found; install Debian's vde2")
    subnet = SUBNETS["vde_switch"]
    prefix = ipaddress.ip_network(subnet).prefixlen
    switch = add_namespace(cleanup, f"tnbench{tag}-vde-sw")
    setup = Setup("vde_switch", add_namespace(cleanup, f"tnbench{tag}-vde-a"), add_namespace(cleanup, f"tnbench{tag}-vde-b"), host(subnet, 2), host(subnet, 3))

    taps = {"a": f"tnv{tag}a", "b": f"tnv{tag}b"}
    log_file = open(scratch / "vde_switch.log", "wb")
    cleanup.callback(log_file.close)
    # Its control and management sockets live in the scratch directory. stdin
    # stays an open pipe, because vde_switch exits when its console reaches EOF.
    switch_process = subprocess.Popen(
        in_ns(switch, "vde_switch", "--sock", str(scratch / "vde.ctl"), "--mgmt", str(scratch / "vde.mgmt"), "--tap", taps["a"], "--tap", taps["b"]),
        stdin=subprocess.PIPE,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    cleanup.callback(stop_process, switch_process)

    deadline = time.monotonic() + 10
    while run(["ip", "-n", switch, "link", "show", taps["b"]], check=False).returncode != 0:
        if switch_process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"vde_switch did not create its TAPs; see {scratch / 'vde_switch.log'}")
        time.sleep(0.05)

    for side, namespace, address in (("a", setup.ns_a, setup.ip_a), ("b", setup.ns_b, setup.ip_b)):
        run(["ip", "-n", switch, "link", "set", taps[side], "netns", namespace])
        configure_endpoint(namespace, taps[side], address, prefix)
    setup.extra["pid"] = switch_process.pid
    return setup


def warm_numba_cache(stack_path: Path) -> None:
    run([sys.executable, "-c", WARM_UP_CODE, str(stack_path)], timeout=TAPNET_TIMEOUT, env=tapnet_env(), cwd=REPO)


def start_tapnet(cleanup: contextlib.ExitStack, instance: str, stack_path: Path | None) -> float:
    """Start `instance` detached (the built-in demo without a stack) and arrange its stop; return seconds taken."""
    args = ["start", "--instance", instance, "--detach"]
    if stack_path is not None:
        args.insert(1, str(stack_path))
    cleanup.callback(stop_tapnet, instance)
    started = time.perf_counter()
    run(tapnet_argv(*args), timeout=TAPNET_TIMEOUT, env=tapnet_env(), cwd=REPO)
    return time.perf_counter() - started


def stop_tapnet(instance: str) -> None:
    completed = run(tapnet_argv("stop", "--instance", instance), timeout=90, check=False, env=tapnet_env(), cwd=REPO)
    if completed.returncode != 0:
        print(f"bench: tapnet stop --instance {instance} failed: {completed.stderr.strip()}; run it again by hand", file=sys.stderr)


def tapnet_daemon_pid(instance: str) -> int:
    state = json.loads(Path("/run/tapnet", instance, "state.json").read_text())
    return int(state["daemon"]["pid"])


def make_tapnet(cleanup: contextlib.ExitStack, tag: str, scratch: Path) -> Setup:
    sys.path.insert(0, str(REPO))
    from tapnet.netns import namespace_name
    from tapnet.stack import load_stack

    subnet = SUBNETS["tapnet"]
    stack_path = scratch / "bench-stack.yml"
    stack_path.write_text(TAPNET_STACK.format(subnet=subnet))
    # tapnet's IPAM picks the addresses; compile the stack here to learn them before the clock starts.
    cluster = load_stack(stack_path)
    ip_a, ip_b = (str(cluster.sandboxes[name].endpoints[0].ip) for name in ("a.1", "b.1"))
    warm_numba_cache(stack_path)

    instance = f"bench{tag}"
    setup = Setup("tapnet", namespace_name(instance, "a.1"), namespace_name(instance, "b.1"), ip_a, ip_b)
    started = time.perf_counter()
    start_seconds = start_tapnet(cleanup, instance, stack_path)
    deadline = time.monotonic() + STARTUP_PING_DEADLINE
    while run(in_ns(setup.ns_a, "ping", "-c", "1", "-W", "1", setup.ip_b), check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"no ping reply from {setup.ip_b} within {STARTUP_PING_DEADLINE:g} s after tapnet start")
        time.sleep(0.05)
    setup.extra["startup_seconds"] = time.perf_counter() - started
    setup.extra["start_command_seconds"] = start_seconds
    setup.extra["instance"] = instance
    setup.extra["pid"] = tapnet_daemon_pid(instance)
    return setup


# ---------------------------------------------------------------- measurements


def check_reachable(setup: Setup) -> None:
    """Ping B from A a few times, which also fills both ARP caches before the measurements."""
    completed = run(in_ns(setup.ns_a, "ping", "-c", "3", "-i", "0.2", "-W", "1", setup.ip_b), check=False, timeout=15)
    replies = re.search(r"(\d+) received", completed.stdout)
    if replies is None or int(replies.group(1)) == 0:
        raise BenchError(f"{setup.name}: {setup.ip_b} is not reachable from {setup.ns_a}: {completed.stdout.strip()[-200:]}")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time `pid` has used, in seconds (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_small_packets(setup: Setup, sender: Path, seconds: float, payload: int) -> dict:
    """Return datagrams per second received by the sink and sent, and the switch's CPU time per datagram.

    The CPU figure (`cpu_us`) exists only for a switch that is a process of
    its own (vde_switch, tapnet): its CPU time from the sender's start to the
    sink's end, divided by every datagram the sink received in that time.
    Unlike the rates, it hardly depends on how much CPU other programs leave.
    """
    sink = subprocess.Popen(
        in_ns(setup.ns_b, str(sender), "recv", setup.ip_b, str(UDP_PORT), str(SMALL_PACKET_WARMUP), str(seconds)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    send_seconds = SMALL_PACKET_WARMUP + seconds + 0.5
    sending = None
    try:
        if read_line(sink, 10).strip() != "ready":
            raise BenchError(f"udp_mmsg sink did not start: {sink.stderr.read() if sink.poll() is not None else ''}")
        switch_pid = setup.extra.get("pid")
        cpu_before = cpu_seconds(switch_pid) if switch_pid else None
        sending = subprocess.Popen(
            in_ns(setup.ns_a, str(sender), "send", setup.destination, str(UDP_PORT), str(send_seconds), str(payload)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = sink.communicate(timeout=send_seconds + 30)
        cpu_used = cpu_seconds(switch_pid) - cpu_before if switch_pid else None
        sent_out, sent_err = sending.communicate(timeout=send_seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"udp_mmsg did not finish within {send_seconds + 30:g} s") from None
    finally:
        stop_process(sink)
        if sending is not None:
            stop_process(sending)
    if sink.returncode != 0:
        raise BenchError(f"udp_mmsg sink exited {sink.returncode}: {out.strip()} {err.strip()}")
    if sending.returncode != 0:
        raise BenchError(f"udp_mmsg sender exited {sending.returncode}: {sent_err.strip()}")
    received = json.loads(out)
    figures = {"pps": received["packets"] / received["seconds"], "sent_pps": json.loads(sent_out)["sent"] / send_seconds}
    if cpu_used is not None and received["total"]:
        figures["cpu_us"] = cpu_used / received["total"] * 1e6
    return figures


def measure_tcp(setup: Setup, seconds: float) -> float:
    """Return iperf3's received bits per second from A to B."""
    server = subprocess.Popen(
        in_ns(setup.ns_b, "iperf3", "--server", "--one-off", "--bind", setup.ip_b, "--port", str(IPERF_PORT)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = ["iperf3", "--client", setup.destination, "--port", str(IPERF_PORT), "--time", str(seconds), "--json"]
        # The server may not listen yet: a refused connection fails at once, so retry a few times.
        for _ in range(50):
            completed = run(in_ns(setup.ns_a, *client), timeout=seconds + 30, check=False)
            # iperf3 3.12 may exit 0 with an "error" member, for example before the server listens.
            if completed.returncode == 0 and '"error"' not in completed.stdout:
                try:
                    return json.loads(completed.stdout)["end"]["sum_received"]["bits_per_second"]
                except (ValueError, KeyError):
                    raise BenchError(f"iperf3 printed no result: {completed.stdout.strip()[-500:]}") from None
            if "refused" not in completed.stdout + completed.stderr:
                raise BenchError(f"iperf3 client failed: {completed.stdout.strip()[-300:]} {completed.stderr.strip()}")
            time.sleep(0.1)
        raise BenchError("iperf3 server did not accept connections within 5 s")
    finally:
        stop_process(server)


def measure_ping(setup: Setup) -> float:
    """Return the median round trip in milliseconds."""
    completed = run(
        in_ns(setup.ns_a, "ping", "-c", str(PING_COUNT), "-i", str(PING_INTERVAL), "-W", "1", setup.destination),
        timeout=PING_COUNT * (PING_INTERVAL + 1) + 10,
        check=False,
    )
    times = [float(value) for value in re.findall(r"time=([0-9.]+) ms", completed.stdout)]
    if not times:
        raise BenchError(f"no ping reply from {setup.ip_b}: {completed.stdout.strip()[-200:]}")
    return statistics.median(times)


def measure(setup: Setup, sender: Path, seconds: float, payload: int) -> Figures:
    figures = Figures()
    try:
        small = measure_small_packets(setup, sender, seconds, payload)
        figures.pps, figures.sent_pps, figures.cpu_us = small["pps"], small["sent_pps"], small.get("cpu_us")
    except BenchError as error:
        figures.errors.append(f"small packets: {error}")
    try:
        figures.tcp_bps = measure_tcp(setup, seconds)
    except BenchError as error:
        figures.errors.append(f"tcp: {error}")
    try:
        figures.ping_ms = measure_ping(setup)
    except BenchError as error:
        figures.errors.append(f"ping: {error}")
    return figures


def measure_demo_rss(tag: str) -> dict:
    """Start the built-in demo, let it run DEMO_SETTLE seconds, and return its daemon's memory."""
    instance = f"benchdemo{tag}"
    with contextlib.ExitStack() as cleanup:
        try:
            start_tapnet(cleanup, instance, None)
        except BenchError as error:
            return {"error": str(error)}
        time.sleep(DEMO_SETTLE)
        rss, hwm = rss_kib(tapnet_daemon_pid(instance))
        return {"rss_mb": rss / 1024, "hwm_mb": hwm / 1024}


# ---------------------------------------------------------------- report


def median_of(runs: list[Figures], attribute: str) -> float | None:
    values = [getattr(figures, attribute) for figures in runs if getattr(figures, attribute) is not None]
    return statistics.median(values) if values else None


def text(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def verdict(value: float | None, ok: bool) -> str:
    if value is None:
        return "n/a"
    if ok:
        return "met"
    return "NOT met"


def report(results: dict[str, list[Figures]], tapnet_extra: dict, demo: dict | None, args: argparse.Namespace) -> dict:
    print(f"\n{'setup':<14} {'run':>3} {'rx kpps':>9} {'sent kpps':>10} {'switch CPU us/pkt':>18} {'TCP Gbit/s':>11} {'ping ms':>8}")
    for name, runs in results.items():
        for index, figures in enumerate(runs, 1):
            print(f"{name:<14} {index:>3} {text(figures.pps, 1e3):>9} {text(figures.sent_pps, 1e3):>10} {text(figures.cpu_us, 1, 2):>18} {text(figures.tcp_bps, 1e9, 2):>11} {text(figures.ping_ms, 1, 3):>8}")
            for error in figures.errors:
                print(f"    error: {error}")

    medians = {name: {key: median_of(runs, key) for key in ("pps", "sent_pps", "cpu_us", "tcp_bps", "ping_ms")} for name, runs in results.items()}
    bridge, vde, tap = (medians.get(name, {}) for name in ("linux bridge", "vde_switch", "tapnet"))
    pps_ratio = ratio(tap.get("pps"), vde.get("pps"))
    tcp_ratio = ratio(tap.get("tcp_bps"), bridge.get("tcp_bps"))
    ping_ratio = ratio(tap.get("ping_ms"), vde.get("ping_ms"))
    # Frames per CPU-second of tapnet over those of vde_switch: the rate ratio if both had a core to themselves.
    cpu_ratio = ratio(vde.get("cpu_us"), tap.get("cpu_us"))
    startup = tapnet_extra.get("startup_seconds")
    demo_rss = demo.get("hwm_mb") if demo else None

    print(f"\n{args.payload}-byte UDP payloads ({args.payload + 42}-byte frames), {args.seconds:g} s per measurement, {args.runs} run(s); medians:")
    print(f"  tapnet / vde_switch small-packet rate: {text(pps_ratio, digits=2)}x (goal >= {GOAL_SMALL_PACKETS_VS_VDE}x: {verdict(pps_ratio, (pps_ratio or 0) >= GOAL_SMALL_PACKETS_VS_VDE)})")
    print(f"  same, from CPU time per datagram:      {text(cpu_ratio, digits=2)}x (vde_switch {text(vde.get('cpu_us'), digits=2)} us, tapnet {text(tap.get('cpu_us'), digits=2)} us)")
    print(f"  tapnet / linux bridge TCP throughput:  {text(tcp_ratio, digits=2)}x (goal >= {GOAL_TCP_VS_BRIDGE}x: {verdict(tcp_ratio, (tcp_ratio or 0) >= GOAL_TCP_VS_BRIDGE)})")
    print(f"  tapnet / vde_switch ping median:       {text(ping_ratio, digits=2)}x (goal <= 1.0x: {verdict(ping_ratio, (ping_ratio or 2) <= 1.0)})")
    print(f"  tapnet start to first ping:            {text(startup, digits=2)} s (goal < {GOAL_STARTUP_SECONDS:g} s: {verdict(startup, (startup or 99) < GOAL_STARTUP_SECONDS)});"
          f" `tapnet start --detach` alone {text(tapnet_extra.get('start_command_seconds'), digits=2)} s")
    print(f"  tapnet daemon RSS, benchmark stack:    {text(tapnet_extra.get('rss_mb'))} MB (peak {text(tapnet_extra.get('hwm_mb'))} MB)")
    if demo is None:
        print("  tapnet daemon RSS, built-in demo:      skipped")
    elif "error" in demo:
        print(f"  tapnet daemon RSS, built-in demo:      failed: {demo['error']}")
    else:
        print(f"  tapnet daemon RSS, built-in demo:      {text(demo['rss_mb'])} MB (peak {text(demo_rss)} MB; goal < {GOAL_DEMO_RSS_MB:g} MB: {verdict(demo_rss, demo_rss < GOAL_DEMO_RSS_MB)})")
    if tapnet_extra.get("drops"):
        print(f"  tapnet drops during the run: {tapnet_extra['drops']}")
    return {
        "runs": {name: [vars(figures) for figures in runs] for name, runs in results.items()},
        "medians": medians,
        "ratios": {"pps_vs_vde": pps_ratio, "cpu_pps_vs_vde": cpu_ratio, "tcp_vs_bridge": tcp_ratio, "ping_vs_vde": ping_ratio},
        "tapnet": tapnet_extra,
        "demo": demo,
        "seconds": args.seconds,
        "payload": args.payload,
    }


def tapnet_drops(instance: str) -> dict[str, int]:
    counters = json.loads(run(tapnet_argv("stats", "--instance", instance, "--json"), env=tapnet_env(), cwd=REPO).stdout)
    totals: dict[str, int] = {}
    for port in counters.values():
        for reason, count in port["drops"].items():
            totals[reason] = totals.get(reason, 0) + count
    return totals


# ---------------------------------------------------------------- main


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement in seconds (default 3)")
    parser.add_argument("--runs", type=int, default=1, help="measurement rounds over the three setups (default 1)")
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes of the small-packet test (default 18: 64-byte frames with FCS)")
    parser.add_argument("--skip-demo", action="store_true", help="do not start the built-in demo to read its RSS")
    parser.add_argument("--only", default="linux bridge,vde_switch,tapnet", help="comma-separated setups to build (default all three)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, TAP devices)", file=sys.stderr)
        return 2
    selected = [name.strip() for name in args.only.split(",")]
    for name in selected:
        if name not in SUBNETS:
            print(f"bench: unknown setup {name!r}; choose from {', '.join(SUBNETS)}", file=sys.stderr)
            return 2

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    tag = str(os.getpid() % 100000)
    results: dict[str, list[Figures]] = {}
    tapnet_extra: dict = {}
    demo = None
    try:
        check_subnets()
        sender = build_sender()
        with tempfile.TemporaryDirectory(prefix="tn-bench-") as scratch, contextlib.ExitStack() as cleanup:
            setups = []
            if "linux bridge" in selected:
                setups.append(make_linux_bridge(cleanup, tag))
            if "vde_switch" in selected:
                setups.append(make_vde_switch(cleanup, tag, Path(scratch)))
            if "tapnet" in selected:
                tapnet_setup = make_tapnet(cleanup, tag, Path(scratch))
                setups.append(tapnet_setup)
                tapnet_extra = {key: tapnet_setup.extra[key] for key in ("startup_seconds", "start_command_seconds")}
            for setup in setups:
                check_reachable(setup)
                results[setup.name] = []

            for index in range(args.runs):
                for setup in setups:
                    print(f"run {index + 1}/{args.runs}: {setup.name} ...", flush=True)
                    results[setup.name].append(measure(setup, sender, args.seconds, args.payload))

            if "tapnet" in selected:
                rss, hwm = rss_kib(tapnet_setup.extra["pid"])
                drops = tapnet_drops(tapnet_setup.extra["instance"])
                tapnet_extra.update(rss_mb=rss / 1024, hwm_mb=hwm / 1024, drops=drops)
        if not args.skip_demo:
            demo = measure_demo_rss(tag)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it created was removed", file=sys.stderr)
        return 130

    summary = report(results, tapnet_extra, demo, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
