"""Benchmark: full `tapnet replay` against a plain dpkt parse loop over the same capture.

    python perf/bench_replay.py [--frames N] [--keep FILE]

The capture is N frames of UDP between two tasks of one bridge network
(after one broadcast from each, so the bridge has learned both): every frame
is a learned unicast, parsed, switched and written out. The replay is timed
from opening the capture to the last byte written, with and without comments.
The dpkt loop reads the same pcapng file and parses each frame's Ethernet
header, and nothing more. The target is a replay at least as fast as that loop.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tapnet.pcapio import PcapNgWriter, open_capture  # noqa: E402
from tapnet.replay import replay  # noqa: E402
from tapnet.stack import load_stack_text  # noqa: E402

STACK = """\
services:
  web:
    deploy:
      replicas: 2
    networks: [front]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: 172.30.1.0/24
"""
START = 1_700_000_000.0
CHUNK = 100_000  # frames per write_frames call while building the capture


def build_capture(path: Path, count: int) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether

    cluster = load_stack_text(STACK)
    one, two = (cluster.sandboxes[name].endpoints[0] for name in ("web.1", "web.2"))
    mac = [":".join(f"{b:02x}" for b in endpoint.mac) for endpoint in (one, two)]
    ports = ["node1/web.1/eth0", "node1/web.2/eth0"]
    hellos = [bytes(Ether(src=mac[i], dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac[i], psrc=str(e.ip))) for i, e in enumerate((one, two))]
    data = [
        bytes(Ether(src=mac[0], dst=mac[1]) / IP(src=str(one.ip), dst=str(two.ip)) / UDP(sport=40000, dport=8080) / (b"q" * 58)),
        bytes(Ether(src=mac[1], dst=mac[0]) / IP(src=str(two.ip), dst=str(one.ip)) / UDP(sport=8080, dport=40000) / (b"r" * 58)),
    ]
    with open(path, "wb") as stream:
        writer = PcapNgWriter(stream, application="perf/bench_replay.py")
        ids = [writer.interface_id(port) for port in ports]
        writer.write_frames(ids, hellos, [START, START])
        for first in range(0, count - 2, CHUNK):
            n = min(CHUNK, count - 2 - first)
            which = np.arange(first, first + n) % 2
            writer.write_frames(np.array(ids)[which], [data[w] for w in which], START + (first + np.arange(n)) * 1e-5)


def time_dpkt(path: Path) -> tuple[int, float]:
    import dpkt

    started = time.perf_counter()
    count = 0
    with open(path, "rb") as stream:
        for _timestamp, buffer in dpkt.pcapng.Reader(stream):
            dpkt.ethernet.Ethernet(buffer)
            count += 1
    return count, time.perf_counter() - started


def time_replay(path: Path, comments: bool) -> tuple[int, float]:
    cluster = load_stack_text(STACK)
    started = time.perf_counter()
    capture = open_capture(path)
    result = replay(cluster, capture, io.BytesIO(), comments=comments)
    return result.frames_out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames in the capture (default 1000000)")
    parser.add_argument("--keep", type=Path, help="write the capture here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tn-bench-") as scratch:
        path = args.keep or Path(scratch) / "bench.pcapng"
        build_capture(path, args.frames)
        time_replay(path, comments=False)  # warm-up: numba loads or compiles its cache

        rows = [("dpkt parse loop", *time_dpkt(path))]
        rows.append(("tapnet replay --no-comments", *time_replay(path, comments=False)))
        rows.append(("tapnet replay (comments)", *time_replay(path, comments=True)))
    for name, frames, seconds in rows:
        print(f"{name:<30} {frames:>9} frames  {seconds:8.2f} s  {frames / seconds / 1000:8.1f} kframes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
