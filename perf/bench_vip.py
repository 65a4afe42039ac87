"""Benchmark: traffic through a service VIP against traffic straight to the task, in one run.

    sudo python perf/bench_vip.py [--seconds S] [--runs N] [--payload BYTES]

One tapnet instance runs a stack with a client `a` and a service `b` of one
task on one bridge network. From a.1, the same measurements as
perf/bench_live.py (64-byte UDP rate with udp_mmsg, iperf3 TCP, ping median)
are taken twice per run: to b.1's own address (direct) and to b's VIP,
which the datapath DNATs to b.1 through conntrack (VIP path). The two are
alternated so that the machine's load affects both alike. Everything is in
`tn` namespaces and is removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_live  # noqa: E402  (the measurement helpers of the live benchmark)

SUBNET = "10.77.4.0/24"  # apart from bench_live's subnets and the root namespace's addresses
GOAL_VIP_VS_DIRECT = 0.8  # the VIP path's rate and throughput at least this times the direct path's
STACK = """\
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


def make_setups(cleanup: contextlib.ExitStack, scratch: Path) -> tuple[bench_live.Setup, bench_live.Setup]:
    sys.path.insert(0, str(bench_live.REPO))
    from tapnet.netns import namespace_name
    from tapnet.stack import load_stack

    stack_path = scratch / "bench-vip.yml"
    stack_path.write_text(STACK.format(subnet=SUBNET))
    cluster = load_stack(stack_path)
    ip_a = str(cluster.sandboxes["a.1"].endpoints[0].ip)
    ip_b = str(cluster.sandboxes["b.1"].endpoints[0].ip)
    vip = str(cluster.services["b"].vips["bench"])
    bench_live.warm_numba_cache(stack_path)

    instance = "benchvip"
    bench_live.start_tapnet(cleanup, instance, stack_path)
    direct = bench_live.Setup("direct", namespace_name(instance, "a.1"), namespace_name(instance, "b.1"), ip_a, ip_b)
    direct.extra["pid"] = bench_live.tapnet_daemon_pid(instance)
    through_vip = dataclasses.replace(direct, name="vip", target=vip, extra=dict(direct.extra))
    return direct, through_vip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement, in seconds (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="runs of both paths, alternated (default 3)")
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes; 18 makes 64-byte frames on a wire")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, bench_live._raise_keyboard_interrupt)
    import ipaddress

    for network in bench_live.root_networks():
        if network.version == 4 and network.overlaps(ipaddress.ip_network(SUBNET)):
            raise SystemExit(f"bench_vip: subnet {SUBNET} overlaps {network} of the root namespace; change SUBNET")

    results: dict[str, list[bench_live.Figures]] = {"direct": [], "vip": []}
    with contextlib.ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="tn-bench-vip-") as scratch:
        sender = bench_live.build_sender()
        direct, through_vip = make_setups(cleanup, Path(scratch))
        bench_live.check_reachable(direct)
        for run in range(args.runs):
            for setup in (direct, through_vip):
                figures = bench_live.measure(setup, sender, args.seconds, args.payload)
                results[setup.name].append(figures)
                print(
                    f"run {run + 1} {setup.name:>6}: {bench_live.text(figures.pps, 1e3)} kpps, "
                    f"{bench_live.text(figures.cpu_us)} us CPU per datagram, "
                    f"{bench_live.text(figures.tcp_bps, 1e9, 2)} Gbit/s, ping {bench_live.text(figures.ping_ms, 1, 3)} ms"
                    + (f", errors: {figures.errors}" if figures.errors else "")
                )

    print()
    for attribute, label in (("pps", "64-byte rate"), ("tcp_bps", "TCP throughput")):
        vip_value = bench_live.median_of(results["vip"], attribute)
        direct_value = bench_live.median_of(results["direct"], attribute)
        value = bench_live.ratio(vip_value, direct_value)
        ok = value is not None and value >= GOAL_VIP_VS_DIRECT
        print(f"{label}: VIP / direct = {bench_live.text(value, 1, 2)} (goal >= {GOAL_VIP_VS_DIRECT}): {bench_live.verdict(value, ok)}")
    cpu_vip = bench_live.median_of(results["vip"], "cpu_us")
    cpu_direct = bench_live.median_of(results["direct"], "cpu_us")
    print(f"daemon CPU per datagram: VIP {bench_live.text(cpu_vip)} us, direct {bench_live.text(cpu_direct)} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
