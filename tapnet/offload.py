"""Software offloads for frames from TAPs with IFF_VNET_HDR: checksum completion and TCP segmentation.

With `TUNSETOFFLOAD` (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6) the kernel of a
sandbox hands tapnet frames that are not finished yet. The 10-byte
`struct virtio_net_hdr` in front of each frame describes the work left:

- `flags & VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is partial. The
  kernel stored the folded pseudo-header sum (not complemented) in the
  checksum field at `csum_start + csum_offset`. The ones' complement sum of
  the bytes from `csum_start` to the end of the frame, complemented, is the
  finished checksum.
- `gso_type` TCPV4 (1) or TCPV6 (4): the frame is a TCP superframe of up to
  64 KiB that must be cut into segments of `gso_size` payload bytes (the
  MSS). For a superframe, Linux computes the stored pseudo-header sum over
  the superframe's TCP length, so it is useless for the segments. Segmentation
  therefore recomputes every IPv4 header checksum and TCP checksum in full.

Each segment gets the headers of the superframe (Ethernet, VLAN tags, IP,
TCP with options) with the IPv4 total length or IPv6 payload length fitted
to it. The IPv4 id goes up by one per segment and the TCP sequence number by
the bytes before it. FIN and PSH stay only on the last segment, CWR only on
the first, as Linux's `tcp_gso_segment` does.

Limits: TCP must follow the IPv4 header or the IPv6 fixed header directly
(no IPv6 extension headers). UDP GSO types (UFO 3, USO 5) are rejected
because tapnet does not turn those offloads on. The urgent pointer is copied
unchanged to every segment.

numba's on-disk cache tracks only the source file of the jitted function, so
every jitted helper lives in this file, even where `tapnet.parse` has a
similar one.
"""

from __future__ import annotations

import struct

import numpy as np
from numba import njit

from tapnet.batch import VNET_HDR_LEN, FrameBatch
from tapnet.reasons import MALFORMED_VNET_HDR

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
UDP_CSUM_OFFSET = 6  # offsetof(struct udphdr, check)

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

# Result of one input frame in `segment_frames`. The datapath counts each
# error except SEGMENT_NO_ROOM as a malformed virtio-net header (reason
# `malformed-vnet-hdr`, SEGMENT_REASON), because the header promised work the
# frame does not allow. SEGMENT_NO_ROOM means the caller's output is too small.
SEGMENT_OK = 0
SEGMENT_CSUM_OUTSIDE_FRAME = 1
SEGMENT_GSO_TYPE_UNSUPPORTED = 2
SEGMENT_GSO_SIZE_ZERO = 3
SEGMENT_HEADERS_INVALID = 4
SEGMENT_NO_ROOM = 5

SEGMENT_ERRORS = {
    SEGMENT_CSUM_OUTSIDE_FRAME: "checksum field (csum_start + csum_offset + 2 bytes) lies beyond the frame",
    SEGMENT_GSO_TYPE_UNSUPPORTED: "gso_type is not TCPV4 (1) or TCPV6 (4)",
    SEGMENT_GSO_SIZE_ZERO: "gso_size is 0 and no MSS was given",
    SEGMENT_HEADERS_INVALID: "frame has no complete Ethernet/IP/TCP headers matching gso_type, "
    "or the IP length does not match the frame",
    SEGMENT_NO_ROOM: "the segments of this one frame do not fit into an empty output batch",
}
SEGMENT_REASON = MALFORMED_VNET_HDR

# numba options. Nothing here allocates, so the code runs without numba's
# reference-counting runtime, which would otherwise incref and decref the
# arrays passed to each helper call. `_nrt` is an internal numba option
# (tested with numba 0.68.1).
_JIT_OPTIONS = {"cache": True, "_nrt": False}
_HELPER_JIT_OPTIONS = {"cache": True, "_nrt": False, "inline": "always"}


@njit(**_HELPER_JIT_OPTIONS)
def _be16(buf, p):
    return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])


@njit(**_HELPER_JIT_OPTIONS)
def _be32(buf, p):
    return (_be16(buf, p) << 16) | _be16(buf, p + 2)


@njit(**_HELPER_JIT_OPTIONS)
def _put16(buf, p, value):
    buf[p] = (value >> 8) & 0xFF
    buf[p + 1] = value & 0xFF


@njit(**_HELPER_JIT_OPTIONS)
def _put32(buf, p, value):
    _put16(buf, p, (value >> 16) & 0xFFFF)
    _put16(buf, p + 2, value & 0xFFFF)


@njit(**_HELPER_JIT_OPTIONS)
def _le16(rows, i, p):
    return np.int64(rows[i, p]) | (np.int64(rows[i, p + 1]) << 8)


@njit(**_HELPER_JIT_OPTIONS)
def _copy(dst, d, src, s, n):
    """Copy src[s:s+n] to dst[d:d+n] byte by byte (a slice assignment would need numba's runtime)."""
    for k in range(n):
        dst[d + k] = src[s + k]


@njit(**_HELPER_JIT_OPTIONS)
def _sum16(buf, start, end):
    """Sum the big-endian 16-bit words of buf[start:end], without folding; an odd last byte is padded with zero."""
    total = np.int64(0)
    p = start
    while p + 1 < end:
        total += (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
        p += 2
    if p < end:
        total += np.int64(buf[p]) << 8
    return total


@njit(**_HELPER_JIT_OPTIONS)
def _fold(total):
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@njit(**_HELPER_JIT_OPTIONS)
def _complete_in_place(buf, start, end, csum_start, csum_offset):
    """Finish the partial checksum of the frame buf[start:end] as Linux's skb_checksum_help does."""
    check = _fold(_sum16(buf, start + csum_start, end)) ^ 0xFFFF
    # A UDP checksum of 0 means "no checksum" (RFC 768), so 0xFFFF goes on the wire instead.
    if check == 0 and csum_offset == UDP_CSUM_OFFSET:
        check = 0xFFFF
    _put16(buf, start + csum_start + csum_offset, check)


@njit(**_HELPER_JIT_OPTIONS)
def _find_tcp(buf, start, end, gso_kind):
    """Locate the headers of a TCP superframe.

    Returns (l3, l4, headers_end, ip_end) as offsets into `buf`, or l3 = -1
    when the headers are truncated, inconsistent or do not match `gso_kind`.
    """
    bad = (np.int64(-1), np.int64(0), np.int64(0), np.int64(0))
    p = start + 12
    if p + 2 > end:
        return bad
    ethertype = _be16(buf, p)
    p += 2
    while ethertype == 0x8100 or ethertype == 0x88A8 or ethertype == 0x9100:
        if p + 4 > end:
            return bad
        ethertype = _be16(buf, p + 2)
        p += 4
    l3 = p

    if gso_kind == VIRTIO_NET_HDR_GSO_TCPV4:
        if ethertype != 0x0800 or l3 + 20 > end or buf[l3] >> 4 != 4:
            return bad
        ihl = (np.int64(buf[l3]) & 0x0F) * 4
        ip_end = l3 + _be16(buf, l3 + 2)
        if ihl < 20 or buf[l3 + 9] != 6 or (_be16(buf, l3 + 6) & 0x3FFF) != 0:
            return bad
        l4 = l3 + ihl
    else:
        if ethertype != 0x86DD or l3 + 40 > end or buf[l3] >> 4 != 6 or buf[l3 + 6] != 6:
            return bad
        ip_end = l3 + 40 + _be16(buf, l3 + 4)
        l4 = l3 + 40
    if ip_end > end or l4 + 20 > ip_end:
        return bad
    doff = (np.int64(buf[l4 + 12]) >> 4) * 4
    if doff < 20 or l4 + doff > ip_end:
        return bad
    return (l3, l4, l4 + doff, ip_end)


@njit(**_JIT_OPTIONS)
def segment_frames(buf, offsets, lengths, vnet, first, count, mss, out_buf, out_offsets, out_lengths, out_source, out_count, out_used, status):
    """Segment or complete frames first..count-1 into an output buffer.

    Frame i is buf[offsets[i] : offsets[i] + lengths[i]] with virtio-net header
    vnet[i]. A TCP superframe becomes segments of `mss` payload bytes (or its
    gso_size when `mss` is 0). A frame without GSO is copied, with its checksum
    completed when it is partial. Output frame j goes to
    out_buf[out_offsets[j] : out_offsets[j] + out_lengths[j]] and came from
    input frame out_source[j]. Output starts at slot `out_count` and byte
    `out_used`. status[i] gets a SEGMENT_* code. A frame with an error
    produces no output.

    Returns (next_frame, out_count, out_used). next_frame is below `count`
    when the output ran out of room, and the caller continues from there with
    an emptied output.
    """
    if count > offsets.size or count > lengths.size or count > vnet.shape[0] or count > status.size:
        raise ValueError("count exceeds the offsets, lengths, vnet or status array")
    if out_offsets.size != out_lengths.size or out_offsets.size != out_source.size:
        raise ValueError("out_offsets, out_lengths and out_source differ in size")
    slots = out_offsets.size
    room = out_buf.size
    for i in range(first, count):
        start = offsets[i]
        end = start + lengths[i]
        if start < 0 or end > buf.size or end < start:
            raise ValueError("frame outside the buffer: check offsets and lengths")
        length = end - start
        flags = np.int64(vnet[i, 0])
        gso_kind = np.int64(vnet[i, 1]) & ~VIRTIO_NET_HDR_GSO_ECN
        gso_size = _le16(vnet, i, 4)
        csum_start = _le16(vnet, i, 6)
        csum_offset = _le16(vnet, i, 8)
        status[i] = SEGMENT_OK

        needs_csum = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0
        if needs_csum and csum_start + csum_offset + 2 > length:
            status[i] = SEGMENT_CSUM_OUTSIDE_FRAME
            continue

        if gso_kind == VIRTIO_NET_HDR_GSO_NONE:
            if out_count >= slots or out_used + length > room:
                if out_count == 0 and out_used == 0:
                    status[i] = SEGMENT_NO_ROOM
                    continue
                return i, out_count, out_used
            _copy(out_buf, out_used, buf, start, length)
            if needs_csum:
                _complete_in_place(out_buf, out_used, out_used + length, csum_start, csum_offset)
            out_offsets[out_count] = out_used
            out_lengths[out_count] = length
            out_source[out_count] = i
            out_count += 1
            out_used += length
            continue

        if gso_kind != VIRTIO_NET_HDR_GSO_TCPV4 and gso_kind != VIRTIO_NET_HDR_GSO_TCPV6:
            status[i] = SEGMENT_GSO_TYPE_UNSUPPORTED
            continue
        seg_size = mss if mss > 0 else gso_size
        if seg_size <= 0:
            status[i] = SEGMENT_GSO_SIZE_ZERO
            continue
        l3, l4, headers_end, ip_end = _find_tcp(buf, start, end, gso_kind)
        if l3 < 0:
            status[i] = SEGMENT_HEADERS_INVALID
            continue

        data_len = ip_end - headers_end
        n_segments = max(1, (data_len + seg_size - 1) // seg_size)
        prefix_len = headers_end - start
        needed = n_segments * prefix_len + data_len
        if out_count + n_segments > slots or out_used + needed > room:
            if out_count == 0 and out_used == 0:
                status[i] = SEGMENT_NO_ROOM
                continue
            return i, out_count, out_used
        _cut_superframe(buf, start, l3, l4, headers_end, ip_end, gso_kind == VIRTIO_NET_HDR_GSO_TCPV4, seg_size, i,
                        out_buf, out_offsets, out_lengths, out_source, out_count, out_used)
        out_count += n_segments
        out_used += needed
    return count, out_count, out_used


@njit(**_HELPER_JIT_OPTIONS)
def _cut_superframe(buf, start, l3, l4, headers_end, ip_end, is_v4, seg_size, source,
                    out_buf, out_offsets, out_lengths, out_source, out_count, out_used):
    """Write the segments of one superframe; the caller checked that they fit."""
    prefix_len = headers_end - start
    tcp_header_len = headers_end - l4
    data_len = ip_end - headers_end
    n_segments = max(1, (data_len + seg_size - 1) // seg_size)
    ip_id = _be16(buf, l3 + 4)
    seq = _be32(buf, l4 + 4)
    tcp_flags = np.int64(buf[l4 + 13])

    o = out_used
    for k in range(n_segments):
        chunk = min(seg_size, data_len - k * seg_size)
        if chunk < 0:
            chunk = 0
        data_start = headers_end + k * seg_size
        _copy(out_buf, o, buf, start, prefix_len)
        _copy(out_buf, o + prefix_len, buf, data_start, chunk)
        s_l3 = o + (l3 - start)
        s_l4 = o + (l4 - start)
        s_end = o + prefix_len + chunk

        # IP header: length, id and header checksum for this segment.
        if is_v4:
            ihl = l4 - l3
            _put16(out_buf, s_l3 + 2, ihl + tcp_header_len + chunk)
            _put16(out_buf, s_l3 + 4, (ip_id + k) & 0xFFFF)
            _put16(out_buf, s_l3 + 10, 0)
            _put16(out_buf, s_l3 + 10, _fold(_sum16(out_buf, s_l3, s_l4)) ^ 0xFFFF)
        else:
            _put16(out_buf, s_l3 + 4, tcp_header_len + chunk)

        # TCP header: sequence number, flags and a full checksum.
        _put32(out_buf, s_l4 + 4, (seq + k * seg_size) & 0xFFFFFFFF)
        flags = tcp_flags
        if k != n_segments - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if k != 0:
            flags &= ~TCP_CWR
        out_buf[s_l4 + 13] = flags
        _put16(out_buf, s_l4 + 16, 0)
        tcp_len = tcp_header_len + chunk
        if is_v4:
            pseudo = _sum16(out_buf, s_l3 + 12, s_l3 + 20) + 6 + tcp_len
        else:
            pseudo = _sum16(out_buf, s_l3 + 8, s_l3 + 40) + 6 + tcp_len
        check = _fold(pseudo + _sum16(out_buf, s_l4, s_end)) ^ 0xFFFF
        _put16(out_buf, s_l4 + 16, check)

        out_offsets[out_count + k] = o
        out_lengths[out_count + k] = s_end - o
        out_source[out_count + k] = source
        o = s_end


def _vnet_fields(vnet: bytes | None) -> tuple[int, int, int, int, int, int]:
    """Unpack flags, gso_type, hdr_len, gso_size, csum_start and csum_offset; raise ValueError when too short."""
    if vnet is None:
        return (0, 0, 0, 0, 0, 0)
    if len(vnet) < VNET_HDR_LEN:
        raise ValueError(f"invalid virtio-net header: {len(vnet)} bytes, expected {VNET_HDR_LEN} (malformed-vnet-hdr)")
    return struct.unpack_from("<BBHHHH", vnet)


def complete_checksum(frame: bytes, vnet: bytes | None) -> bytes:
    """Return `frame` with its partial L4 checksum finished, as a capture or a port without offloads needs it.

    A frame whose header lacks VIRTIO_NET_HDR_F_NEEDS_CSUM comes back
    unchanged. For a GSO superframe the result carries the checksum of the
    superframe as a whole, which Wireshark accepts. Raises ValueError when
    the header places the checksum field outside the frame.
    """
    flags, _, _, _, csum_start, csum_offset = _vnet_fields(vnet)
    if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return bytes(frame)
    if csum_start + csum_offset + 2 > len(frame):
        raise ValueError(
            f"invalid virtio-net header: checksum field at csum_start {csum_start} + csum_offset {csum_offset} "
            f"lies beyond the {len(frame)}-byte frame (malformed-vnet-hdr)"
        )
    buf = np.frombuffer(frame, dtype=np.uint8).copy()
    _complete_frame(buf, csum_start, csum_offset)
    return buf.tobytes()


@njit(**_JIT_OPTIONS)
def _complete_frame(buf, csum_start, csum_offset):
    _complete_in_place(buf, 0, buf.size, csum_start, csum_offset)


@njit(**_JIT_OPTIONS)
def complete_partial(buf, offsets, lengths, vnet, count):
    """Finish the partial checksum of every non-GSO frame of a batch in place; return how many.

    A frame whose virtio-net header has NEEDS_CSUM and gso_type NONE gets its
    checksum written and the NEEDS_CSUM bit cleared, so later stages and
    ports see an ordinary frame. GSO superframes keep their partial checksum
    for segmentation, and a header pointing outside its frame is left for
    the parser to report as malformed-vnet-hdr.
    """
    done = 0
    for i in range(count):
        if not vnet[i, 0] & VIRTIO_NET_HDR_F_NEEDS_CSUM or vnet[i, 1] != 0:
            continue
        csum_start = _le16(vnet, i, 6)
        csum_offset = _le16(vnet, i, 8)
        length = lengths[i]
        if csum_start + csum_offset + 2 > length:
            continue
        start = offsets[i]
        _complete_in_place(buf, start, start + length, csum_start, csum_offset)
        vnet[i, 0] &= ~VIRTIO_NET_HDR_F_NEEDS_CSUM
        done += 1
    return done


def segment(frame: bytes, vnet: bytes | None, mss: int | None = None) -> list[bytes]:
    """Cut a TCP superframe into finished segments; complete the checksum of any other frame.

    `mss` (payload bytes per segment) overrides the header's gso_size, for
    example to fit a smaller MTU. It applies only to GSO frames. Raises
    ValueError, naming the problem, when the virtio-net header does not fit
    the frame. The datapath counts those frames as `malformed-vnet-hdr`.
    """
    if mss is not None and mss <= 0:
        raise ValueError(f"invalid MSS {mss}: expected a positive number of payload bytes")
    fields = _vnet_fields(vnet)
    batch = FrameBatch(capacity_frames=1, capacity_bytes=max(1, len(frame)))
    batch.append(0, frame, struct.pack("<BBHHHH", *fields))

    # Room for the segments: the data once plus one copy of the headers per
    # segment. Headers rarely exceed 1 KiB; if they do, retry with room for
    # a whole frame per segment.
    length = max(1, len(frame))
    max_segments = length // max(1, mss or fields[3] or length) + 1
    for header_room in (min(length, 1024), length):
        out = FrameBatch(capacity_frames=max_segments, capacity_bytes=length + max_segments * header_room)
        _, status = segment_batch(batch, out, mss or 0)
        if status[0] != SEGMENT_NO_ROOM:
            break
    if status[0] != SEGMENT_OK:
        raise ValueError(f"invalid virtio-net header {fields}: {SEGMENT_ERRORS[int(status[0])]} (malformed-vnet-hdr)")
    return [out.frame(j) for j in range(out.count)]


def segment_batch(batch: FrameBatch, out: FrameBatch, mss: int = 0, first: int = 0) -> tuple[int, np.ndarray]:
    """Segment or complete the frames of `batch` from index `first` on, appending the results to `out`.

    Output frames keep the port and timestamp of their source frame and have
    no virtio-net header. Returns (next_frame, status): next_frame is
    `batch.count` when every frame was handled, and a smaller index when `out`
    is full. status[i] is a SEGMENT_* code for each input frame i handled.
    """
    status = np.zeros(batch.count, dtype=np.uint8)
    sources = np.zeros(out.capacity_frames, dtype=np.int32)
    start_count = out.count
    next_frame, out_count, out_used = segment_frames(
        batch.buf, batch.offsets, batch.lengths, batch.vnet, first, batch.count, mss,
        out.buf, out.offsets, out.lengths, sources, out.count, out.used, status,
    )
    produced = slice(start_count, out_count)
    out.ports[produced] = batch.ports[sources[produced]]
    out.timestamps[produced] = batch.timestamps[sources[produced]]
    out.vnet[produced] = 0
    out.count = int(out_count)
    out.used = int(out_used)
    return int(next_frame), status
