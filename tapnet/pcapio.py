"""Capture files: read pcap and pcapng into `FrameBatch` chunks, write pcapng.

Reading is built for replay's hot path. `open_capture` maps the file
copy-on-write and walks its records with numba: one pass counts them, a
second fills the arrays the first one sized. No Python code runs per frame.
A batch is a view into the mapped file, with `offsets` counted from its
first frame, and the datapath may rewrite frames in place without touching
the file on disk.

Formats read:
- pcap: both byte orders, microsecond (magic a1b2c3d4) and nanosecond
  (magic a1b23c4d) timestamps. Replay takes link type Ethernet only.
- pcapng: any number of sections, each in either byte order. Interface
  Description Blocks with `if_name`, `if_tsresol` and `if_tsoffset`, and
  Enhanced, Simple and the obsolete Packet Blocks. Unknown blocks are
  skipped. A Simple Packet Block carries no timestamp, so its frame takes
  the time of the frame before it.

Format written: pcapng, little-endian, one section, one Interface
Description Block per port (link type Ethernet, snaplen 0, `if_name` = port
name, `if_tsresol` = microseconds), Enhanced Packet Blocks with an optional
`opt_comment` each.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import numba
import numpy as np

from tapnet.batch import VNET_HDR_LEN, FrameBatch

log = logging.getLogger(__name__)

LINKTYPE_ETHERNET = 1

# pcap global header magics as read in the file's own byte order (pcap-savefile(5)).
PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAP_HEADER_LEN = 24
PCAP_RECORD_HEADER_LEN = 16

# pcapng block types and option codes (pcapng specification, IETF draft-ietf-opsawg-pcapng).
BLOCK_SHB = 0x0A0D0D0A
BLOCK_IDB = 0x00000001
BLOCK_PB = 0x00000002  # obsolete Packet Block
BLOCK_SPB = 0x00000003
BLOCK_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
IF_NAME = 2
IF_TSRESOL = 9
IF_TSOFFSET = 14

# Larger records are taken as corruption rather than as frames. Wireshark
# applies the same bound (WTAP_MAX_PACKET_SIZE_STANDARD, 262144 bytes).
MAX_RECORD_LEN = 262144

WRITE_TSRESOL_EXPONENT = 6  # timestamps written in microseconds
WRITE_TICKS_PER_SECOND = 10**WRITE_TSRESOL_EXPONENT


class CaptureError(ValueError):
    """A capture file that is not pcap or pcapng, or is truncated or corrupt."""

    def __init__(self, path: str, offset: int, problem: str):
        self.path = path
        self.offset = offset
        self.problem = problem
        super().__init__(f"{path}: {problem} at byte offset {offset}")


@dataclass(frozen=True)
class Interface:
    """One capture interface: the pcap file as a whole, or one pcapng IDB."""

    name: str | None
    linktype: int
    snaplen: int
    ticks_per_second: int  # timestamp resolution
    tsoffset: int = 0  # seconds added to every timestamp (if_tsoffset)
    big_endian: bool = False  # byte order of the section that defines it


# Error codes the scanners return; `_SCAN_ERRORS` turns them into messages.
_OK = 0
_ERR_TRUNCATED_BLOCK = 1
_ERR_BLOCK_LENGTH = 2
_ERR_TRAILER = 3
_ERR_BYTE_ORDER = 4
_ERR_PACKET_BEYOND_BLOCK = 5
_ERR_UNKNOWN_INTERFACE = 6
_ERR_TRUNCATED_RECORD = 7
_ERR_RECORD_LENGTH = 8

_SCAN_ERRORS = {
    _ERR_TRUNCATED_BLOCK: "truncated pcapng block (the file ends inside it)",
    _ERR_BLOCK_LENGTH: "invalid pcapng block length (below 12 or not a multiple of 4)",
    _ERR_TRAILER: "corrupt pcapng block (its trailing length differs from its leading length)",
    _ERR_BYTE_ORDER: "invalid pcapng section header (byte-order magic is neither 1a2b3c4d nor 4d3c2b1a)",
    _ERR_PACKET_BEYOND_BLOCK: "corrupt pcapng packet block (captured length runs past the block)",
    _ERR_UNKNOWN_INTERFACE: "pcapng packet block names an interface its section does not define",
    _ERR_TRUNCATED_RECORD: "truncated pcap record (the file ends inside it)",
    _ERR_RECORD_LENGTH: f"invalid pcap record length (above {MAX_RECORD_LEN} bytes)",
}


# ---------------------------------------------------------------------------
# Scanners (numba). Each returns (count, error code, error offset). With
# `fill` false they only count; the caller then sizes the arrays and calls
# again with `fill` true.


@numba.njit(cache=True, inline="always")
def _u16(data, pos, big):
    if big:
        return (np.uint32(data[pos]) << 8) | np.uint32(data[pos + 1])
    return np.uint32(data[pos]) | (np.uint32(data[pos + 1]) << 8)


@numba.njit(cache=True, inline="always")
def _u32(data, pos, big):
    if big:
        return (
            (np.uint32(data[pos]) << 24)
            | (np.uint32(data[pos + 1]) << 16)
            | (np.uint32(data[pos + 2]) << 8)
            | np.uint32(data[pos + 3])
        )
    return (
        np.uint32(data[pos])
        | (np.uint32(data[pos + 1]) << 8)
        | (np.uint32(data[pos + 2]) << 16)
        | (np.uint32(data[pos + 3]) << 24)
    )


@numba.njit(cache=True)
def _scan_pcap(data, big, ticks_per_second, fill, offsets, lengths, orig_lengths, ticks):
    n = data.shape[0]
    pos = 24
    count = 0
    while pos < n:
        if n - pos < 16:
            return count, 7, pos  # _ERR_TRUNCATED_RECORD
        seconds = np.uint64(_u32(data, pos, big))
        fraction = np.uint64(_u32(data, pos + 4, big))
        caplen = _u32(data, pos + 8, big)
        origlen = _u32(data, pos + 12, big)
        if caplen > 262144:  # MAX_RECORD_LEN
            return count, 8, pos  # _ERR_RECORD_LENGTH
        if pos + 16 + caplen > n:
            return count, 7, pos  # _ERR_TRUNCATED_RECORD
        if fill:
            offsets[count] = pos + 16
            lengths[count] = caplen
            orig_lengths[count] = origlen
            ticks[count] = seconds * np.uint64(ticks_per_second) + fraction
        count += 1
        pos += 16 + caplen
    return count, 0, pos


@numba.njit(cache=True)
def _scan_pcapng(
    data, fill, offsets, lengths, orig_lengths, ticks, has_ticks, interfaces, option_offsets, option_lengths,
    idb_offsets, idb_big,
):
    # `interfaces` receives global interface numbers: the IDBs of all sections
    # numbered in file order, so a later section's interface 0 gets a new number.
    n = data.shape[0]
    pos = 0
    big = False
    count = 0
    idb_count = 0
    section_base = 0
    while pos < n:
        if n - pos < 12:
            return count, idb_count, 1, pos  # _ERR_TRUNCATED_BLOCK
        if data[pos] == 0x0A and data[pos + 1] == 0x0D and data[pos + 2] == 0x0D and data[pos + 3] == 0x0A:
            if data[pos + 8] == 0x1A and data[pos + 9] == 0x2B and data[pos + 10] == 0x3C and data[pos + 11] == 0x4D:
                big = True
            elif data[pos + 8] == 0x4D and data[pos + 9] == 0x3C and data[pos + 10] == 0x2B and data[pos + 11] == 0x1A:
                big = False
            else:
                return count, idb_count, 4, pos  # _ERR_BYTE_ORDER
            section_base = idb_count
        block_type = _u32(data, pos, big)
        block_len = np.int64(_u32(data, pos + 4, big))
        if block_len < 12 or block_len % 4 != 0:
            return count, idb_count, 2, pos  # _ERR_BLOCK_LENGTH
        if pos + block_len > n:
            return count, idb_count, 1, pos  # _ERR_TRUNCATED_BLOCK
        if np.int64(_u32(data, pos + block_len - 4, big)) != block_len:
            return count, idb_count, 3, pos  # _ERR_TRAILER

        if block_type == 1:  # IDB
            if fill:
                idb_offsets[idb_count] = pos
                idb_big[idb_count] = big
            idb_count += 1
        elif block_type == 6 or block_type == 2:  # EPB, or the obsolete PB with the same layout
            if block_len < 32:
                return count, idb_count, 2, pos
            if block_type == 6:
                local = np.int64(_u32(data, pos + 8, big))
            else:
                local = np.int64(_u16(data, pos + 8, big))
            caplen = np.int64(_u32(data, pos + 20, big))
            padded = (caplen + 3) & ~3
            if 28 + padded + 4 > block_len:
                return count, idb_count, 5, pos  # _ERR_PACKET_BEYOND_BLOCK
            if local >= idb_count - section_base:
                return count, idb_count, 6, pos  # _ERR_UNKNOWN_INTERFACE
            if fill:
                offsets[count] = pos + 28
                lengths[count] = caplen
                orig_lengths[count] = _u32(data, pos + 24, big)
                ticks[count] = (np.uint64(_u32(data, pos + 12, big)) << np.uint64(32)) | np.uint64(
                    _u32(data, pos + 16, big)
                )
                has_ticks[count] = True
                interfaces[count] = section_base + local
                option_offsets[count] = pos + 28 + padded
                option_lengths[count] = block_len - 4 - (28 + padded)
            count += 1
        elif block_type == 3:  # SPB: interface 0 of the section, no timestamp
            if block_len < 16:
                return count, idb_count, 2, pos
            if idb_count == section_base:
                return count, idb_count, 6, pos
            origlen = np.int64(_u32(data, pos + 8, big))
            caplen = min(origlen, block_len - 16)
            if fill:
                offsets[count] = pos + 12
                lengths[count] = caplen
                orig_lengths[count] = origlen
                ticks[count] = 0
                has_ticks[count] = False
                interfaces[count] = section_base
                option_offsets[count] = pos + block_len - 4
                option_lengths[count] = 0
            count += 1
        pos += block_len
    return count, idb_count, 0, pos


# ---------------------------------------------------------------------------
# Reading


class Capture:
    """An opened capture file: its interfaces and an index of its frames.

    Frame `i` is `data[offsets[i] : offsets[i] + lengths[i]]`, seen on
    interface `interfaces[i]` at `timestamps[i]` (seconds since the epoch).
    """

    def __init__(self, path: str, data: np.ndarray):
        self.path = path
        self.data = data
        self.format = ""
        self.interfaces: list[Interface] = []
        self.offsets = np.zeros(0, dtype=np.int64)
        self.lengths = np.zeros(0, dtype=np.int32)
        self.orig_lengths = np.zeros(0, dtype=np.int64)
        self.interface_ids = np.zeros(0, dtype=np.int32)
        self.timestamps = np.zeros(0, dtype=np.float64)
        self.ticks = np.zeros(0, dtype=np.uint64)  # raw timestamps in their interface's resolution
        self._option_offsets = np.zeros(0, dtype=np.int64)
        self._option_lengths = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def frame(self, i: int) -> bytes:
        start = int(self.offsets[i])
        return self.data[start : start + int(self.lengths[i])].tobytes()

    def interface_name(self, i: int) -> str | None:
        """Name of the interface frame `i` was captured on (None for pcap, or an IDB without if_name)."""
        return self.interfaces[int(self.interface_ids[i])].name

    def time_ticks(self, i: int) -> tuple[int, int]:
        """Timestamp of frame `i` as exact (ticks, ticks per second), for comparisons without float rounding."""
        interface = self.interfaces[int(self.interface_ids[i])]
        ticks = int(self.ticks[i]) + interface.tsoffset * interface.ticks_per_second
        return ticks, interface.ticks_per_second

    def comment(self, i: int) -> str | None:
        """Return the first `opt_comment` of frame `i`, or None."""
        comments = self.comments(i)
        return comments[0] if comments else None

    def comments(self, i: int) -> list[str]:
        if self.format != "pcapng":
            return []
        start = int(self._option_offsets[i])
        end = start + int(self._option_lengths[i])
        big = self.interfaces[int(self.interface_ids[i])].big_endian
        raw = self.data[start:end].tobytes()
        return [value.decode("utf-8", "replace") for code, value in _iter_options(raw, big) if code == OPT_COMMENT]

    def check_ethernet(self) -> None:
        """Raise CaptureError when a frame comes from an interface whose link type is not Ethernet."""
        linktypes = np.array([interface.linktype for interface in self.interfaces], dtype=np.int64)
        if len(self) == 0:
            return
        bad = np.nonzero(linktypes[self.interface_ids] != LINKTYPE_ETHERNET)[0]
        if len(bad):
            first = int(bad[0])
            interface = self.interfaces[int(self.interface_ids[first])]
            raise CaptureError(
                self.path,
                int(self.offsets[first]),
                f"frame {first} has link type {interface.linktype}; tapnet replays Ethernet (link type 1) only",
            )

    def batches(self, ports: np.ndarray, frames_per_batch: int) -> Iterator[FrameBatch]:
        """Yield the frames in file order as `FrameBatch` views of at most `frames_per_batch` frames.

        `ports[interface id]` is the port id the frames of that interface enter on.
        A batch's `buf` is the stretch of the mapped file from its first frame
        to the end of its last (record headers between frames included), so a
        batch costs no copy. `used` is that stretch's length, so `append` on
        such a batch raises OverflowError.
        """
        if frames_per_batch < 1:
            raise ValueError(f"invalid batch size {frames_per_batch}: must be at least 1")
        ports = np.asarray(ports, dtype=np.int32)
        frame_ports = ports[self.interface_ids] if len(self) else np.zeros(0, dtype=np.int32)
        for start in range(0, len(self), frames_per_batch):
            stop = min(start + frames_per_batch, len(self))
            base = int(self.offsets[start])
            end = int(self.offsets[stop - 1]) + int(self.lengths[stop - 1])
            batch = FrameBatch(capacity_frames=0, capacity_bytes=0)
            batch.buf = self.data[base:end]
            batch.offsets = self.offsets[start:stop] - base
            batch.lengths = self.lengths[start:stop]
            batch.ports = frame_ports[start:stop]
            batch.vnet = np.zeros((stop - start, VNET_HDR_LEN), dtype=np.uint8)
            batch.timestamps = self.timestamps[start:stop]
            batch.count = stop - start
            batch.used = end - base
            yield batch


def open_capture(path: str | os.PathLike) -> Capture:
    """Map a pcap or pcapng file and index its frames; raises CaptureError for anything else."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CaptureError(path, 0, "empty file, not a pcap or pcapng capture")
    # Copy-on-write: batches may be rewritten in place, the file never is.
    data = np.asarray(np.memmap(path, dtype=np.uint8, mode="c"))
    return _index(path, data)


def capture_from_bytes(content: bytes, name: str = "<memory>") -> Capture:
    """Index a capture held in memory (for example a replay output never written to disk)."""
    if not content:
        raise CaptureError(name, 0, "empty file, not a pcap or pcapng capture")
    return _index(name, np.frombuffer(bytearray(content), dtype=np.uint8))


def _index(path: str, data: np.ndarray) -> Capture:
    capture = Capture(path, data)
    if len(data) < 4:
        raise CaptureError(path, 0, "file too short to be a pcap or pcapng capture")
    head = data[:4].tobytes()
    if head == b"\x0a\x0d\x0d\x0a":
        _index_pcapng(capture)
    elif head in (
        struct.pack("<I", PCAP_MAGIC_USEC),
        struct.pack(">I", PCAP_MAGIC_USEC),
        struct.pack("<I", PCAP_MAGIC_NSEC),
        struct.pack(">I", PCAP_MAGIC_NSEC),
    ):
        _index_pcap(capture)
    else:
        raise CaptureError(path, 0, f"not a pcap or pcapng capture (first bytes {head.hex()})")

    snapped = int(np.count_nonzero(capture.orig_lengths > capture.lengths))
    if snapped:
        log.warning("%s: %d frames were cut short by the capture's snaplen", path, snapped)
    return capture


def _index_pcap(capture: Capture) -> None:
    data = capture.data
    if len(data) < PCAP_HEADER_LEN:
        raise CaptureError(capture.path, 0, "truncated pcap file header (24 bytes expected)")
    little_magic = struct.unpack("<I", data[:4].tobytes())[0]
    big = little_magic not in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC)
    order = ">" if big else "<"
    magic, _major, _minor, _zone, _sigfigs, snaplen, linktype = struct.unpack(order + "IHHiIII", data[:24].tobytes())
    ticks_per_second = 10**9 if magic == PCAP_MAGIC_NSEC else 10**6
    # The upper 16 bits of the link-type field may carry FCS information (pcap-savefile(5)).
    capture.format = "pcap"
    capture.interfaces = [Interface(None, linktype & 0xFFFF, snaplen, ticks_per_second, 0, big)]

    empty64 = np.zeros(0, dtype=np.int64)
    count, error, offset = _scan_pcap(
        data, big, ticks_per_second, False, empty64, np.zeros(0, np.int32), empty64, np.zeros(0, np.uint64)
    )
    if error:
        raise CaptureError(capture.path, int(offset), _SCAN_ERRORS[error])
    capture.offsets = np.zeros(count, dtype=np.int64)
    capture.lengths = np.zeros(count, dtype=np.int32)
    capture.orig_lengths = np.zeros(count, dtype=np.int64)
    capture.ticks = np.zeros(count, dtype=np.uint64)
    _scan_pcap(
        data, big, ticks_per_second, True, capture.offsets, capture.lengths, capture.orig_lengths, capture.ticks
    )
    capture.interface_ids = np.zeros(count, dtype=np.int32)
    capture.timestamps = _seconds(capture.ticks, capture.interface_ids, capture.interfaces)


def _index_pcapng(capture: Capture) -> None:
    data = capture.data
    empty64 = np.zeros(0, dtype=np.int64)
    empty32 = np.zeros(0, dtype=np.int32)
    count, idb_count, error, offset = _scan_pcapng(
        data, False, empty64, empty32, empty64, np.zeros(0, np.uint64), np.zeros(0, np.bool_), empty32,
        empty64, empty64, empty64, np.zeros(0, np.bool_),
    )
    if error:
        raise CaptureError(capture.path, int(offset), _SCAN_ERRORS[error])

    capture.format = "pcapng"
    capture.offsets = np.zeros(count, dtype=np.int64)
    capture.lengths = np.zeros(count, dtype=np.int32)
    capture.orig_lengths = np.zeros(count, dtype=np.int64)
    capture.ticks = np.zeros(count, dtype=np.uint64)
    has_ticks = np.zeros(count, dtype=np.bool_)
    capture.interface_ids = np.zeros(count, dtype=np.int32)
    capture._option_offsets = np.zeros(count, dtype=np.int64)
    capture._option_lengths = np.zeros(count, dtype=np.int64)
    idb_offsets = np.zeros(idb_count, dtype=np.int64)
    idb_big = np.zeros(idb_count, dtype=np.bool_)
    _scan_pcapng(
        data, True, capture.offsets, capture.lengths, capture.orig_lengths, capture.ticks, has_ticks,
        capture.interface_ids, capture._option_offsets, capture._option_lengths, idb_offsets, idb_big,
    )

    capture.interfaces = [_parse_idb(capture.path, data, int(o), bool(b)) for o, b in zip(idb_offsets, idb_big)]
    capture.timestamps = _seconds(capture.ticks, capture.interface_ids, capture.interfaces)
    if count and not has_ticks.all():
        # Simple Packet Blocks: carry the previous frame's time forward.
        source = np.where(has_ticks, np.arange(count), -1)
        source = np.maximum.accumulate(source)
        capture.timestamps = np.where(source >= 0, capture.timestamps[np.maximum(source, 0)], 0.0)


def _parse_idb(path: str, data: np.ndarray, offset: int, big: bool) -> Interface:
    order = ">" if big else "<"
    block_len = struct.unpack(order + "I", data[offset + 4 : offset + 8].tobytes())[0]
    if block_len < 20:
        raise CaptureError(path, offset, "invalid pcapng interface description block (shorter than 20 bytes)")
    linktype, _reserved, snaplen = struct.unpack(order + "HHI", data[offset + 8 : offset + 16].tobytes())
    name = None
    ticks_per_second = 10**6
    tsoffset = 0
    for code, value in _iter_options(data[offset + 16 : offset + block_len - 4].tobytes(), big):
        if code == IF_NAME:
            name = value.rstrip(b"\0").decode("utf-8", "replace")
        elif code == IF_TSRESOL and value:
            ticks_per_second = _ticks_per_second(path, offset, value[0])
        elif code == IF_TSOFFSET and len(value) >= 8:
            tsoffset = struct.unpack(order + "q", value[:8])[0]
    return Interface(name, linktype, snaplen, ticks_per_second, tsoffset, big)


def _ticks_per_second(path: str, offset: int, tsresol: int) -> int:
    """Decode if_tsresol: the low 7 bits are an exponent of 10, or of 2 when the top bit is set."""
    exponent = tsresol & 0x7F
    if tsresol & 0x80:
        if exponent > 63:
            raise CaptureError(path, offset, f"unsupported if_tsresol 2^-{exponent}")
        return 1 << exponent
    if exponent > 18:
        raise CaptureError(path, offset, f"unsupported if_tsresol 10^-{exponent}")
    return 10**exponent


def _iter_options(raw: bytes, big: bool) -> Iterator[tuple[int, bytes]]:
    """Yield (code, value) for each option in a pcapng options area; stops at opt_endofopt or a short option."""
    order = ">" if big else "<"
    pos = 0
    while pos + 4 <= len(raw):
        code, length = struct.unpack(order + "HH", raw[pos : pos + 4])
        if code == OPT_ENDOFOPT:
            return
        value = raw[pos + 4 : pos + 4 + length]
        if len(value) < length:
            return
        yield code, value
        pos += 4 + ((length + 3) & ~3)


def _seconds(ticks: np.ndarray, interface_ids: np.ndarray, interfaces: Sequence[Interface]) -> np.ndarray:
    """Convert raw timestamps to float seconds, splitting whole seconds off first to keep precision."""
    if len(ticks) == 0:
        return np.zeros(0, dtype=np.float64)
    per_second = np.array([i.ticks_per_second for i in interfaces], dtype=np.uint64)[interface_ids]
    offsets = np.array([i.tsoffset for i in interfaces], dtype=np.float64)[interface_ids]
    whole = ticks // per_second
    fraction = ticks % per_second
    return whole.astype(np.float64) + fraction.astype(np.float64) / per_second.astype(np.float64) + offsets


# ---------------------------------------------------------------------------
# Writing


@numba.njit(cache=True, inline="always")
def _put_u32(out, pos, value):
    out[pos] = value & 0xFF
    out[pos + 1] = (value >> 8) & 0xFF
    out[pos + 2] = (value >> 16) & 0xFF
    out[pos + 3] = (value >> 24) & 0xFF


@numba.njit(cache=True)
def _layout_epbs(frames, frame_offsets, lengths, interfaces, ticks, comments, comment_offsets, comment_lengths,
                 block_offsets, block_lengths, out):
    # Lay out one Enhanced Packet Block per frame (little-endian): header,
    # frame padded to 4 bytes, opt_comment and opt_endofopt when there is a
    # comment, trailing length. `out` arrives zeroed, so padding stays zero.
    for i in range(frame_offsets.shape[0]):
        pos = block_offsets[i]
        block_len = block_lengths[i]
        length = lengths[i]
        _put_u32(out, pos, 6)
        _put_u32(out, pos + 4, block_len)
        _put_u32(out, pos + 8, interfaces[i])
        _put_u32(out, pos + 12, np.uint32(ticks[i] >> np.uint64(32)))
        _put_u32(out, pos + 16, np.uint32(ticks[i] & np.uint64(0xFFFFFFFF)))
        _put_u32(out, pos + 20, length)
        _put_u32(out, pos + 24, length)
        start = frame_offsets[i]
        out[pos + 28 : pos + 28 + length] = frames[start : start + length]
        pos += 28 + ((length + 3) & ~3)
        comment_len = comment_lengths[i]
        if comment_len > 0:
            out[pos] = 1  # opt_comment, little-endian code and length
            out[pos + 1] = 0
            out[pos + 2] = comment_len & 0xFF
            out[pos + 3] = (comment_len >> 8) & 0xFF
            start = comment_offsets[i]
            out[pos + 4 : pos + 4 + comment_len] = comments[start : start + comment_len]
            pos += 4 + ((comment_len + 3) & ~3) + 4  # the zeroed opt_endofopt follows
        _put_u32(out, pos, block_len)


def _pad4(length: int) -> int:
    return (length + 3) & ~3


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (_pad4(len(value)) - len(value))


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


# An option's length field is 16 bits; longer comments are cut at a UTF-8 boundary.
MAX_COMMENT_BYTES = 65532


class PcapNgWriter:
    """Write a pcapng file: one section, one IDB per interface, frames in EPBs.

    `interface_id` only registers a name. The interface's IDB goes into the
    file right before the first EPB that uses it, so the file's interface
    order is the order of first use. The bytes written then depend only on
    the frames in sequence, not on how they were split over `write_frames`
    calls. An interface that never carries a frame never appears in the file.
    pcapng allows an IDB anywhere before the first packet that refers to it.
    """

    def __init__(self, stream: BinaryIO, *, application: str = "tapnet"):
        self.stream = stream
        self.interface_ids: dict[str, int] = {}  # name -> id handed out by interface_id
        self.interface_names: list[str] = []  # names in file order (the IDBs written so far)
        self._file_index = np.zeros(0, dtype=np.int64)  # id -> IDB index in the file, -1 until written
        self.frames_written = 0
        shb_options = _option(4, application.encode()) + _option(OPT_ENDOFOPT, b"")  # shb_userappl
        # Section length -1 means "not given", so readers walk the blocks.
        self.stream.write(_block(BLOCK_SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + shb_options))

    def interface_id(self, name: str) -> int:
        """Return the id for interface `name`, registering it on first use."""
        found = self.interface_ids.get(name)
        if found is not None:
            return found
        interface_id = len(self.interface_ids)
        self.interface_ids[name] = interface_id
        self._file_index = np.append(self._file_index, -1)
        return interface_id

    def write_frames(
        self,
        interfaces: np.ndarray | Sequence[int],
        frames: Sequence[bytes],
        timestamps: np.ndarray | Sequence[float],
        comments: Sequence[str | None] | None = None,
    ) -> None:
        """Append one EPB per frame; `interfaces` are ids from `interface_id`, timestamps in seconds."""
        count = len(frames)
        if count == 0:
            return
        interfaces = np.asarray(interfaces, dtype=np.int64)
        if len(interfaces) != count or len(timestamps) != count or (comments is not None and len(comments) != count):
            raise ValueError("write_frames: interfaces, frames, timestamps and comments differ in length")
        if int(interfaces.max()) >= len(self.interface_ids) or int(interfaces.min()) < 0:
            bad = int(interfaces.max()) if int(interfaces.max()) >= len(self.interface_ids) else int(interfaces.min())
            raise ValueError(f"write_frames: interface id {bad} was never added")
        ticks = np.rint(np.asarray(timestamps, dtype=np.float64) * WRITE_TICKS_PER_SECOND).astype(np.uint64)

        lengths = np.fromiter(map(len, frames), dtype=np.int64, count=count)
        frame_offsets = np.zeros(count, dtype=np.int64)
        np.cumsum(lengths[:-1], out=frame_offsets[1:])
        joined = np.frombuffer(b"".join(frames), dtype=np.uint8)

        if comments is None:
            encoded = []
            comment_lengths = np.zeros(count, dtype=np.int64)
        else:
            encoded = [_encode_comment(c) for c in comments]
            comment_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
        comment_offsets = np.zeros(count, dtype=np.int64)
        np.cumsum(comment_lengths[:-1], out=comment_offsets[1:])
        joined_comments = np.frombuffer(b"".join(encoded), dtype=np.uint8)

        # Interfaces used here for the first time, in order of first use.
        unwritten = np.nonzero(self._file_index[interfaces] < 0)[0]
        new_ids, first_use = np.unique(interfaces[unwritten], return_index=True)
        order = np.argsort(first_use)
        new_ids, first_positions = new_ids[order], unwritten[first_use[order]]
        self._file_index[new_ids] = len(self.interface_names) + np.arange(len(new_ids))

        options_len = np.where(comment_lengths > 0, 4 + ((comment_lengths + 3) & ~3) + 4, 0)
        block_lengths = 28 + ((lengths + 3) & ~3) + options_len + 4
        block_offsets = np.zeros(count, dtype=np.int64)
        np.cumsum(block_lengths[:-1], out=block_offsets[1:])
        out = np.zeros(int(block_lengths.sum()), dtype=np.uint8)
        file_interfaces = self._file_index[interfaces].astype(np.uint32)
        _layout_epbs(joined, frame_offsets, lengths, file_interfaces, ticks, joined_comments, comment_offsets,
                     comment_lengths, block_offsets, block_lengths, out)

        # Each new interface's IDB goes right before its first EPB.
        names = list(self.interface_ids)
        written_to = 0
        for interface_id, position in zip(new_ids, first_positions):
            cut = int(block_offsets[position])
            self.stream.write(out[written_to:cut].data)
            self.stream.write(_idb(names[interface_id]))
            self.interface_names.append(names[interface_id])
            written_to = cut
        self.stream.write(out[written_to:].data)
        self.frames_written += count

    def flush(self) -> None:
        self.stream.flush()


def _idb(name: str) -> bytes:
    options = (
        _option(IF_NAME, name.encode())
        + _option(IF_TSRESOL, bytes([WRITE_TSRESOL_EXPONENT]))
        + _option(OPT_ENDOFOPT, b"")
    )
    return _block(BLOCK_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0) + options)


def _encode_comment(comment: str | None) -> bytes:
    if not comment:
        return b""
    raw = comment.encode("utf-8")
    if len(raw) > MAX_COMMENT_BYTES:
        raw = raw[:MAX_COMMENT_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return raw
