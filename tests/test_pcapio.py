"""Capture file reading and writing (tapnet.pcapio).

Inputs come from independent writers (scapy, dpkt, and pcap/pcapng blocks
packed by hand in this file), so the reader is not only checked against
tapnet's own writer.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import dpkt
import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import wrpcap, wrpcapng

from tapnet.pcapio import CaptureError, PcapNgWriter, capture_from_bytes, open_capture

T0 = 1_700_000_000  # a capture time in whole seconds

FRAMES = [
    bytes(Ether(src="02:42:ac:1e:01:04", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="172.30.1.4", pdst="172.30.1.1")),
    bytes(Ether(src="02:42:ac:1e:01:04", dst="02:42:ac:1e:01:01") / IP(src="172.30.1.4", dst="172.30.1.1") / ICMP()),
    bytes(Ether(src="02:42:ac:1e:01:05", dst="02:42:ac:1e:01:04") / IP(src="172.30.1.5", dst="172.30.1.4") / UDP() / b"abc"),
]


# ---------------------------------------------------------------------------
# Hand-built files


def pcap_bytes(order: str, nanoseconds: bool, frames=FRAMES, linktype: int = 1) -> bytes:
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for i, frame in enumerate(frames):
        fraction = 123456789 if nanoseconds else 123456
        out += struct.pack(order + "IIII", T0 + i, fraction, len(frame), len(frame)) + frame
    return out


def _block(order: str, block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(order + "II", block_type, 12 + len(body)) + body + struct.pack(order + "I", 12 + len(body))


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(order: str) -> bytes:
    return _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order: str, name: str | None, tsresol: int | None = None, tsoffset: int | None = None, linktype: int = 1) -> bytes:
    options = b""
    if name is not None:
        options += _option(order, 2, name.encode())
    if tsresol is not None:
        options += _option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        options += _option(order, 14, struct.pack(order + "q", tsoffset))
    if options:
        options += _option(order, 0, b"")
    return _block(order, 1, struct.pack(order + "HHI", linktype, 0, 0) + options)


def epb(order: str, interface: int, ticks: int, frame: bytes, comment: str | None = None) -> bytes:
    body = struct.pack(order + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
    body += frame + b"\0" * (-len(frame) % 4)
    if comment is not None:
        body += _option(order, 1, comment.encode()) + _option(order, 0, b"")
    return _block(order, 6, body)


def spb(order: str, frame: bytes) -> bytes:
    return _block(order, 3, struct.pack(order + "I", len(frame)) + frame)


def obsolete_pb(order: str, interface: int, ticks: int, frame: bytes) -> bytes:
    body = struct.pack(order + "HHIIII", interface, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame)) + frame
    return _block(order, 2, body)


def write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def frames_of(capture) -> list[bytes]:
    return [capture.frame(i) for i in range(len(capture))]


# ---------------------------------------------------------------------------
# pcap


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("nanoseconds", [False, True], ids=["usec", "nsec"])
def test_pcap_both_byte_orders_and_resolutions(tmp_path, order, nanoseconds):
    capture = open_capture(write(tmp_path, "a.pcap", pcap_bytes(order, nanoseconds)))
    assert capture.format == "pcap"
    assert frames_of(capture) == FRAMES
    fraction = 0.123456789 if nanoseconds else 0.123456
    assert capture.timestamps == pytest.approx([T0 + fraction, T0 + 1 + fraction, T0 + 2 + fraction], abs=1e-6)
    assert capture.time_ticks(0) == ((T0 * 10**9 + 123456789, 10**9) if nanoseconds else (T0 * 10**6 + 123456, 10**6))
    assert capture.interface_name(0) is None


def test_pcap_from_scapy(tmp_path):
    packets = [Ether(frame) for frame in FRAMES]
    for i, packet in enumerate(packets):
        packet.time = T0 + i * 0.5
    wrpcap(str(tmp_path / "s.pcap"), packets)
    capture = open_capture(tmp_path / "s.pcap")
    assert frames_of(capture) == FRAMES
    assert list(capture.timestamps) == [T0, T0 + 0.5, T0 + 1.0]


def test_pcap_nanoseconds_from_dpkt(tmp_path):
    with open(tmp_path / "d.pcap", "wb") as stream:
        writer = dpkt.pcap.Writer(stream, nano=True)
        for i, frame in enumerate(FRAMES):
            writer.writepkt(frame, ts=T0 + i + 0.25)
    capture = open_capture(tmp_path / "d.pcap")
    assert frames_of(capture) == FRAMES
    assert capture.timestamps == pytest.approx([T0 + 0.25, T0 + 1.25, T0 + 2.25], abs=1e-6)


def test_pcap_truncated_record_names_offset(tmp_path):
    content = pcap_bytes("<", False)
    cut = len(content) - 5  # inside the last frame
    path = write(tmp_path, "cut.pcap", content[:cut])
    with pytest.raises(CaptureError) as error:
        open_capture(path)
    last_record = 24 + 2 * 16 + len(FRAMES[0]) + len(FRAMES[1])
    assert "truncated pcap record" in str(error.value)
    assert f"offset {last_record}" in str(error.value)


def test_pcap_truncated_header(tmp_path):
    with pytest.raises(CaptureError, match="truncated pcap file header"):
        open_capture(write(tmp_path, "h.pcap", pcap_bytes("<", False)[:20]))


def test_pcap_absurd_record_length(tmp_path):
    content = bytearray(pcap_bytes("<", False))
    struct.pack_into("<I", content, 24 + 8, 10**7)
    with pytest.raises(CaptureError, match="invalid pcap record length.*offset 24"):
        open_capture(write(tmp_path, "big.pcap", bytes(content)))


def test_non_ethernet_linktype_rejected(tmp_path):
    capture = open_capture(write(tmp_path, "raw.pcap", pcap_bytes("<", False, linktype=101)))
    with pytest.raises(CaptureError, match="link type 101"):
        capture.check_ethernet()


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"hello, this is text\n", "not a pcap or pcapng capture"),
        (b"\x00\x01", "too short"),
        (b"", "empty file"),
    ],
    ids=["text", "two-bytes", "empty"],
)
def test_not_a_capture(tmp_path, content, problem):
    with pytest.raises(CaptureError, match=problem) as error:
        open_capture(write(tmp_path, "x.bin", content))
    assert "offset 0" in str(error.value)


# ---------------------------------------------------------------------------
# pcapng


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_pcapng_names_resolutions_and_blocks(tmp_path, order):
    content = (
        shb(order)
        + idb(order, "node1/web.1/eth0")  # microseconds by default
        + idb(order, "node1/web.2/eth0", tsresol=9)  # nanoseconds
        + _block(order, 0x00000BAD, b"unknown block, skipped")
        + epb(order, 0, T0 * 10**6 + 250000, FRAMES[0], comment="first")
        + epb(order, 1, T0 * 10**9 + 500000000, FRAMES[1])
        + spb(order, FRAMES[2])  # interface 0, no timestamp
    )
    capture = open_capture(write(tmp_path, "n.pcapng", content))
    assert capture.format == "pcapng"
    assert frames_of(capture) == FRAMES
    assert [capture.interface_name(i) for i in range(3)] == ["node1/web.1/eth0", "node1/web.2/eth0", "node1/web.1/eth0"]
    assert capture.timestamps == pytest.approx([T0 + 0.25, T0 + 0.5, T0 + 0.5], abs=1e-6)
    assert [capture.comment(i) for i in range(3)] == ["first", None, None]


def test_pcapng_binary_resolution_and_offset(tmp_path):
    content = shb("<") + idb("<", "p", tsresol=0x80 | 20, tsoffset=T0) + epb("<", 0, 3 << 19, FRAMES[0])
    capture = open_capture(write(tmp_path, "b.pcapng", content))
    assert capture.timestamps[0] == pytest.approx(T0 + 1.5, abs=1e-6)


def test_pcapng_second_section_other_byte_order(tmp_path):
    content = (
        shb("<") + idb("<", "first") + epb("<", 0, 1, FRAMES[0])
        + shb(">") + idb(">", "second") + epb(">", 0, 2, FRAMES[1]) + obsolete_pb(">", 0, 3, FRAMES[2])
    )
    capture = open_capture(write(tmp_path, "two.pcapng", content))
    assert frames_of(capture) == FRAMES
    assert [capture.interface_name(i) for i in range(3)] == ["first", "second", "second"]
    assert [capture.interfaces[i].big_endian for i in range(2)] == [False, True]


def test_pcapng_from_scapy(tmp_path):
    packets = [Ether(frame) for frame in FRAMES]
    for i, packet in enumerate(packets):
        packet.time = T0 + i
        packet.sniffed_on = f"node1/web.{i + 1}/eth0"
    wrpcapng(str(tmp_path / "s.pcapng"), packets)
    capture = open_capture(tmp_path / "s.pcapng")
    assert frames_of(capture) == FRAMES
    assert [capture.interface_name(i) for i in range(3)] == [f"node1/web.{n}/eth0" for n in (1, 2, 3)]


def test_pcapng_packet_for_undefined_interface(tmp_path):
    content = shb("<") + idb("<", "only") + epb("<", 1, 0, FRAMES[0])
    offset = len(shb("<") + idb("<", "only"))
    with pytest.raises(CaptureError, match=f"interface its section does not define at byte offset {offset}"):
        open_capture(write(tmp_path, "u.pcapng", content))


def test_pcapng_truncated_block_names_offset(tmp_path):
    content = shb("<") + idb("<", "p") + epb("<", 0, 0, FRAMES[0]) + epb("<", 0, 0, FRAMES[1])
    offset = len(shb("<") + idb("<", "p") + epb("<", 0, 0, FRAMES[0]))
    with pytest.raises(CaptureError, match=f"truncated pcapng block .* at byte offset {offset}"):
        open_capture(write(tmp_path, "t.pcapng", content[:-7]))


def test_pcapng_corrupt_trailer(tmp_path):
    content = bytearray(shb("<") + idb("<", "p") + epb("<", 0, 0, FRAMES[0]))
    content[-1] ^= 0x40
    with pytest.raises(CaptureError, match="trailing length"):
        open_capture(write(tmp_path, "c.pcapng", bytes(content)))


def test_pcapng_bad_byte_order_magic(tmp_path):
    content = bytearray(shb("<"))
    content[8:12] = b"\x00\x00\x00\x00"
    with pytest.raises(CaptureError, match="byte-order magic"):
        open_capture(write(tmp_path, "m.pcapng", bytes(content)))


# ---------------------------------------------------------------------------
# Batches


def test_batches_map_interfaces_to_ports(tmp_path):
    content = shb("<") + idb("<", "a") + idb("<", "b") + b"".join(
        epb("<", i % 2, (T0 + i) * 10**6, FRAMES[i % 3]) for i in range(7)
    )
    capture = open_capture(write(tmp_path, "p.pcapng", content))
    batches = list(capture.batches(np.array([5, 9]), 3))
    assert [b.count for b in batches] == [3, 3, 1]
    assert [list(b.ports) for b in batches] == [[5, 9, 5], [9, 5, 9], [5]]
    assert [b.frame(i) for b in batches for i in range(b.count)] == [FRAMES[i % 3] for i in range(7)]
    assert [t for b in batches for t in b.timestamps] == [T0 + i for i in range(7)]


def test_batch_rewrite_leaves_file_alone(tmp_path):
    path = write(tmp_path, "w.pcap", pcap_bytes("<", False))
    before = path.read_bytes()
    batch = next(open_capture(path).batches(np.array([0]), 8))
    batch.buf[batch.offsets[0]] ^= 0xFF  # the datapath may rewrite frames in place
    assert path.read_bytes() == before


def test_batch_size_must_be_positive(tmp_path):
    capture = open_capture(write(tmp_path, "z.pcap", pcap_bytes("<", False)))
    with pytest.raises(ValueError, match="invalid batch size 0"):
        next(capture.batches(np.array([0]), 0))


# ---------------------------------------------------------------------------
# Writing


def written(frames, names, times, comments) -> bytes:
    stream = io.BytesIO()
    writer = PcapNgWriter(stream)
    ids = [writer.interface_id(name) for name in names]
    writer.write_frames(ids, frames, times, comments)
    return stream.getvalue()


WRITE_NAMES = ["node1/web.1/eth0", "node1/cache.1/eth1", "node1/web.1/eth0"]
WRITE_TIMES = [T0 + 0.000001, T0 + 1.5, T0 + 2.25]
WRITE_COMMENTS = ["trace 1 story", None, "ünïcode story"]


def test_writer_round_trip():
    capture = capture_from_bytes(written(FRAMES, WRITE_NAMES, WRITE_TIMES, WRITE_COMMENTS))
    assert frames_of(capture) == FRAMES
    assert [capture.interface_name(i) for i in range(3)] == WRITE_NAMES
    assert [capture.comment(i) for i in range(3)] == WRITE_COMMENTS
    assert [capture.time_ticks(i)[0] for i in range(3)] == [T0 * 10**6 + 1, T0 * 10**6 + 1500000, T0 * 10**6 + 2250000]
    assert [interface.name for interface in capture.interfaces] == ["node1/web.1/eth0", "node1/cache.1/eth1"]
    assert all(interface.snaplen == 0 and interface.linktype == 1 for interface in capture.interfaces)


def test_writer_output_read_by_dpkt():
    reader = dpkt.pcapng.Reader(io.BytesIO(written(FRAMES, WRITE_NAMES, WRITE_TIMES, WRITE_COMMENTS)))
    packets = list(reader)
    assert [frame for _ts, frame in packets] == FRAMES
    assert [ts for ts, _frame in packets] == pytest.approx(WRITE_TIMES, abs=1e-6)


def test_writer_interfaces_in_order_of_first_use():
    stream = io.BytesIO()
    writer = PcapNgWriter(stream)
    writer.write_frames([writer.interface_id("b")], [FRAMES[0]], [T0])
    writer.write_frames([writer.interface_id("a"), writer.interface_id("b")], FRAMES[:2], [T0, T0])
    capture = capture_from_bytes(stream.getvalue())
    assert [interface.name for interface in capture.interfaces] == ["b", "a"]
    assert [capture.interface_name(i) for i in range(3)] == ["b", "a", "b"]


def test_writer_rejects_unknown_interface_id():
    writer = PcapNgWriter(io.BytesIO())
    writer.interface_id("a")
    with pytest.raises(ValueError, match="interface id 3 was never added"):
        writer.write_frames([3], [FRAMES[0]], [T0])


def test_writer_cuts_oversized_comment():
    capture = capture_from_bytes(written([FRAMES[0]], ["a"], [T0], ["x" * 70000]))
    assert capture.comment(0) == "x" * 65532


def tshark_stderr(stderr: str) -> list[str]:
    """stderr lines of tshark, without the notice it prints whenever it runs as root."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith('Running as user "root"')]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_writer_output_opens_in_tshark(tmp_path):
    path = write(tmp_path, "w.pcapng", written(FRAMES, WRITE_NAMES, WRITE_TIMES, WRITE_COMMENTS))
    run = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name", "-e", "frame.comment"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    assert tshark_stderr(run.stderr) == []
    rows = [line.split("\t") for line in run.stdout.splitlines()]
    assert rows == [[WRITE_NAMES[i], WRITE_COMMENTS[i] or ""] for i in range(3)]
