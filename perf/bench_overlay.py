"""Benchmark: tapnet's overlay across nodes, against tapnet on one node and against Linux kernel VXLAN.

    sudo python perf/bench_overlay.py [--seconds S] [--runs N] [--payload BYTES] [--json FILE]

Three pairs of namespaces, A and B, measured in one run:

- tapnet cross-node: `tapnet start --detach` of a two-node stack with one
  overlay network; A (a.1) runs on node1 and B (b.1) on node2, so every
  frame crosses the VTEP sockets and the underlay bridge;
- tapnet same-node: in the same instance, A (a.1) and C (c.1), both on node1;
- kernel VXLAN: two namespaces joined by veths to a Linux bridge in a third
  namespace (the underlay), each holding a kernel VXLAN device
  (`ip link add ... type vxlan`) with MTU 1450 and the other as `remote`.

The measurements are those of perf/bench_live.py, reused from it: 64-byte
frames (an 18-byte UDP payload by default) sent with sendmmsg by perf/udp_mmsg.c
and counted by its recvmmsg sink, iperf3 TCP throughput, and the ping round
trip median. The script ends with the project's goals: cross-node
small-packet rate at least 0.8x tapnet's same-node rate, and cross-node TCP
at least 0.3x the kernel VXLAN pair.

Every namespace and link is named `tn...`; nothing is created in the root
namespace, and everything is removed at the end, also after an error or
Ctrl-C (SIGTERM is handled like Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_live as live  # noqa: E402  (the sender, the measurements and tapnet's start and stop)
from bench_live import BenchError, Figures, Setup, median_of, ratio, run, text, verdict  # noqa: E402

# Subnets of this benchmark; each must differ from every root-namespace address.
TAPNET_OVERLAY = "10.77.4.0/24"
TAPNET_UNDERLAY = "198.18.90.0/24"
KERNEL_OVERLAY = "10.77.5.0/24"
KERNEL_UNDERLAY = "198.18.91.0/24"
KERNEL_VNI = 4097
OVERLAY_MTU = 1450  # 1500 minus the 50 bytes of outer headers, as Docker sets it

GOAL_CROSS_VS_SAME_NODE_PPS = 0.8
GOAL_CROSS_NODE_TCP_VS_KERNEL = 0.3

SETUPS = ("tapnet same-node", "tapnet cross-node", "kernel vxlan")

TAPNET_STACK = f"""\
x-tapnet:
  nodes: [node1, node2]
  underlay: {TAPNET_UNDERLAY}
  placement:
    a: node1
    b: node2
    c: node1
services:
  a:
    networks: [bench]
  b:
    networks: [bench]
  c:
    networks: [bench]
networks:
  bench:
    driver: overlay
    ipam:
      config:
        - subnet: {TAPNET_OVERLAY}
"""


def check_subnets() -> None:
    taken = live.root_networks()
    for subnet in (TAPNET_OVERLAY, TAPNET_UNDERLAY, KERNEL_OVERLAY, KERNEL_UNDERLAY):
        network = ipaddress.ip_network(subnet)
        for other in taken:
            if other.version == network.version and other.overlaps(network):
                raise BenchError(f"subnet {subnet} overlaps {other} of the root namespace; edit the subnets at the top of {__file__}")


def make_kernel_vxlan(cleanup: contextlib.ExitStack, tag: str) -> Setup:
    """Two namespaces with kernel VXLAN devices over a veth underlay, all in tn namespaces of this run."""
    underlay = live.add_namespace(cleanup, f"tnbov{tag}-kv-u")
    setup = Setup(
        "kernel vxlan",
        live.add_namespace(cleanup, f"tnbov{tag}-kv-a"),
        live.add_namespace(cleanup, f"tnbov{tag}-kv-b"),
        live.host(KERNEL_OVERLAY, 2),
        live.host(KERNEL_OVERLAY, 3),
    )
    prefix = ipaddress.ip_network(KERNEL_UNDERLAY).prefixlen
    vteps = {"a": live.host(KERNEL_UNDERLAY, 2), "b": live.host(KERNEL_UNDERLAY, 3)}

    run(["ip", "-n", underlay, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", underlay, "link", "set", "br0", "up"])
    for side, namespace, address in (("a", setup.ns_a, setup.ip_a), ("b", setup.ns_b, setup.ip_b)):
        other = vteps["b" if side == "a" else "a"]
        # The pair is created inside the underlay namespace with its peer placed straight into A or B.
        run(["ip", "-n", underlay, "link", "add", f"veth-{side}", "type", "veth", "peer", "name", "eth0", "netns", namespace])
        run(["ip", "-n", underlay, "link", "set", f"veth-{side}", "master", "br0", "up"])
        live.configure_endpoint(namespace, "eth0", vteps[side], prefix)
        run([
            "ip", "-n", namespace, "link", "add", "vx0", "type", "vxlan", "id", str(KERNEL_VNI), "dstport", "4789",
            "local", vteps[side], "remote", other, "dev", "eth0",
        ])
        run(["ip", "-n", namespace, "link", "set", "vx0", "mtu", str(OVERLAY_MTU)])
        live.configure_endpoint(namespace, "vx0", address, ipaddress.ip_network(KERNEL_OVERLAY).prefixlen)
    return setup


def make_tapnet(cleanup: contextlib.ExitStack, tag: str, scratch: Path) -> tuple[Setup, Setup, dict]:
    """Start the two-node instance; return the same-node and cross-node setups and the instance's facts."""
    sys.path.insert(0, str(live.REPO))
    from tapnet.netns import namespace_name
    from tapnet.stack import load_stack

    stack_path = scratch / "bench-overlay.yml"
    stack_path.write_text(TAPNET_STACK)
    cluster = load_stack(stack_path)
    ips = {name: str(cluster.sandboxes[f"{name}.1"].endpoints[0].ip) for name in ("a", "b", "c")}
    live.warm_numba_cache(stack_path)

    instance = f"benchov{tag}"
    live.start_tapnet(cleanup, instance, stack_path)
    pid = live.tapnet_daemon_pid(instance)
    namespaces = {name: namespace_name(instance, f"{name}.1") for name in ("a", "b", "c")}
    same = Setup("tapnet same-node", namespaces["a"], namespaces["c"], ips["a"], ips["c"], {"pid": pid})
    cross = Setup("tapnet cross-node", namespaces["a"], namespaces["b"], ips["a"], ips["b"], {"pid": pid})
    return same, cross, {"instance": instance, "pid": pid}


def report(results: dict[str, list[Figures]], tapnet: dict, args: argparse.Namespace) -> dict:
    print(f"\n{'setup':<18} {'run':>3} {'rx kpps':>9} {'sent kpps':>10} {'tapnet CPU us/pkt':>18} {'TCP Mbit/s':>11} {'ping ms':>8}")
    for name, runs in results.items():
        for index, figures in enumerate(runs, 1):
            print(
                f"{name:<18} {index:>3} {text(figures.pps, 1e3):>9} {text(figures.sent_pps, 1e3):>10} "
                f"{text(figures.cpu_us, 1, 2):>18} {text(figures.tcp_bps, 1e6, 0):>11} {text(figures.ping_ms, 1, 3):>8}"
            )
            for error in figures.errors:
                print(f"    error: {error}")

    keys = ("pps", "sent_pps", "cpu_us", "tcp_bps", "ping_ms")
    medians = {name: {key: median_of(runs, key) for key in keys} for name, runs in results.items()}
    same, cross, kernel = (medians.get(name, {}) for name in SETUPS)
    pps_ratio = ratio(cross.get("pps"), same.get("pps"))
    cpu_ratio = ratio(same.get("cpu_us"), cross.get("cpu_us"))
    tcp_ratio = ratio(cross.get("tcp_bps"), kernel.get("tcp_bps"))

    print(f"\n{args.payload}-byte UDP payloads ({args.payload + 42}-byte frames), {args.seconds:g} s per measurement, {args.runs} run(s); medians:")
    print(
        f"  tapnet cross-node / same-node small-packet rate: {text(pps_ratio, digits=2)}x "
        f"(goal >= {GOAL_CROSS_VS_SAME_NODE_PPS}x: {verdict(pps_ratio, (pps_ratio or 0) >= GOAL_CROSS_VS_SAME_NODE_PPS)})"
    )
    print(
        f"  same, from tapnet's CPU time per datagram:       {text(cpu_ratio, digits=2)}x "
        f"(same-node {text(same.get('cpu_us'), digits=2)} us, cross-node {text(cross.get('cpu_us'), digits=2)} us)"
    )
    print(
        f"  tapnet cross-node / kernel VXLAN TCP throughput: {text(tcp_ratio, digits=2)}x "
        f"(goal >= {GOAL_CROSS_NODE_TCP_VS_KERNEL}x: {verdict(tcp_ratio, (tcp_ratio or 0) >= GOAL_CROSS_NODE_TCP_VS_KERNEL)})"
    )
    if tapnet.get("drops"):
        print(f"  tapnet drops during the run: {tapnet['drops']}")
    return {
        "runs": {name: [vars(figures) for figures in runs] for name, runs in results.items()},
        "medians": medians,
        "ratios": {"cross_vs_same_node_pps": pps_ratio, "cross_vs_same_node_cpu": cpu_ratio, "cross_node_tcp_vs_kernel": tcp_ratio},
        "tapnet": tapnet,
        "seconds": args.seconds,
        "payload": args.payload,
    }


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement in seconds (default 3)")
    parser.add_argument("--runs", type=int, default=1, help="measurement rounds over the three setups (default 1)")
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes of the small-packet test (default 18: 64-byte frames with FCS)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, TAP devices)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    tag = str(os.getpid() % 100000)
    results: dict[str, list[Figures]] = {name: [] for name in SETUPS}
    tapnet: dict = {}
    try:
        check_subnets()
        sender = live.build_sender()
        with tempfile.TemporaryDirectory(prefix="tn-bench-overlay-") as scratch, contextlib.ExitStack() as cleanup:
            same, cross, tapnet = make_tapnet(cleanup, tag, Path(scratch))
            setups = [same, cross, make_kernel_vxlan(cleanup, tag)]
            for setup in setups:
                live.check_reachable(setup)

            for index in range(args.runs):
                for setup in setups:
                    print(f"run {index + 1}/{args.runs}: {setup.name} ...", flush=True)
                    results[setup.name].append(live.measure(setup, sender, args.seconds, args.payload))
            tapnet["drops"] = live.tapnet_drops(tapnet["instance"])
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it created was removed", file=sys.stderr)
        return 130

    summary = report(results, tapnet, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
