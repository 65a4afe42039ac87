"""The numba TAP kernels (`tapnet.tapio`) on real file descriptors.

A TAP fd returns one frame per read and takes one frame per write. A Unix
SOCK_SEQPACKET socket pair keeps message boundaries the same way, so these
tests use one instead of a TAP and need no root. Each message is a 10-byte
virtio-net header followed by the frame, as on a TAP with IFF_VNET_HDR.
"""

from __future__ import annotations

import errno
import socket

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tapnet import tapio
from tapnet.batch import MAX_FRAME, VNET_HDR_LEN, FrameBatch

NOW = 12.5
# Never an open file descriptor, so reads and writes fail with EBADF (a closed fd's number could be reused).
NO_FD = -1


def udp_frame(sport: int, payload: bytes = b"x" * 18) -> bytes:
    return bytes(
        Ether(src="02:42:0a:4d:03:02", dst="02:42:0a:4d:03:03")
        / IP(src="10.77.3.2", dst="10.77.3.3")
        / UDP(sport=sport, dport=9000)
        / payload
    )


def vnet_header(flags: int) -> bytes:
    return bytes([flags]) + bytes(VNET_HDR_LEN - 1)


@pytest.fixture
def pairs():
    """Yield a function making non-blocking (tap end, peer end) SOCK_SEQPACKET pairs; all closed afterwards."""
    sockets = []

    def make():
        tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tap.setblocking(False)
        peer.setblocking(False)
        sockets.extend([tap, peer])
        return tap, peer

    yield make
    for sock in sockets:
        sock.close()


class Drain:
    """Arguments and outputs of one tapio.drain call on a fresh batch."""

    def __init__(self, frames: int = 8, buffer_bytes: int = 8 * MAX_FRAME):
        self.batch = FrameBatch(frames, buffer_bytes)
        self.state = np.zeros(3, dtype=np.int64)
        self.iov = np.zeros(4, dtype=np.uint64)

    def run(self, fds: list[int], ports: list[int], per_fd: int = 64) -> int:
        self.errors = np.zeros(len(fds), dtype=np.int32)
        self.short = np.zeros(len(fds), dtype=np.int64)
        batch = self.batch
        served = tapio.drain(
            np.array(fds, dtype=np.int32), np.array(ports, dtype=np.int32), per_fd, batch.buf, batch.offsets,
            batch.lengths, batch.ports, batch.vnet, batch.timestamps, NOW, self.state, self.errors, self.short, self.iov,
        )
        batch.count, batch.used = int(self.state[0]), int(self.state[1])
        return served


def write_messages(fds: list[int], messages: list[bytes], lengths: list[int] | None = None) -> tuple[int, list[int]]:
    """Call tapio.write as the runtime does; return (writes failed, the plan afterwards)."""
    if lengths is None:
        lengths = [len(message) for message in messages]
    plan = np.array([value for pair in zip(fds, lengths) for value in pair], dtype=np.int64)
    failed = tapio.write(plan, np.frombuffer(b"".join(messages), dtype=np.uint8))
    return failed, plan.tolist()


def test_drain_reads_frames_and_headers(pairs):
    tap, peer = pairs()
    frames = [udp_frame(40000 + i) for i in range(3)]
    for i, frame in enumerate(frames):
        peer.send(vnet_header(i) + frame)

    drain = Drain()
    served = drain.run([tap.fileno()], [7])

    assert served == 1
    assert drain.batch.count == 3
    assert [drain.batch.frame(i) for i in range(3)] == frames
    assert drain.batch.vnet[:3, 0].tolist() == [0, 1, 2]
    assert drain.batch.ports[:3].tolist() == [7, 7, 7]
    assert drain.batch.timestamps[:3].tolist() == [NOW] * 3
    assert drain.batch.used == sum(len(f) for f in frames)
    assert drain.errors.tolist() == [0]
    assert drain.state[2] == 0


def test_drain_stops_at_per_fd_limit(pairs):
    tap, peer = pairs()
    for i in range(5):
        peer.send(vnet_header(0) + udp_frame(40000 + i))

    drain = Drain()
    drain.run([tap.fileno()], [1], per_fd=2)

    assert drain.batch.count == 2
    assert len(tap.recv(MAX_FRAME)) > 0  # the rest waits for the next round


def test_drain_appends_fds_in_order(pairs):
    first, first_peer = pairs()
    second, second_peer = pairs()
    first_peer.send(vnet_header(0) + udp_frame(1))
    second_peer.send(vnet_header(0) + udp_frame(2))
    second_peer.send(vnet_header(0) + udp_frame(3))

    drain = Drain()
    drain.run([first.fileno(), second.fileno()], [4, 5])

    assert drain.batch.ports[:3].tolist() == [4, 5, 5]
    assert [drain.batch.frame(i) for i in range(3)] == [udp_frame(1), udp_frame(2), udp_frame(3)]


def test_drain_full_batch_returns_unserved_fd(pairs):
    first, first_peer = pairs()
    second, second_peer = pairs()
    first_peer.send(vnet_header(0) + udp_frame(1))
    for i in range(3):
        second_peer.send(vnet_header(0) + udp_frame(10 + i))

    drain = Drain(frames=2)
    served = drain.run([first.fileno(), second.fileno()], [4, 5])

    assert served == 1
    assert drain.batch.count == 2


def test_drain_needs_room_for_a_superframe(pairs):
    tap, peer = pairs()
    peer.send(vnet_header(0) + udp_frame(1))

    drain = Drain(buffer_bytes=MAX_FRAME - 1)
    served = drain.run([tap.fileno()], [1])

    assert served == 0
    assert drain.batch.count == 0


def test_drain_skips_and_counts_short_reads(pairs):
    tap, peer = pairs()
    peer.send(b"short")
    peer.send(vnet_header(0) + udp_frame(1))

    drain = Drain()
    drain.run([tap.fileno()], [1])

    assert drain.short.tolist() == [1]
    assert drain.state[2] == 1
    assert drain.batch.count == 1
    assert drain.batch.frame(0) == udp_frame(1)


def test_drain_empty_fd_is_not_an_error(pairs):
    tap, _ = pairs()

    drain = Drain()
    drain.run([tap.fileno()], [1])

    assert drain.batch.count == 0
    assert drain.errors.tolist() == [0]


def test_drain_reports_errno_of_bad_fd(pairs):
    tap, peer = pairs()
    peer.send(vnet_header(0) + udp_frame(1))

    drain = Drain()
    served = drain.run([NO_FD, tap.fileno()], [1, 2])

    assert served == 2
    assert drain.errors.tolist() == [errno.EBADF, 0]
    assert drain.state[2] == 1
    assert drain.batch.ports[: drain.batch.count].tolist() == [2]


def test_write_sends_one_message_per_write(pairs):
    tap, peer = pairs()
    messages = [vnet_header(0) + udp_frame(1), vnet_header(1) + udp_frame(2, b"y" * 100)]

    failed, plan = write_messages([tap.fileno(), tap.fileno()], messages)

    assert failed == 0
    assert plan == [tap.fileno(), len(messages[0]), tap.fileno(), len(messages[1])]
    assert peer.recv(MAX_FRAME) == messages[0]
    assert peer.recv(MAX_FRAME) == messages[1]


def test_write_reports_full_queue_as_eagain(pairs):
    tap, _ = pairs()
    tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    messages = [vnet_header(0) + udp_frame(i, b"z" * 1000) for i in range(200)]

    failed, plan = write_messages([tap.fileno()] * len(messages), messages)

    results = plan[1::2]
    assert results[0] == len(messages[0])
    assert results[-1] == -errno.EAGAIN
    assert set(results) <= {len(messages[0]), -errno.EAGAIN}
    assert failed == results.count(-errno.EAGAIN)


def test_write_reports_errno_of_bad_fd():
    failed, plan = write_messages([NO_FD], [vnet_header(0) + udp_frame(1)])

    assert failed == 1
    assert plan == [NO_FD, -errno.EBADF]


def test_write_rejects_lengths_past_data(pairs):
    tap, peer = pairs()
    message = vnet_header(0) + udp_frame(1)

    with pytest.raises(ValueError, match="more than data"):
        write_messages([tap.fileno()], [message], lengths=[len(message) + 1])

    with pytest.raises(BlockingIOError):  # nothing was written
        peer.recv(MAX_FRAME)


def test_write_rejects_negative_length(pairs):
    tap, _ = pairs()

    with pytest.raises(ValueError, match="negative"):
        write_messages([tap.fileno()], [vnet_header(0) + udp_frame(1)], lengths=[-1])


def test_write_rejects_odd_plan():
    with pytest.raises(ValueError, match="pairs"):
        tapio.write(np.zeros(3, dtype=np.int64), np.frombuffer(bytes(100), dtype=np.uint8))


def test_drain_rejects_short_ports_array(pairs):
    tap, _ = pairs()

    with pytest.raises(ValueError, match="shorter than fds"):
        Drain().run([tap.fileno(), tap.fileno()], [1])
