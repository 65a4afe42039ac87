"""Benchmark: the numba batch parser, a plain dpkt parse loop and `tapnet replay`, over one capture.

    python perf/gen_capture.py /tmp/tn-bench.pcapng
    python perf/bench_parse.py /tmp/tn-bench.pcapng [--limit N] [--batch 256 --batch 1024] [--no-replay]

Figures printed, all in frames per second over the same frames:

- parser: `tapnet.parse.parse_frames` over the mapped capture in batches
  (256 and 1024 frames by default), warm. The frames stay where
  `tapnet.pcapio` mapped them, so nothing is copied. The best of --repeat
  passes counts.
- dpkt: `dpkt.ethernet.Ethernet` over every frame, reading the IP addresses
  and protocol, the TCP or UDP ports (and TCP flags and sequence number),
  the ICMP type and code, or the ARP operation and addresses. The frames are
  read into a list of bytes first and only the loop is timed. The best of
  --repeat passes counts.
- replay: `python -m tapnet.cli replay -r CAPTURE -w OUT.pcapng` as a child
  process, with and without --no-comments, timed from start to exit. That
  time includes interpreter start-up, imports, loading numba's cache,
  reading the capture and writing the output. The figure is therefore a
  lower bound for the datapath alone. It is skipped when the replay
  subcommand does not exist.

Then the ratios parser/dpkt and replay/dpkt. With --limit N only the first N
frames are used. For the replay they are first written to a temporary
capture.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapnet import parse  # noqa: E402
from tapnet.batch import VNET_HDR_LEN  # noqa: E402
from tapnet.pcapio import Capture, PcapNgWriter, open_capture  # noqa: E402

DEFAULT_BATCHES = (256, 1024)
DEFAULT_REPEAT = 3


def bench_parser(capture: Capture, count: int, batch_size: int, repeat: int) -> tuple[float, np.ndarray]:
    """Time the numba parser over the first `count` frames; return (frames/s, status counts)."""
    out = np.empty(batch_size, dtype=parse.RECORD_DTYPE)
    vnet = np.zeros((batch_size, VNET_HDR_LEN), dtype=np.uint8)
    data, offsets, lengths = capture.data, capture.offsets, capture.lengths
    no_adjust = np.zeros(0, dtype=np.int64)

    def one_pass(statuses: np.ndarray | None) -> None:
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            parse.parse_frames(data, offsets[start:start + n], lengths[start:start + n], no_adjust, vnet, n, out,
                               parse.VXLAN_PORT, True)
            if statuses is not None:
                statuses += np.bincount(out["status"][:n], minlength=len(statuses))

    statuses = np.zeros(256, dtype=np.int64)
    one_pass(statuses)  # compiles or loads the cache, and counts the outcome
    best = min(_timed(lambda: one_pass(None)) for _ in range(repeat))
    return count / best, statuses


def dpkt_loop(frames: list[bytes]) -> int:
    """Parse each frame with dpkt and read the fields a router looks at; return the sum of the values read."""
    import dpkt

    Ethernet, IP, IP6, ARP = dpkt.ethernet.Ethernet, dpkt.ip.IP, dpkt.ip6.IP6, dpkt.arp.ARP
    TCP, UDP, ICMP, ICMP6 = dpkt.tcp.TCP, dpkt.udp.UDP, dpkt.icmp.ICMP, dpkt.icmp6.ICMP6
    touched = 0
    for frame in frames:
        eth = Ethernet(frame)
        l3 = eth.data
        if isinstance(l3, IP):
            touched += len(l3.src) + len(l3.dst) + l3.p + l3.ttl
        elif isinstance(l3, IP6):
            touched += len(l3.src) + len(l3.dst) + l3.nxt + l3.hlim
        elif isinstance(l3, ARP):
            touched += l3.op + len(l3.spa) + len(l3.tpa) + len(l3.sha)
            continue
        else:
            continue
        l4 = l3.data
        if isinstance(l4, TCP):
            touched += l4.sport + l4.dport + l4.flags + (l4.seq & 0xFF)
        elif isinstance(l4, UDP):
            touched += l4.sport + l4.dport + l4.ulen
        elif isinstance(l4, (ICMP, ICMP6)):
            touched += l4.type + l4.code
    return touched


def bench_dpkt(capture: Capture, count: int, repeat: int) -> float:
    frames = [capture.frame(i) for i in range(count)]
    best = min(_timed(lambda: dpkt_loop(frames)) for _ in range(repeat))
    return count / best


def replay_available() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "tapnet.cli", "replay", "--help"],
        cwd=ROOT, env=_child_env(), capture_output=True, text=True,
    )
    return result.returncode == 0


def bench_replay(capture_path: Path, count: int, stack: str | None, comments: bool, workdir: Path) -> float:
    command = [sys.executable, "-m", "tapnet.cli", "replay", "-r", str(capture_path), "-w", str(workdir / "replay-out.pcapng")]
    if stack:
        command += ["--stack", stack]
    if not comments:
        command.append("--no-comments")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=_child_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"replay failed with exit status {result.returncode}: {result.stderr.strip()}")
    return count / elapsed


def write_prefix(capture: Capture, count: int, path: Path) -> None:
    """Write the first `count` frames of `capture` to a new pcapng, keeping interface names and timestamps."""
    with open(path, "wb") as stream:
        writer = PcapNgWriter(stream, application="tapnet perf/bench_parse.py")
        ids = np.array([writer.interface_id(i.name or f"if{k}") for k, i in enumerate(capture.interfaces)], dtype=np.int64)
        step = 100_000
        for start in range(0, count, step):
            stop = min(count, start + step)
            frames = [capture.frame(i) for i in range(start, stop)]
            writer.write_frames(ids[capture.interface_ids[start:stop]], frames, capture.timestamps[start:stop])


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capture", type=Path, help="pcap or pcapng file, for example from perf/gen_capture.py")
    parser.add_argument("--limit", type=int, help="use only the first N frames")
    parser.add_argument("--batch", type=int, action="append", help="frames per parser call; may be repeated (default 256 and 1024)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help=f"timed passes of the parser and the dpkt loop, best counts (default {DEFAULT_REPEAT})")
    parser.add_argument("--stack", metavar="FILE", help="stack file for the replay (default: the built-in demo stack)")
    parser.add_argument("--no-replay", action="store_true", help="skip the replay runs")
    args = parser.parse_args(argv)

    capture = open_capture(args.capture)
    count = len(capture) if args.limit is None else min(args.limit, len(capture))
    if count == 0:
        parser.error(f"{args.capture} holds no frames")
    print(f"capture {args.capture}: {count:,} frames, {int(capture.lengths[:count].sum()) / count:.0f} bytes on average; "
          f"{os.cpu_count()} CPUs, numba parser vs dpkt {_dpkt_version()}")

    parser_rates = {}
    for batch_size in args.batch or DEFAULT_BATCHES:
        rate, statuses = bench_parser(capture, count, batch_size, args.repeat)
        parser_rates[batch_size] = rate
        malformed = int(statuses[1:].sum())
        print(f"parser, batches of {batch_size:5}: {rate:12,.0f} frames/s ({1e9 / rate:.0f} ns/frame, {malformed} malformed)")

    dpkt_rate = bench_dpkt(capture, count, args.repeat)
    print(f"dpkt loop:                {dpkt_rate:12,.0f} frames/s ({1e9 / dpkt_rate:.0f} ns/frame)")

    replay_rates = {}
    if not args.no_replay:
        if not replay_available():
            print("replay: skipped, `python -m tapnet.cli replay --help` failed")
        else:
            with tempfile.TemporaryDirectory(prefix="tn-bench-") as workdir:
                source = args.capture
                if count < len(capture):
                    source = Path(workdir) / "prefix.pcapng"
                    write_prefix(capture, count, source)
                for comments in (False, True):
                    label = "with comments" if comments else "--no-comments"
                    rate = bench_replay(source, count, args.stack, comments, Path(workdir))
                    replay_rates[label] = rate
                    print(f"replay, {label:13}:    {rate:12,.0f} frames/s (wall time of the whole command)")

    for batch_size, rate in parser_rates.items():
        print(f"ratio parser ({batch_size}) / dpkt: {rate / dpkt_rate:8.1f}")
    for label, rate in replay_rates.items():
        print(f"ratio replay ({label}) / dpkt: {rate / dpkt_rate:8.2f}")
    return 0


def _dpkt_version() -> str:
    import dpkt

    return dpkt.__version__


if __name__ == "__main__":
    sys.exit(main())
