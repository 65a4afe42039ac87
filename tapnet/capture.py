"""`tapnet capture`: frames where they enter and leave tapnet, written as pcapng.

The daemon side (`tapnet.watch`) turns each frame a capture subscriber
selects into a `CaptureEntry`: the port it passed, the wall-clock time, the
frame as a capture file should show it, and a packet comment. The client
side (`run_capture`) polls the daemon and appends the entries to a pcapng
file with one interface per port, named like the port (`node1/web.1/eth0`,
`node1/vxlan`). An encapsulated frame therefore appears on the sending
sandbox's port, on both nodes' VXLAN ports and on the receiving sandbox's
port, and all four carry the same trace id in their comments.

Frames from TAPs with offloads may carry a partial TCP or UDP checksum
(`VIRTIO_NET_HDR_F_NEEDS_CSUM`). The capture completes it, so Wireshark and
tshark report no checksum error. A GSO superframe stays whole, as tcpdump
shows it on an interface with TSO, and its comment notes that.

Every block is written whole, so the file stays valid when the capture is
interrupted at any point between two polls.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import signal
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1  # linux/virtio_net.h
GSO_TYPES = {1: "TCPv4", 3: "UDP", 4: "TCPv6", 5: "UDP_L4"}  # VIRTIO_NET_HDR_GSO_*, ECN bit (0x80) masked off

POLL_INTERVAL = 0.1  # seconds between polls of the daemon when the last poll emptied the queue
POLL_MAX_BYTES = 4 << 20  # frame bytes per poll response, before base64


@dataclass
class CaptureEntry:
    """One frame as a capture file records it."""

    port: str  # interface name in the file: the port's name
    time: float  # wall-clock seconds since the epoch
    frame: bytes
    comment: str

    def to_wire(self) -> list:
        return [self.port, self.time, base64.b64encode(self.frame).decode("ascii"), self.comment]

    @classmethod
    def from_wire(cls, item: list) -> "CaptureEntry":
        port, when, frame, comment = item
        return cls(str(port), float(when), base64.b64decode(frame), str(comment))


def capture_form(frame: bytes, vnet: bytes | None) -> tuple[bytes, list[str]]:
    """Return `frame` as a capture shows it (partial checksum completed) and notes for its comment."""
    if vnet is None or len(vnet) < 10 or not any(vnet):
        return frame, []
    from tapnet import offload  # numba; imported only when a frame carries offload state

    flags, gso_type, _hdr_len, gso_size, _csum_start, _csum_offset = struct.unpack_from("<BBHHHH", vnet)
    notes = []
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        try:
            frame = offload.complete_checksum(frame, vnet)
            notes.append("partial checksum completed by the capture")
        except ValueError as error:
            notes.append(f"checksum left partial: {error}")
    kind = gso_type & 0x7F
    if kind:
        name = GSO_TYPES.get(kind, f"type {kind}")
        notes.append(f"GSO superframe of {len(frame)} bytes kept whole ({name}, gso_size {gso_size})")
    return frame, notes


def comment_for(story_id: int, hop: int, record, direction: str, port: str, notes: list[str], decisions: str | None = None) -> str:
    """Build the packet comment: trace id, where the frame was seen, the stages that decided it, the verdict.

    `hop` counts the records of the story from 1. A hop after the first
    names its own record id too, so that both ids can be looked up.
    `decisions` is `record_decisions(record)` when the caller has it already.
    """
    where = f"trace {story_id}" if hop == 1 else f"trace {story_id} hop {hop} (record {record.id})"
    text = f"{where} {direction} {port} | {decisions or record_decisions(record)}"
    for note in notes:
        text += f" | {note}"
    return text


def record_decisions(record) -> str:
    """Format the stages' decisions and the verdict of one record, as the comments of its frames show them."""
    steps = "; ".join(event.format() for event in record.events) or "no stage ran"
    verdict = record.verdict or "none"
    if record.reason:
        verdict += f" reason={record.reason}"
    if record.egress:
        verdict += " to " + ",".join(record.egress)
    return f"{steps} | verdict: {verdict}"


# ---------------------------------------------------------------------------
# Client side


class CaptureWriter:
    """A pcapng file fed with `CaptureEntry` lists; one interface per port name."""

    def __init__(self, stream: BinaryIO):
        from tapnet.pcapio import PcapNgWriter

        self.writer = PcapNgWriter(stream, application="tapnet capture")
        self.frames = 0

    def write(self, entries: list[CaptureEntry]) -> None:
        if not entries:
            return
        interfaces = [self.writer.interface_id(entry.port) for entry in entries]
        self.writer.write_frames(interfaces, [e.frame for e in entries], [e.time for e in entries], [e.comment for e in entries])
        self.writer.flush()
        self.frames += len(entries)


def run_capture(instance: str, flt, open_stream, count: int | None, duration: float | None, report) -> int:
    """Subscribe to `instance`, write what it captures until count, duration or a signal; return frames written.

    `flt` is a `tapnet.bpf.Filter`. `open_stream()` returns the binary stream
    to write and is called only once the daemon accepted the subscription, so
    a failed start leaves no file behind. `report(message)` receives the
    notes for the user (drops, end of capture). SIGINT and SIGTERM end the
    capture between two polls, never inside a write. Raises ControlError when
    the daemon cannot be reached; the frames written so far stay a valid file.
    """
    from tapnet.control import ControlError, request

    subscription = request(instance, "trace-subscribe", kind="capture", expression=flt.expression, program=flt.to_rows())
    subscriber = subscription["id"]
    try:
        writer = CaptureWriter(open_stream())
    except BaseException:
        request(instance, "trace-unsubscribe", id=subscriber)
        raise
    deadline = None if duration is None else time.monotonic() + duration
    dropped = 0
    with stop_on_signals() as stopped:
        try:
            while not stopped() and (count is None or writer.frames < count):
                response = request(instance, "trace-poll", id=subscriber, max_bytes=POLL_MAX_BYTES)
                entries = [CaptureEntry.from_wire(item) for item in response["items"]]
                if count is not None:
                    entries = entries[: count - writer.frames]
                writer.write(entries)
                if response["dropped"]:
                    dropped += response["dropped"]
                    report(f"{response['dropped']} frames dropped: the capture queue was full (the client polls too slowly)")
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not response["more"]:
                    time.sleep(POLL_INTERVAL)
        finally:
            try:
                request(instance, "trace-unsubscribe", id=subscriber)
            except ControlError as error:
                log.info("unsubscribing capture %d failed: %s", subscriber, error)
    report(f"{writer.frames} frames captured" + (f", {dropped} dropped" if dropped else ""))
    return writer.frames


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT and SIGTERM into a flag for the duration of the block; yields a function that reads it."""
    received: list[int] = []
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handlers[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield lambda: bool(received)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
