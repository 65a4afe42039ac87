"""TAP reads and writes in numba: one call per batch instead of Python per frame.

A TAP fd returns one frame per read and takes one frame per write, so the
runtime makes one system call per frame whatever it does. What this module
removes is the Python around each call: argument lists, memoryview slices,
numpy item assignment and exceptions for EAGAIN. With `os.readv` and
`os.writev` that Python cost about 3 us per forwarded frame on the
development machine, as much as the two system calls themselves
(perf/README.md has the measurement).

`drain` reads frames from several TAP fds straight into a `FrameBatch`'s
arrays with `readv(2)`: the virtio-net header into the batch's `vnet` row
and the frame after the previous frame in `buf`. `write` sends messages
packed back to back in one buffer with `write(2)`, each a virtio-net header
followed by its frame.

libc's `readv`, `write` and `__errno_location` are bound by symbol name
(`numba.types.ExternalFunction`). The compiled code then refers to the
symbols and not to addresses in this process, so numba can cache it on
disk. With ctypes function pointers numba refuses to cache. All kernels
live in this file because numba's cache tracks only the source file of the
jitted function.

Errors that come from the fds are returned, never raised: `drain` reports
the errno of a failed fd and `write` the negated errno of each failed
message, and the caller counts and logs them. EAGAIN is not an error for
`drain` (the fd is empty). Arrays that do not fit together are a bug of the
caller and raise ValueError.
"""

from __future__ import annotations

import errno

import numpy as np
from numba import njit, types

from tapnet.batch import MAX_FRAME, VNET_HDR_LEN

_readv = types.ExternalFunction("readv", types.intp(types.intc, types.voidptr, types.intc))
_write = types.ExternalFunction("write", types.intp(types.intc, types.voidptr, types.uintp))
# The address of the calling thread's errno, in glibc and musl.
_errno_location = types.ExternalFunction("__errno_location", types.CPointer(types.intc)())

# Frozen into the compiled code; errno numbers are fixed per platform (Linux only).
_EAGAIN = errno.EAGAIN
_EINTR = errno.EINTR

# No numba runtime (NRT): the kernels allocate nothing.
# NOTE: `_nrt` is an internal numba option, as in tapnet.parse; tested with numba 0.68.1 only.
_JIT_OPTIONS = {"cache": True, "_nrt": False}

# Fields of `drain`'s state array.
STATE_COUNT = 0  # frames in the batch
STATE_USED = 1  # bytes of `buf` in use
STATE_PROBLEMS = 2  # fds with a failed or short read; 0 means `errors` and `shorts` are all zero
STATE_LEN = 3


@njit(**_JIT_OPTIONS)
def _errno():
    return _errno_location()[0]


@njit(**_JIT_OPTIONS)
def drain(fds, ports, per_fd, buf, offsets, lengths, batch_ports, vnet, timestamps, now, state, errors, shorts, iov):
    """Read up to `per_fd` frames from each of `fds` into empty batch arrays; return how many fds were served.

    Frame i lands at buf[offsets[i] : offsets[i] + lengths[i]] with its
    virtio-net header in vnet[i], its port in batch_ports[i] (ports[k] for
    fds[k]) and `now` in timestamps[i]. `state` receives the frame count,
    the bytes used and the number of fds with problems (see STATE_*). A read
    needs MAX_FRAME bytes of room, so draining stops early when the batch is
    full: the return value is then the index of the first fd not fully
    served. Otherwise it is len(fds).

    errors[k] gets the errno of a read of fds[k] that failed other than with
    EAGAIN or EINTR, and reading that fd stops there. shorts[k] counts reads
    shorter than a virtio-net header, which are skipped. `iov` is scratch
    space of at least 4 uint64 (two struct iovec).
    """
    if ports.size < fds.size or errors.size < fds.size or shorts.size < fds.size:
        raise ValueError("ports, errors or shorts is shorter than fds")
    if state.size < STATE_LEN or iov.size < 4 or vnet.shape[1] != VNET_HDR_LEN:
        raise ValueError("state or iov too small, or vnet rows not one virtio-net header long")
    capacity = min(offsets.size, lengths.size, batch_ports.size, vnet.shape[0], timestamps.size)

    count = 0
    used = 0
    served = fds.size
    for k in range(fds.size):
        errors[k] = 0
        shorts[k] = 0
    for k in range(fds.size):
        if served < fds.size:
            break
        for _ in range(per_fd):
            if count >= capacity or used + MAX_FRAME > buf.size:
                served = k
                break
            iov[0] = vnet.ctypes.data + count * VNET_HDR_LEN
            iov[1] = VNET_HDR_LEN
            iov[2] = buf.ctypes.data + used
            iov[3] = MAX_FRAME
            n = _readv(fds[k], iov.ctypes.data, 2)
            if n < 0:
                code = _errno()
                if code != _EAGAIN and code != _EINTR:
                    errors[k] = code
                break
            if n < VNET_HDR_LEN:
                shorts[k] += 1
                continue
            offsets[count] = used
            lengths[count] = n - VNET_HDR_LEN
            batch_ports[count] = ports[k]
            timestamps[count] = now
            count += 1
            used += n - VNET_HDR_LEN

    problems = 0
    for k in range(fds.size):
        if errors[k] != 0 or shorts[k] != 0:
            problems += 1
    state[STATE_COUNT] = count
    state[STATE_USED] = used
    state[STATE_PROBLEMS] = problems
    return served


@njit(**_JIT_OPTIONS)
def write(plan, data):
    """Write the messages packed back to back in `data`, each to its fd; return how many writes failed.

    `plan` is flat pairs: plan[2*i] is the fd of message i and plan[2*i + 1]
    its length in bytes (virtio-net header plus frame). Every message is
    tried, in order. For a failed write plan[2*i + 1] becomes the negated
    errno (-EAGAIN: the TAP's queue is full); the other entries stay as
    they are. Raises ValueError, before writing anything, when `plan` has an
    odd size, a negative length, or lengths that run past the end of `data`.
    """
    if plan.size % 2:
        raise ValueError("plan must hold (fd, length) pairs")
    total = 0
    for i in range(1, plan.size, 2):
        if plan[i] < 0:
            raise ValueError("negative message length in plan")
        total += plan[i]
    if total > data.size:
        raise ValueError("message lengths add up to more than data")

    failed = 0
    offset = 0
    for i in range(0, plan.size, 2):
        length = plan[i + 1]
        n = _write(plan[i], data.ctypes.data + offset, length)
        offset += length
        if n < 0:
            plan[i + 1] = -_errno()
            failed += 1
    return failed


def warm_up() -> None:
    """Compile the kernels now, or load them from numba's cache, so the first frame does not wait.

    The argument types are those the runtime passes; another type would
    compile another specialisation at the first frame.
    """
    none = np.zeros(0, dtype=np.int32)
    drain(
        none, none, 1, np.zeros(MAX_FRAME, dtype=np.uint8), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int32),
        np.zeros(1, dtype=np.int32), np.zeros((1, VNET_HDR_LEN), dtype=np.uint8), np.zeros(1, dtype=np.float64),
        0.0, np.zeros(STATE_LEN, dtype=np.int64), none, np.zeros(0, dtype=np.int64), np.zeros(4, dtype=np.uint64),
    )
    # The runtime passes messages as a read-only view of joined bytes, which is a type of its own for numba.
    write(np.zeros(0, dtype=np.int64), np.frombuffer(b"", dtype=np.uint8))
