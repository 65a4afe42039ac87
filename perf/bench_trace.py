"""Benchmark: what `tapnet trace` and `tapnet capture` cost the datapath, in one run.

    sudo python perf/bench_trace.py [--seconds S] [--runs N] [--payload BYTES] [--json FILE]

It reuses perf/bench_live.py: the same two-sandbox tapnet stack (on its own
subnet, `SUBNET`), the same compiled sendmmsg sender and recvmmsg sink
(perf/udp_mmsg.c) and the same small-packet measurement. The small-packet
test then runs in each of these modes, in turn within every round:

- `off`: no trace or capture client, so the TAP loop has no watch;
- `trace, no match`: `tapnet trace 'tcp port 6379'` runs, a filter that no
  frame of the test matches. Every batch goes through the BPF filter and is
  processed without trace records;
- `trace, all`: `tapnet trace --json` with no filter, its output thrown
  away. Every frame gets a trace record and a story, and the client polls
  them all over the control socket;
- `capture, all`: `tapnet capture -w /dev/null`, every frame in and out.

Per mode it reports the sink's receive rate and the daemon's CPU time per
received datagram. On a shared machine the CPU time is the steadier figure,
because the rates depend on how much CPU other programs leave. The goal:
a filter that matches nothing stays within 5% of tracing off.

Everything the script creates is named `tn...` and removed at the end,
also after an error or Ctrl-C; it ends only the processes it started.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.77.4.0/24"  # differs from bench_live's setups, so both scripts can run at once
CLIENT_SETTLE = 1.5  # seconds a trace or capture client gets to subscribe before a measurement
GOAL_NO_MATCH_OVERHEAD = 0.05  # trace with a filter matching nothing: at most 5% slower than off

MODES = {
    "off": None,
    "trace, no match": ["trace", "tcp port 6379"],
    "trace, all": ["trace", "--json"],
    "capture, all": ["capture", "-w", "/dev/null"],
}


def load_bench_live():
    spec = importlib.util.spec_from_file_location("bench_live", REPO / "perf" / "bench_live.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_live"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def watching(bench, instance: str, args: list[str] | None, scratch: Path):
    """Run a trace or capture client of `instance` for the duration of the block; yield its stderr path."""
    if args is None:
        yield None
        return
    errors = scratch / f"client-{os.getpid()}-{time.monotonic_ns()}.err"
    with open(errors, "w") as stream:
        client = subprocess.Popen(
            bench.tapnet_argv(*args, "--instance", instance),
            stdout=subprocess.DEVNULL,
            stderr=stream,
            env=bench.tapnet_env(),
            cwd=REPO,
        )
    try:
        time.sleep(CLIENT_SETTLE)
        if client.poll() is not None:
            raise bench.BenchError(f"tapnet {' '.join(args)} exited {client.returncode}: {errors.read_text().strip()}")
        yield errors
    finally:
        if client.poll() is None:
            client.send_signal(signal.SIGINT)  # our own child: it unsubscribes and exits
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                bench.stop_process(client)


def dropped_records(errors: Path | None) -> int:
    """Sum the drop counts the client reported on stderr ("N trace records dropped ..." / "N frames dropped ...")."""
    if errors is None or not errors.exists():
        return 0
    total = 0
    for line in errors.read_text().splitlines():
        words = line.removeprefix("tapnet: ").split()
        if len(words) > 2 and words[0].isdigit() and "dropped" in words[1:4]:
            total += int(words[0])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement in seconds (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="rounds over all modes (default 3)")
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes (default 18: 64-byte frames with FCS)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, TAP devices)", file=sys.stderr)
        return 2

    bench = load_bench_live()
    bench.SUBNETS["tapnet"] = SUBNET
    signal.signal(signal.SIGTERM, bench._raise_keyboard_interrupt)
    tag = f"tr{os.getpid() % 100000}"
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        bench.check_subnets()
        sender = bench.build_sender()
        with tempfile.TemporaryDirectory(prefix="tn-bench-trace-") as scratch, contextlib.ExitStack() as cleanup:
            setup = bench.make_tapnet(cleanup, tag, Path(scratch))
            bench.check_reachable(setup)
            instance = setup.extra["instance"]
            for index in range(args.runs):
                for mode, client_args in MODES.items():
                    print(f"run {index + 1}/{args.runs}: {mode} ...", flush=True)
                    with watching(bench, instance, client_args, Path(scratch)) as errors:
                        figures = bench.measure_small_packets(setup, sender, args.seconds, args.payload)
                    figures["dropped"] = dropped_records(errors)
                    results[mode].append(figures)
    except bench.BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it created was removed", file=sys.stderr)
        return 130

    summary = report(results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    def median(mode: str, key: str) -> float | None:
        values = [run[key] for run in results[mode] if run.get(key) is not None]
        return statistics.median(values) if values else None

    print(f"\n{args.payload}-byte UDP payloads, {args.seconds:g} s per measurement, {args.runs} round(s)")
    print(f"{'mode':<16} {'rx kpps (median)':>17} {'daemon CPU us/pkt (median)':>27} {'records dropped':>16}")
    medians = {}
    for mode in results:
        medians[mode] = {"pps": median(mode, "pps"), "cpu_us": median(mode, "cpu_us"), "dropped": sum(run["dropped"] for run in results[mode])}
        pps, cpu = medians[mode]["pps"], medians[mode]["cpu_us"]
        print(f"{mode:<16} {pps / 1e3 if pps else 0:>17.1f} {cpu or 0:>27.2f} {medians[mode]['dropped']:>16}")

    off = medians["off"]
    print()
    for mode in list(results)[1:]:
        rate = medians[mode]["pps"] / off["pps"] if off["pps"] and medians[mode]["pps"] else None
        cpu = medians[mode]["cpu_us"] / off["cpu_us"] if off["cpu_us"] and medians[mode]["cpu_us"] else None
        line = f"  {mode:<16} rate {rate:.3f}x of off, CPU per datagram {cpu:.3f}x of off" if rate and cpu else f"  {mode}: no figures"
        if mode == "trace, no match" and cpu:
            met = cpu <= 1 + GOAL_NO_MATCH_OVERHEAD
            line += f" (goal: CPU within {GOAL_NO_MATCH_OVERHEAD:.0%} of off: {'met' if met else 'NOT met'})"
        print(line)
    return {"runs": results, "medians": medians, "seconds": args.seconds, "payload": args.payload}


if __name__ == "__main__":
    sys.exit(main())
