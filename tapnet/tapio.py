"""TAP reads and writes in numba: one call per batch instead of Python per frame.

A TAP fd returns one frame per read and takes one frame per write, so the
runtime makes one system call per frame whatever it does. What this module
removes is the Python around each call (argument lists, memoryview slices,
numpy item assignment, exceptions for EAGAIN), which cost about 2 us per
frame on the development machine, more than the read itself.

`drain` reads frames from several TAP fds straight into a `FrameBatch`'s
arrays with `readv(2)`: the virtio-net header into the batch's `vnet` row
and the frame after the previous one in `buf`. `write` sends frames packed
back to back in one buffer with `writev(2)`, each after its header.

libc's `readv`, `writev` and `__errno_location` are bound by symbol name
(`numba.types.ExternalFunction`). The compiled code then refers to the
symbols and not to addresses of this process, so numba can cache it on
disk; ctypes function pointers would make numba refuse to cache. Both
kernels live in this file because numba's cache tracks only the source
file of the jitted function.

Errors are returned, never raised: `drain` reports the errno of a failed
fd and `write` the negated errno of each failed frame, and the caller
counts and logs them. EAGAIN is not an error for `drain` (the fd is empty).
"""

from __future__ import annotations

import errno

import numpy as np
from numba import njit, types

from tapnet.batch import MAX_FRAME, VNET_HDR_LEN

_readv = types.ExternalFunction("readv", types.intp(types.intc, types.voidptr, types.intc))
_writev = types.ExternalFunction("writev", types.intp(types.intc, types.voidptr, types.intc))
_errno_location = types.ExternalFunction("__errno_location", types.CPointer(types.intc)())

# Frozen into the compiled code; errno numbers are fixed per platform (Linux only).
_EAGAIN = errno.EAGAIN
_EINTR = errno.EINTR

_JIT_OPTIONS = {"cache": True, "_nrt": False}


@njit(**_JIT_OPTIONS)
def _errno():
    return _errno_location()[0]


@njit(**_JIT_OPTIONS)
def drain(fds, ports, per_fd, buf, offsets, lengths, batch_ports, vnet, timestamps, now, state, errors, shorts, iov):
    """Read up to `per_fd` frames from each of `fds` into the batch arrays; return how many fds were served.

    `state` is `[count, used, problems]`: the batch's frame count and bytes
    used on entry, updated in place, and on return the number of fds with a
    failed or short read (0 means `errors` and `shorts` are all zero).
    Frame i lands at buf[offsets[i] : offsets[i] + lengths[i]] with its
    virtio-net header in vnet[i], its port in batch_ports[i] (ports[k] for
    fds[k]) and `now` in timestamps[i]. A read needs MAX_FRAME bytes of room,
    so draining stops early when the batch is full: the return value is then
    the index of the first fd not fully served. Otherwise it is len(fds).

    errors[k] gets the errno of a read of fds[k] that failed other than with
    EAGAIN or EINTR; reading that fd stops there. shorts[k] counts reads
    shorter than a virtio-net header, which are skipped. `iov` is scratch
    space of at least 4 uint64 (two struct iovec).

    Raises ValueError when the arrays do not fit together (a bug of the
    caller, not a property of the frames).
    """
    if ports.size < fds.size or errors.size < fds.size or shorts.size < fds.size or state.size < 3 or iov.size < 4:
        raise ValueError("ports, errors or shorts shorter than fds, or state or iov too small")
    if vnet.shape[1] != VNET_HDR_LEN:
        raise ValueError("vnet rows must be one virtio-net header long")
    capacity = min(offsets.size, lengths.size, batch_ports.size, vnet.shape[0], timestamps.size)
    count = state[0]
    used = state[1]
    if count < 0 or used < 0:
        raise ValueError("state has a negative frame count or byte count")
    for k in range(fds.size):
        errors[k] = 0
        shorts[k] = 0
    served = fds.size
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
    state[0] = count
    state[1] = used
    state[2] = problems
    return served


@njit(**_JIT_OPTIONS)
def write(fds, data, lengths, vnet_data, results, iov):
    """Write the frames packed back to back in `data` to `fds`, frame i to fds[i]; return how many writes failed.

    Frame i is lengths[i] bytes long and goes out after the 10-byte header
    vnet_data[10*i : 10*i + 10]. results[i] becomes 0 when its write
    succeeded and the negated errno when it failed (-EAGAIN: the TAP's
    queue is full). Every frame is tried, in order. `iov` is scratch space
    of at least 4 uint64.

    Raises ValueError, before writing anything, when the arrays do not fit
    together or the lengths run past the end of `data`.
    """
    if lengths.size < fds.size or results.size < fds.size or vnet_data.size < fds.size * VNET_HDR_LEN or iov.size < 4:
        raise ValueError("lengths, results or vnet_data shorter than fds needs, or iov too small")
    total = 0
    for i in range(fds.size):
        if lengths[i] < 0:
            raise ValueError("negative frame length")
        total += lengths[i]
    if total > data.size:
        raise ValueError("frame lengths add up to more than data")

    failed = 0
    offset = 0
    for i in range(fds.size):
        iov[0] = vnet_data.ctypes.data + i * VNET_HDR_LEN
        iov[1] = VNET_HDR_LEN
        iov[2] = data.ctypes.data + offset
        iov[3] = lengths[i]
        offset += lengths[i]
        n = _writev(fds[i], iov.ctypes.data, 2)
        if n < 0:
            results[i] = -_errno()
            failed += 1
        else:
            results[i] = 0
    return failed


def warm_up() -> None:
    """Compile both kernels now, or load them from numba's cache, so the first frame does not wait."""
    iov = np.zeros(4, dtype=np.uint64)
    none = np.zeros(0, dtype=np.int32)
    state = np.zeros(3, dtype=np.int64)
    drain(
        none, none, 1, np.zeros(MAX_FRAME, dtype=np.uint8), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int32),
        np.zeros(1, dtype=np.int32), np.zeros((1, VNET_HDR_LEN), dtype=np.uint8), np.zeros(1, dtype=np.float64),
        0.0, state, none, np.zeros(0, dtype=np.int64), iov,
    )
    # The runtime passes frames as read-only views of joined bytes, a type of its own for numba.
    empty = np.frombuffer(b"", dtype=np.uint8)
    write(none, empty, np.zeros(0, dtype=np.int64), empty, np.zeros(0, dtype=np.int64), iov)
