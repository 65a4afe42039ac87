"""Frame batches: many frames in one preallocated buffer, as the parser wants them.

The runtime drains TAP fds into a `FrameBatch`; replay fills one from a capture
file. The numba parser reads `buf`, `offsets` and `lengths` directly.

A frame that came from a TAP with `IFF_VNET_HDR` keeps its 10-byte
virtio-net header in `vnet` (one row per frame; all zeros means "complete
frame, no offload").
"""

from __future__ import annotations

import numpy as np

VNET_HDR_LEN = 10  # struct virtio_net_hdr without num_buffers
MAX_FRAME = 65536 + 14 + 4  # a 64 KiB GSO superframe plus Ethernet and 802.1Q headers


class FrameBatch:
    def __init__(self, capacity_frames: int = 1024, capacity_bytes: int = 1 << 22):
        self.buf = np.zeros(capacity_bytes, dtype=np.uint8)
        self.offsets = np.zeros(capacity_frames, dtype=np.int64)
        self.lengths = np.zeros(capacity_frames, dtype=np.int32)
        self.ports = np.zeros(capacity_frames, dtype=np.int32)
        self.vnet = np.zeros((capacity_frames, VNET_HDR_LEN), dtype=np.uint8)
        self.timestamps = np.zeros(capacity_frames, dtype=np.float64)
        self.count = 0
        self.used = 0

    @property
    def capacity_frames(self) -> int:
        return len(self.offsets)

    def clear(self) -> None:
        self.count = 0
        self.used = 0

    def room_for(self, length: int) -> bool:
        return self.count < len(self.offsets) and self.used + length <= len(self.buf)

    def append(self, port: int, frame: bytes, vnet: bytes | None = None, timestamp: float = 0.0) -> None:
        """Copy one frame into the batch; raises OverflowError when it does not fit."""
        length = len(frame)
        if not self.room_for(length):
            raise OverflowError(f"batch full ({self.count} frames, {self.used} bytes); process it first")
        i = self.count
        self.buf[self.used : self.used + length] = np.frombuffer(frame, dtype=np.uint8)
        self.offsets[i] = self.used
        self.lengths[i] = length
        self.ports[i] = port
        if vnet is None:
            self.vnet[i] = 0
        else:
            self.vnet[i] = np.frombuffer(vnet[:VNET_HDR_LEN], dtype=np.uint8)
        self.timestamps[i] = timestamp
        self.count += 1
        self.used += length

    def frame(self, i: int) -> bytes:
        start = int(self.offsets[i])
        return self.buf[start : start + int(self.lengths[i])].tobytes()

    def vnet_hdr(self, i: int) -> bytes | None:
        row = self.vnet[i]
        if not row.any():
            return None
        return row.tobytes()
