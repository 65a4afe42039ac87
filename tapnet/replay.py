"""`tapnet replay`: run a capture through the real datapath and write what it emits.

The replay reads frames from a pcap or pcapng file and hands them to
`tapnet.datapath.Fabric` in batches. The capture timestamps are the clock,
and a generator seeded from `--seed` is the only randomness. Every emitted
frame goes to a pcapng file with one interface per egress port. Nothing here
reads the wall clock, and a stack compiles without looking at the machine's
addresses, so the same capture, stack and seed give the same output file
byte for byte.

Interfaces of the output appear in the order of their first emitted frame.
Each frame carries the story of the input frame that caused it
(`TraceRecord.format()`) as its packet comment, unless `--no-comments`
turns tracing off for speed.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from tapnet.model import Cluster
from tapnet.pcapio import Capture, CaptureError, PcapNgWriter, capture_from_bytes, open_capture

log = logging.getLogger(__name__)

# Frames per datapath call. Larger batches amortise the per-batch numba call
# and list conversions; 4096 frames of 1500 bytes stay within a few MiB.
DEFAULT_BATCH = 4096
DEFAULT_SEED = 0

# virtio-net header flag: the checksum at csum_start + csum_offset is partial
# (struct virtio_net_hdr, VIRTIO_NET_HDR_F_NEEDS_CSUM in linux/virtio_net.h).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1


class ReplayError(ValueError):
    """The replay cannot start: a capture interface or `--port` names no port of the stack."""


@dataclass
class ReplayResult:
    frames_in: int = 0
    frames_out: int = 0
    ports_written: list[str] = field(default_factory=list)  # output interfaces, in file order
    counters: dict[str, dict] = field(default_factory=dict)  # Fabric.counters()
    drops: dict[str, int] = field(default_factory=dict)  # Fabric.drops_by_reason()

    def format_summary(self) -> str:
        """Counts per port and per drop reason, as `--summary` prints them."""
        lines = [f"frames read {self.frames_in}, frames written {self.frames_out}"]
        width = max([len("port"), *(len(name) for name in self.counters)])
        lines.append(f"{'port':<{width}}  {'rx_packets':>10} {'rx_bytes':>10} {'tx_packets':>10} {'tx_bytes':>10}  drops")
        for name, counts in self.counters.items():
            drops = ", ".join(f"{reason}={n}" for reason, n in sorted(counts["drops"].items())) or "-"
            lines.append(
                f"{name:<{width}}  {counts['rx_packets']:>10} {counts['rx_bytes']:>10} "
                f"{counts['tx_packets']:>10} {counts['tx_bytes']:>10}  {drops}"
            )
        lines.append("drops by reason:")
        if not self.drops:
            lines.append("  (none)")
        for reason, n in self.drops.items():
            lines.append(f"  {reason:<24} {n}")
        return "\n".join(lines)


def load_cluster(stack: str | os.PathLike | None) -> Cluster:
    """Compile the stack file at `stack`, or the built-in demo stack when None.

    The root namespace's networks are not passed in, so automatic subnets come
    out the same on every machine, which keeps replays reproducible.
    """
    from tapnet import stack as stack_module

    if stack is None:
        return stack_module.load_demo(root_networks=())
    return stack_module.load_stack_file(stack, root_networks=())


def input_ports(capture: Capture, port_names: list[str], port: str | None) -> np.ndarray:
    """Map each capture interface to a port id: `port` for all of them, else each interface's name.

    Raises ReplayError naming the stack's ports when a name is not one of
    them, or when a pcap (which has no interface names) comes without `port`.
    """
    by_name = {name: i for i, name in enumerate(port_names)}
    known = "ports of this stack: " + ", ".join(port_names)
    if port is not None:
        if port not in by_name:
            raise ReplayError(f"--port {port!r} is not a port of the stack; {known}")
        return np.full(max(len(capture.interfaces), 1), by_name[port], dtype=np.int32)

    used = set(np.unique(capture.interface_ids).tolist()) if len(capture) else set()
    ids = np.full(max(len(capture.interfaces), 1), -1, dtype=np.int32)
    for number, interface in enumerate(capture.interfaces):
        if number not in used:
            continue
        if interface.name is None:
            what = "a pcap file" if capture.format == "pcap" else f"pcapng interface {number} (no if_name)"
            raise ReplayError(f"{capture.path}: {what} names no port; give one with --port NAME; {known}")
        if interface.name not in by_name:
            raise ReplayError(
                f"{capture.path}: capture interface {interface.name!r} is not a port of the stack; {known}"
            )
        ids[number] = by_name[interface.name]
    return ids


def replay(
    cluster: Cluster,
    capture: Capture,
    out: BinaryIO | None,
    *,
    port: str | None = None,
    seed: int = DEFAULT_SEED,
    comments: bool = True,
    frames_per_batch: int = DEFAULT_BATCH,
) -> ReplayResult:
    """Run `capture` through a fresh datapath for `cluster`; write emitted frames to `out` as pcapng."""
    from tapnet.datapath import Fabric

    capture.check_ethernet()
    fabric = Fabric(cluster)
    port_names = list(fabric.port_names)
    ports = input_ports(capture, port_names, port)
    rng = np.random.default_rng(seed)
    writer = PcapNgWriter(out) if out is not None else None
    # Output interface id of each port, -1 until the port first emits.
    interface_of_port = np.full(len(port_names), -1, dtype=np.int64)
    result = ReplayResult()
    log.info("replay %s: %d frames, seed %d, batches of %d", capture.path, len(capture), seed, frames_per_batch)

    for batch in capture.batches(ports, frames_per_batch):
        # Timers run inside `process` at packet times, so the output does not depend on the batch size.
        processed = fabric.process(batch, None, rng, trace=comments)
        result.frames_in += batch.count
        emits = processed.emits
        if not emits:
            continue
        result.frames_out += len(emits)
        if writer is None:
            continue
        _write_emits(writer, emits, batch.timestamps, port_names, interface_of_port, comments)

    if out is not None:
        out.flush()
    result.ports_written = list(writer.interface_names) if writer is not None else []
    result.counters = fabric.counters()
    result.drops = fabric.drops_by_reason()
    return result


def _write_emits(writer: PcapNgWriter, emits, timestamps: np.ndarray, port_names, interface_of_port, comments) -> None:
    egress = np.fromiter((emit.port for emit in emits), dtype=np.int64, count=len(emits))
    # Give ports that emit for the first time their interface, in order of first emission.
    new = np.nonzero(interface_of_port[egress] < 0)[0]
    for position in new:
        port_id = egress[position]
        if interface_of_port[port_id] < 0:
            interface_of_port[port_id] = writer.interface_id(port_names[port_id])
    interfaces = interface_of_port[egress]

    indices = np.fromiter((emit.index for emit in emits), dtype=np.int64, count=len(emits))
    frames = [emit.frame if emit.vnet is None else complete_checksum(emit.frame, emit.vnet) for emit in emits]
    stories = None
    if comments:
        # A flooded frame shares one record among its copies: format it once.
        formatted: dict[int, str] = {}
        stories = []
        for emit in emits:
            record = emit.record
            if record is None:
                stories.append(None)
                continue
            story = formatted.get(id(record))
            if story is None:
                story = formatted[id(record)] = record.format()
            stories.append(story)
    writer.write_frames(interfaces, frames, timestamps[indices], stories)


def complete_checksum(frame: bytes, vnet: bytes) -> bytes:
    """Finish a partial checksum the way a NIC would, so captures show no checksum errors.

    With VIRTIO_NET_HDR_F_NEEDS_CSUM, the 16 bits at csum_start + csum_offset
    hold the pseudo-header sum. The one's-complement sum from csum_start to
    the end of the frame, complemented, replaces them. A GSO superframe keeps
    its size: the capture shows it as one frame, as tcpdump does on a TSO
    interface.
    """
    flags = vnet[0]
    if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return frame
    csum_start, csum_offset = struct.unpack_from("<HH", vnet, 6)
    position = csum_start + csum_offset
    if position + 2 > len(frame) or csum_start >= len(frame):
        return frame  # the parser counts such a header as malformed-vnet-hdr; leave the bytes alone
    data = np.frombuffer(frame, dtype=np.uint8)[csum_start:]
    if len(data) % 2:
        data = np.append(data, np.uint8(0))
    total = int(data.view(">u2").astype(np.uint64).sum())
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    return frame[:position] + struct.pack(">H", checksum) + frame[position + 2 :]


# ---------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="Run a capture through the datapath and write what it emits, with each frame's story.",
        description=(
            "Read frames from a pcap or pcapng capture, run them through the datapath of a stack with the "
            "capture's timestamps as the clock, and write the emitted frames to a pcapng file with one interface "
            "per egress port and the story of each frame as its comment. Same input, same output, byte for byte."
        ),
        epilog="exit status: 0 on success or when the output matches --expect, 1 when it differs, "
        "2 for invalid arguments, captures or stacks",
    )
    parser.add_argument("--stack", metavar="FILE", help="stack file (default: the built-in demo stack)")

    parser.add_argument("-r", dest="read", metavar="CAPTURE", required=True, help="pcap or pcapng file to replay")
    parser.add_argument("-w", dest="write", metavar="OUT.pcapng", help="pcapng file to write the emitted frames to")
    parser.add_argument(
        "--port",
        metavar="NAME",
        help="port every frame enters on, such as node1/proxy.1/eth0 (required for pcap; "
        "pcapng otherwise uses each interface's name)",
    )

    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the random generator (default {DEFAULT_SEED})")
    parser.add_argument(
        "--no-comments", action="store_true", help="write no per-frame stories and run the datapath without tracing"
    )
    parser.add_argument("--summary", action="store_true", help="print frame counts per port and drops per reason")

    parser.add_argument("--expect", metavar="EXPECTED.pcapng", help="compare the output with this earlier output")
    parser.add_argument(
        "--ignore",
        metavar="FIELD",
        action="append",
        default=[],
        help="with --expect: a field to leave out of the comparison, in tshark's name (ip.id, tcp.seq, "
        "frame.comment, ...); may be repeated",
    )

    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N", help=f"frames per datapath call (default {DEFAULT_BATCH})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tapnet import compare

    if args.write is None and not args.summary and args.expect is None:
        print("tapnet replay: nothing to do: give -w OUT.pcapng, --summary or --expect", file=sys.stderr)
        return 2
    if args.ignore and args.expect is None:
        print("tapnet replay: --ignore needs --expect", file=sys.stderr)
        return 2
    if args.batch < 1:
        print(f"tapnet replay: invalid --batch {args.batch}: must be at least 1", file=sys.stderr)
        return 2
    try:
        for name in args.ignore:
            compare.canonical_field(name)
        expected = open_capture(args.expect) if args.expect is not None else None
        capture = open_capture(args.read)
    except FileNotFoundError as error:
        print(f"tapnet replay: capture file not found: {error.filename}", file=sys.stderr)
        return 2
    except (CaptureError, ValueError, OSError) as error:
        print(f"tapnet replay: {error}", file=sys.stderr)
        return 2
    try:
        cluster = load_cluster(args.stack)
    except (ValueError, OSError) as error:
        print(f"tapnet replay: invalid stack {args.stack or '(built-in demo)'}: {error}", file=sys.stderr)
        return 2
    try:
        result, output = _replay_to(args, cluster, capture, expected is not None)
    except (CaptureError, ReplayError, OSError) as error:
        print(f"tapnet replay: {error}", file=sys.stderr)
        return 2

    if args.summary:
        print(result.format_summary())
    if expected is None:
        return 0
    comparison = compare.compare_captures(expected, output, args.ignore)
    if comparison.matches:
        print(f"tapnet replay: {comparison.format()}")
        return 0
    print(f"tapnet replay: output differs from {args.expect}", file=sys.stderr)
    print(comparison.format(), file=sys.stderr)
    return 1


def _replay_to(args, cluster: Cluster, capture: Capture, keep_output: bool) -> tuple[ReplayResult, Capture | None]:
    """Replay into `-w` or, when only a comparison needs the output, into memory."""
    options = dict(port=args.port, seed=args.seed, comments=not args.no_comments, frames_per_batch=args.batch)
    if args.write is not None:
        try:
            with open(args.write, "wb") as stream:
                result = replay(cluster, capture, stream, **options)
        except BaseException:
            # No half-written capture is left behind to be mistaken for a result.
            os.unlink(args.write)
            raise
        return result, open_capture(args.write) if keep_output else None
    if keep_output:
        buffer = io.BytesIO()
        result = replay(cluster, capture, buffer, **options)
        return result, capture_from_bytes(buffer.getvalue(), "<replay output>")
    return replay(cluster, capture, None, **options), None
