"""Connection tracking and address translation (DNAT, SNAT) for IPv4, in numba.

Theory of operation
-------------------
`Conntrack` keeps one entry per connection, the way `conntrack -L` shows it.
The original tuple is how the first packet looked on the wire before
translation. The reply tuple is how packets of the reply direction look on
the wire after translation, so for DNAT to backend B the reply comes from B.
A tuple is (protocol, source, source port, destination, destination port).
ICMP echo uses the echo identifier as both ports.

All state lives in arrays allocated once, at construction, so memory stays
fixed whatever the traffic does:

- `table`, one record of `ENTRY_DTYPE` (56 bytes) per entry: both tuples,
  TCP state, expiry time, the caller's backend tag, and two links. An entry
  in use that has not seen a reply sits on the "unreplied" list, which is
  ordered by creation time (a TCP entry reopened by a new SYN moves to its end). A free entry sits on the free list.
- `slots`, the index: an open-addressing hash table with linear probing.
  Each slot is 16 bytes (source, destination, ports, tag), and the tag
  encodes the entry id, the direction and the protocol. Every entry in use
  has exactly two slots, one per direction. The table has at least four
  slots per entry, so it is never more than half full.
- `meta` (int64 counters and list heads) and `fmeta` (float64: timeouts per
  state and the time of the last full sweep).

Invariants the code keeps:

- A key (protocol, source, ports, destination) occurs in at most one slot.
  `create` rejects a clash with a live entry and counts it.
- Linear probing has no tombstones: removing a key shifts later keys of the
  same probe run back (backward-shift deletion), so a lookup can stop at the
  first empty slot.
- An entry is alive while `now < expires`. Lookups report expired entries as
  absent but do not remove them. `expire(now)` removes them, and so does
  `create` when a new key clashes with an expired entry or the table is full.
- When the table is full, `create` first reclaims expired entries (at most
  one full sweep per `SWEEP_INTERVAL` seconds of the caller's clock), then
  evicts the oldest entry that never saw a reply. If every entry has seen a
  reply, the new flow is rejected and counted as an overflow. A SYN flood
  therefore only churns unreplied entries, and established flows survive.

Time arrives as `now` (seconds, float) in every call that needs it, so replay
and tests control the clock. SNAT ports come from a numpy Generator that the
caller passes in.

Checksums are updated incrementally (RFC 1624, equation 3) and never
recomputed, so a frame with a bad checksum keeps a bad checksum. A frame with
a partial checksum (virtio-net `NEEDS_CSUM`) carries in its TCP or UDP
checksum field the folded pseudo-header sum, not inverted. There only the
pseudo-header (the addresses) changes the field, by one's-complement addition
without inversion. The port changes enter the checksum later, when the
checksum is completed (by a NIC, or in software before VXLAN or a capture).

numba's on-disk cache tracks only the source file of a jitted function, so
every jitted helper used here lives in this file. Module-level arrays and
numbers used by jitted code (the TCP transition table, field offsets) are
frozen into the compiled code. That includes the parser's flag bits, so this
file keeps its own copies and checks them against `tapnet.parse` at import.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Iterator, Mapping

import numpy as np
from numba import njit

from tapnet import parse

log = logging.getLogger(__name__)

# Bits of a parser record's `flags`, copied so that a change in tapnet.parse
# cannot leave stale values in this file's numba cache: the import fails instead.
IS_IPV4 = 1 << 2
IS_ICMP = 1 << 4
IS_UDP = 1 << 5
IS_TCP = 1 << 6
NEEDS_CSUM = 1 << 10
for _name in ("IS_IPV4", "IS_ICMP", "IS_UDP", "IS_TCP", "NEEDS_CSUM"):
    if globals()[_name] != getattr(parse, _name):
        raise ImportError(f"tapnet.nat copy of parse.{_name} is out of date: update it in tapnet/nat.py")

# ---------------------------------------------------------------------------
# Decisions as data

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NAMES = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}

# Directions of a packet relative to its connection.
ORIGINAL = 0
REPLY = 1

# Timeouts in seconds, by the names `ipvsadm --set tcp tcpfin udp` uses.
# tcp, tcp_fin and udp: IPVS defaults (Linux net/netfilter/ipvs/ip_vs_proto_tcp.c
# and ip_vs_proto_udp.c: ESTABLISHED 15 min, FIN_WAIT 2 min, UDP 5 min).
# icmp: the Linux conntrack default for ICMP (nf_conntrack_icmp_timeout, 30 s),
# because IPVS keeps no ICMP connections.
TIMEOUTS: dict[str, float] = {"tcp": 900.0, "tcp_fin": 120.0, "udp": 300.0, "icmp": 30.0}

# TCP states, numbered as stored in `table["state"]`. Names as in `conntrack -L`.
TCP_STATES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
)
STATE_NUMBER = {name: number for number, name in enumerate(TCP_STATES)}
NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE = range(len(TCP_STATES))

# Timeout of each TCP state in seconds: the IPVS defaults (tcp_timeouts in
# Linux net/netfilter/ipvs/ip_vs_proto_tcp.c). NONE is a first packet without
# SYN, ACK, FIN or RST, which IPVS also keeps for 2 s.
TCP_STATE_TIMEOUTS: dict[str, float] = {
    "NONE": 2.0,
    "SYN_SENT": 120.0,
    "SYN_RECV": 60.0,
    "ESTABLISHED": TIMEOUTS["tcp"],
    "FIN_WAIT": TIMEOUTS["tcp_fin"],
    "CLOSE_WAIT": 60.0,
    "LAST_ACK": 30.0,
    "TIME_WAIT": 120.0,
    "CLOSE": 10.0,
}

# TCP events, from the flags of one segment (see `_tcp_event`).
TCP_EVENTS = ("SYN", "SYNACK", "FIN", "ACK", "RST")
EVENT_NUMBER = {name: number for number, name in enumerate(TCP_EVENTS)}
NO_EVENT = -1  # no SYN, FIN, ACK or RST: the state stays, the timeout is refreshed

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

# Sides of a packet in the transition table. In FIN_WAIT, CLOSE_WAIT and
# LAST_ACK the side is relative to the first FIN of the connection: "closer"
# sent it, "peer" is the other end. In every other state the side is the
# packet's direction. Both kinds map to table column 0 or 1.
SIDES = {"original": 0, "reply": 1, "closer": 0, "peer": 1}
CLOSING_STATES = ("FIN_WAIT", "CLOSE_WAIT", "LAST_ACK")

# (state, side, event) -> next state. A pair missing here leaves the state
# unchanged (and refreshes its timeout). RST from either side closes the
# connection in every state (added below). `create` feeds the first packet
# through the NONE row in the original direction. The table follows both
# ends of one connection from the flags alone, without sequence number checks.
# NOTE: so a stray or forged segment with the right tuple and flags moves the
# state (a RST closes the entry), where Linux would first check the window.
TCP_TRANSITIONS: dict[tuple[str, str, str], str] = {
    ("NONE", "original", "SYN"): "SYN_SENT",
    ("NONE", "original", "SYNACK"): "SYN_RECV",
    # A first ACK or FIN is a connection already under way (tapnet restarted,
    # or a replay starts mid-stream). Linux picks those up by default too
    # (nf_ct_tcp_loose = 1 in net/netfilter/nf_conntrack_proto_tcp.c).
    ("NONE", "original", "ACK"): "ESTABLISHED",
    ("NONE", "original", "FIN"): "FIN_WAIT",
    ("SYN_SENT", "reply", "SYNACK"): "SYN_RECV",
    ("SYN_RECV", "original", "ACK"): "ESTABLISHED",
    ("SYN_RECV", "original", "FIN"): "FIN_WAIT",
    ("SYN_RECV", "reply", "FIN"): "FIN_WAIT",
    ("ESTABLISHED", "original", "FIN"): "FIN_WAIT",
    ("ESTABLISHED", "reply", "FIN"): "FIN_WAIT",
    ("FIN_WAIT", "peer", "ACK"): "CLOSE_WAIT",
    ("FIN_WAIT", "peer", "FIN"): "LAST_ACK",
    ("CLOSE_WAIT", "peer", "FIN"): "LAST_ACK",
    ("LAST_ACK", "closer", "ACK"): "TIME_WAIT",
    # A new SYN on the tuple of a closed connection opens it again.
    ("TIME_WAIT", "original", "SYN"): "SYN_SENT",
    ("CLOSE", "original", "SYN"): "SYN_SENT",
}
for _state in TCP_STATES:
    for _side in ("closer", "peer") if _state in CLOSING_STATES else ("original", "reply"):
        TCP_TRANSITIONS[(_state, _side, "RST")] = "CLOSE"


def _transition_array() -> np.ndarray:
    table = np.empty((len(TCP_STATES), len(TCP_EVENTS), 2), dtype=np.int8)
    for state in range(len(TCP_STATES)):
        table[state, :, :] = state
    for (state, side, event), next_state in TCP_TRANSITIONS.items():
        table[STATE_NUMBER[state], EVENT_NUMBER[event], SIDES[side]] = STATE_NUMBER[next_state]
    return table


_TCP_NEXT = _transition_array()
_CLOSING = np.array([name in CLOSING_STATES for name in TCP_STATES], dtype=np.bool_)

# When the table is full, `create` sweeps out expired entries at most once per
# this many seconds of the caller's clock, so a flood cannot make every new
# flow pay for a scan of the whole table. tapnet's choice.
SWEEP_INTERVAL = 1.0

# Overflow warnings are logged at most once per this many seconds of the
# caller's clock, with the count since the previous warning.
OVERFLOW_LOG_INTERVAL = 10.0

# SNAT source ports: the Linux default ephemeral range
# (net.ipv4.ip_local_port_range = 32768 60999), tapnet's choice.
SNAT_PORT_MIN = 32768
SNAT_PORT_MAX = 60999

# Results of `create` that are not an entry id.
REJECTED_FULL = -1  # table full and every entry has seen a reply (counted in `overflows`)
REJECTED_CLASH = -2  # a tuple is already used by a live entry (counted in `clashes`)

# ICMP types that report an error about an earlier packet (RFC 792): destination
# unreachable, source quench, redirect, time exceeded, parameter problem.
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

# Results of the rewrite functions.
REWRITE_OK = 0
REWRITE_TRUNCATED = 1  # a header to rewrite does not fit in the frame
REWRITE_UNSUPPORTED = 2  # not IPv4, or a protocol tapnet does not translate
REWRITE_STALE = 3  # batch only: the packet no longer matches its entry (evicted and reused)
REWRITE_STATUS_NAMES = {
    REWRITE_OK: "ok",
    REWRITE_TRUNCATED: "truncated",
    REWRITE_UNSUPPORTED: "unsupported",
    REWRITE_STALE: "stale",
}

ENTRY_DTYPE = np.dtype(
    [
        ("expires", np.float64),  # alive while now < expires
        ("backend", np.int64),  # the caller's tag (tapnet.lb stores its backend index)
        ("orig_src", np.uint32),
        ("orig_dst", np.uint32),
        ("orig_sport", np.uint16),
        ("orig_dport", np.uint16),
        ("reply_src", np.uint32),
        ("reply_dst", np.uint32),
        ("reply_sport", np.uint16),
        ("reply_dport", np.uint16),
        ("older", np.int32),  # unreplied list: the entry created before this one, -1 at the end
        ("newer", np.int32),  # unreplied list, or the next free entry on the free list
        ("proto", np.uint8),
        ("state", np.uint8),  # TCP state number; 0 for UDP and ICMP
        ("status", np.uint8),  # ST_* bits
    ],
    align=True,
)

# Bits of `table["status"]`.
ST_IN_USE = 1
ST_SEEN_REPLY = 2
ST_CLOSER_IS_REPLY = 4  # the first FIN came in the reply direction

# Indices into `meta`.
M_COUNT = 0
M_CAPACITY = 1
M_MASK = 2  # number of slots - 1
M_SEED = 3
M_FREE = 4  # head of the free list, -1 when empty
M_OLDEST = 5  # oldest unreplied entry, -1 when none
M_NEWEST = 6
M_EVICTIONS = 7
M_OVERFLOWS = 8
M_CLASHES = 9
M_EXPIRED = 10  # entries removed because their timeout passed
M_CURSOR = 11  # where the next partial `expire` scan starts
META_LEN = 12

# Indices into `fmeta`: timeouts of the TCP states first, then these.
F_UDP = len(TCP_STATES)
F_ICMP = F_UDP + 1
F_LAST_SWEEP = F_ICMP + 1
FMETA_LEN = F_LAST_SWEEP + 1

# Slot columns.
S_SRC = 0
S_DST = 1
S_PORTS = 2  # sport << 16 | dport
S_TAG = 3  # (entry + 1) << 3 | protocol code << 1 | direction; 0 when the slot is empty
SLOTS_PER_ENTRY = 4  # two keys per entry at a load factor of at most 0.5
MAX_CAPACITY = (1 << 28) - 1  # the entry id must fit in the 29 upper bits of the tag

_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX3 = np.uint64(0xFF51AFD7ED558CCD)

# ---------------------------------------------------------------------------
# Hash index (jitted)


@njit(cache=True)
def _proto_code(proto):
    """Map an IP protocol number to the 2-bit code in slot tags; 0 when not tracked."""
    if proto == IPPROTO_TCP:
        return 1
    if proto == IPPROTO_UDP:
        return 2
    if proto == IPPROTO_ICMP:
        return 3
    return 0


@njit(cache=True)
def _hash(code, src, dst, ports, seed):
    a = (np.uint64(src) << np.uint64(32)) | np.uint64(dst)
    b = (np.uint64(ports) << np.uint64(2)) | np.uint64(code)
    x = (a ^ np.uint64(seed)) * _MIX1
    x = x ^ (b * _MIX2)
    x = x ^ (x >> np.uint64(32))
    x = x * _MIX3
    x = x ^ (x >> np.uint64(29))
    return np.int64(x >> np.uint64(1))


@njit(cache=True)
def _find_slot(slots, meta, code, src, dst, ports):
    """Return the slot holding the key, or -1.

    Every probe loop stops after visiting each slot once. With the invariants
    intact a run ends at an empty slot long before that. The bound only keeps
    a corrupted index from hanging the datapath.
    """
    mask = meta[M_MASK]
    i = _hash(code, src, dst, ports, meta[M_SEED]) & mask
    for _ in range(mask + 1):
        tag = np.int64(slots[i, S_TAG])
        if tag == 0:
            return -1
        if (
            ((tag >> 1) & 3) == code
            and slots[i, S_SRC] == src
            and slots[i, S_DST] == dst
            and slots[i, S_PORTS] == ports
        ):
            return i
        i = (i + 1) & mask
    return -1


@njit(cache=True)
def _insert_slot(slots, meta, code, src, dst, ports, tag):
    """Put the key in the first empty slot of its probe run; return False when none is empty.

    `create` never gets False, because the index is at most half full.
    """
    mask = meta[M_MASK]
    i = _hash(code, src, dst, ports, meta[M_SEED]) & mask
    for _ in range(mask + 1):
        if slots[i, S_TAG] == 0:
            slots[i, S_SRC] = src
            slots[i, S_DST] = dst
            slots[i, S_PORTS] = ports
            slots[i, S_TAG] = tag
            return True
        i = (i + 1) & mask
    return False


@njit(cache=True)
def _delete_slot(slots, meta, hole):
    """Empty slot `hole` and shift later keys of its probe run back (no tombstones)."""
    mask = meta[M_MASK]
    seed = meta[M_SEED]
    j = hole
    for _ in range(mask + 1):
        j = (j + 1) & mask
        tag = np.int64(slots[j, S_TAG])
        if tag == 0:
            break
        home = _hash((tag >> 1) & 3, slots[j, S_SRC], slots[j, S_DST], slots[j, S_PORTS], seed) & mask
        # The key at j may move to the hole unless its home lies cyclically in (hole, j].
        if hole <= j:
            stays = hole < home and home <= j
        else:
            stays = hole < home or home <= j
        if not stays:
            for c in range(4):
                slots[hole, c] = slots[j, c]
            hole = j
    for c in range(4):
        slots[hole, c] = 0


@njit(cache=True)
def _ports(sport, dport):
    return (np.int64(sport) << 16) | np.int64(dport)


@njit(cache=True)
def _lookup_ref(slots, entries, meta, proto, src, sport, dst, dport, now):
    """Return entry * 2 + direction for a live entry with this tuple, or -1."""
    code = _proto_code(proto)
    if code == 0:
        return -1
    i = _find_slot(slots, meta, code, src, dst, _ports(sport, dport))
    if i < 0:
        return -1
    tag = np.int64(slots[i, S_TAG])
    e = (tag >> 3) - 1
    if not now < entries[e].expires:
        return -1
    return e * 2 + (tag & 1)


# ---------------------------------------------------------------------------
# Entry lists and state (jitted)


@njit(cache=True)
def _unlink_unreplied(entries, meta, e):
    older = entries[e].older
    newer = entries[e].newer
    if older >= 0:
        entries[older].newer = newer
    else:
        meta[M_OLDEST] = newer
    if newer >= 0:
        entries[newer].older = older
    else:
        meta[M_NEWEST] = older
    entries[e].older = -1
    entries[e].newer = -1


@njit(cache=True)
def _append_unreplied(entries, meta, e):
    newest = meta[M_NEWEST]
    entries[e].older = newest
    entries[e].newer = -1
    if newest >= 0:
        entries[newest].newer = e
    else:
        meta[M_OLDEST] = e
    meta[M_NEWEST] = e


@njit(cache=True)
def _remove(slots, entries, meta, e):
    """Remove entry `e` from the index and the lists and free it; return False when not in use."""
    if e < 0 or e >= meta[M_CAPACITY] or not (entries[e].status & ST_IN_USE):
        return False
    code = _proto_code(entries[e].proto)
    i = _find_slot(
        slots, meta, code, entries[e].orig_src, entries[e].orig_dst, _ports(entries[e].orig_sport, entries[e].orig_dport)
    )
    if i >= 0:
        _delete_slot(slots, meta, i)
    i = _find_slot(
        slots,
        meta,
        code,
        entries[e].reply_src,
        entries[e].reply_dst,
        _ports(entries[e].reply_sport, entries[e].reply_dport),
    )
    if i >= 0:
        _delete_slot(slots, meta, i)

    if not (entries[e].status & ST_SEEN_REPLY):
        _unlink_unreplied(entries, meta, e)
    entries[e].status = 0
    entries[e].older = -1
    entries[e].newer = meta[M_FREE]
    meta[M_FREE] = e
    meta[M_COUNT] -= 1
    return True


@njit(cache=True)
def _expire(slots, entries, meta, now, max_scan):
    """Remove entries whose timeout passed; scan `max_scan` entries from the cursor (0: all)."""
    capacity = meta[M_CAPACITY]
    scan = capacity if max_scan <= 0 or max_scan > capacity else max_scan
    e = meta[M_CURSOR] % capacity
    removed = 0
    for _ in range(scan):
        if (entries[e].status & ST_IN_USE) and not now < entries[e].expires:
            _remove(slots, entries, meta, e)
            removed += 1
        e += 1
        if e == capacity:
            e = 0
    meta[M_CURSOR] = e
    meta[M_EXPIRED] += removed
    return removed


@njit(cache=True)
def _tcp_event(flags):
    """Classify TCP flags into an event number; NO_EVENT when none of SYN, FIN, ACK, RST is set."""
    if flags & TCP_RST:
        return 4
    if flags & TCP_SYN:
        if flags & TCP_ACK:
            return 1
        return 0
    if flags & TCP_FIN:
        return 2
    if flags & TCP_ACK:
        return 3
    return NO_EVENT


@njit(cache=True)
def _timeout(fmeta, proto, state):
    if proto == IPPROTO_TCP:
        return fmeta[state]
    if proto == IPPROTO_UDP:
        return fmeta[F_UDP]
    return fmeta[F_ICMP]


@njit(cache=True)
def _update(entries, meta, fmeta, e, direction, flags, now):
    """Advance entry `e` by one packet; return the new TCP state (0 for UDP and ICMP)."""
    status = np.int64(entries[e].status)
    if direction == REPLY and not (status & ST_SEEN_REPLY):
        _unlink_unreplied(entries, meta, e)
        status |= ST_SEEN_REPLY

    proto = np.int64(entries[e].proto)
    state = np.int64(entries[e].state)
    if proto == IPPROTO_TCP:
        event = _tcp_event(flags)
        if event != NO_EVENT:
            side = direction
            if _CLOSING[state]:
                closer = REPLY if status & ST_CLOSER_IS_REPLY else ORIGINAL
                side = 0 if direction == closer else 1
            new_state = np.int64(_TCP_NEXT[state, event, side])
            if new_state == FIN_WAIT and not _CLOSING[state]:
                if direction == REPLY:
                    status |= ST_CLOSER_IS_REPLY
                else:
                    status &= ~ST_CLOSER_IS_REPLY
            if new_state == SYN_SENT and state != SYN_SENT and state != NONE:
                # A new connection on the tuple of a closed one: it has not seen a reply yet.
                if status & ST_SEEN_REPLY:
                    status &= ~ST_SEEN_REPLY
                    _append_unreplied(entries, meta, e)
            state = new_state
    entries[e].status = status
    entries[e].state = state
    entries[e].expires = now + _timeout(fmeta, proto, state)
    return state


@njit(cache=True)
def _make_room(slots, entries, meta, fmeta, now):
    """Free one entry in a full table; return False when every entry has seen a reply."""
    if now >= fmeta[F_LAST_SWEEP] + SWEEP_INTERVAL:
        fmeta[F_LAST_SWEEP] = now
        meta[M_CURSOR] = 0
        _expire(slots, entries, meta, now, 0)
        if meta[M_COUNT] < meta[M_CAPACITY]:
            return True
    victim = meta[M_OLDEST]
    if victim < 0:
        return False
    if now < entries[victim].expires:
        meta[M_EVICTIONS] += 1
    else:
        meta[M_EXPIRED] += 1
    _remove(slots, entries, meta, victim)
    return True


@njit(cache=True)
def _clear_key(slots, entries, meta, code, src, dst, ports, now):
    """Return True when the key is free, removing an expired entry that uses it."""
    i = _find_slot(slots, meta, code, src, dst, ports)
    if i < 0:
        return True
    e = (np.int64(slots[i, S_TAG]) >> 3) - 1
    if now < entries[e].expires:
        return False
    _remove(slots, entries, meta, e)
    meta[M_EXPIRED] += 1
    return True


@njit(cache=True)
def _create(
    slots, entries, meta, fmeta, proto, o_src, o_sport, o_dst, o_dport, r_src, r_sport, r_dst, r_dport, now, flags, backend
):
    code = _proto_code(proto)
    o_ports = _ports(o_sport, o_dport)
    r_ports = _ports(r_sport, r_dport)
    same_key = o_src == r_src and o_dst == r_dst and o_ports == r_ports
    if same_key or not _clear_key(slots, entries, meta, code, o_src, o_dst, o_ports, now):
        meta[M_CLASHES] += 1
        return REJECTED_CLASH
    if not _clear_key(slots, entries, meta, code, r_src, r_dst, r_ports, now):
        meta[M_CLASHES] += 1
        return REJECTED_CLASH
    if meta[M_COUNT] >= meta[M_CAPACITY]:
        if not _make_room(slots, entries, meta, fmeta, now):
            meta[M_OVERFLOWS] += 1
            return REJECTED_FULL

    e = meta[M_FREE]
    meta[M_FREE] = entries[e].newer
    entries[e].proto = proto
    entries[e].orig_src = o_src
    entries[e].orig_dst = o_dst
    entries[e].orig_sport = o_sport
    entries[e].orig_dport = o_dport
    entries[e].reply_src = r_src
    entries[e].reply_dst = r_dst
    entries[e].reply_sport = r_sport
    entries[e].reply_dport = r_dport
    entries[e].backend = backend
    entries[e].state = NONE
    entries[e].status = ST_IN_USE
    _append_unreplied(entries, meta, e)
    meta[M_COUNT] += 1
    _update(entries, meta, fmeta, e, ORIGINAL, flags, now)

    tag = ((e + 1) << 3) | (code << 1)
    _insert_slot(slots, meta, code, o_src, o_dst, o_ports, tag | ORIGINAL)
    _insert_slot(slots, meta, code, r_src, r_dst, r_ports, tag | REPLY)
    return e


@njit(cache=True)
def _create_many(
    slots, entries, meta, fmeta, protos, o_src, o_sport, o_dst, o_dport, r_src, r_sport, r_dst, r_dport, now, flags, backends, ids
):
    for i in range(protos.size):
        ids[i] = _create(
            slots,
            entries,
            meta,
            fmeta,
            protos[i],
            o_src[i],
            o_sport[i],
            o_dst[i],
            o_dport[i],
            r_src[i],
            r_sport[i],
            r_dst[i],
            r_dport[i],
            now,
            flags[i],
            backends[i],
        )
    return protos.size


@njit(cache=True)
def _translation(entries, e, direction):
    """Return (src, sport, dst, dport) to write into a packet of entry `e` in `direction`."""
    if direction == ORIGINAL:
        return (
            np.int64(entries[e].reply_dst),
            np.int64(entries[e].reply_dport),
            np.int64(entries[e].reply_src),
            np.int64(entries[e].reply_sport),
        )
    return (
        np.int64(entries[e].orig_dst),
        np.int64(entries[e].orig_dport),
        np.int64(entries[e].orig_src),
        np.int64(entries[e].orig_sport),
    )


@njit(cache=True)
def _matches(entries, e, direction, src, sport, dst, dport):
    """Return True when the tuple is entry `e`'s tuple for `direction`."""
    if direction == ORIGINAL:
        return (
            entries[e].orig_src == src
            and entries[e].orig_dst == dst
            and entries[e].orig_sport == sport
            and entries[e].orig_dport == dport
        )
    return (
        entries[e].reply_src == src
        and entries[e].reply_dst == dst
        and entries[e].reply_sport == sport
        and entries[e].reply_dport == dport
    )


@njit(cache=True)
def _free_reply_port(slots, entries, meta, proto, r_src, r_sport, snat_addr, start, low, high, now):
    """Return the first port from `start` (wrapping in [low, high]) whose reply key is free, or -1.

    The reply key is (r_src, r_sport) -> (snat_addr, port), and (r_src, port) ->
    (snat_addr, port) for ICMP echo, whose identifier is both ports.
    """
    code = _proto_code(proto)
    span = high - low + 1
    for k in range(span):
        port = low + (start - low + k) % span
        sport = port if proto == IPPROTO_ICMP else r_sport
        i = _find_slot(slots, meta, code, r_src, snat_addr, _ports(sport, port))
        if i < 0:
            return port
        e = (np.int64(slots[i, S_TAG]) >> 3) - 1
        if not now < entries[e].expires:
            return port
    return -1


# ---------------------------------------------------------------------------
# Batch lookups and updates (jitted)

_STAGE = 32  # lookups per stage of the batch loop; their memory loads overlap


@njit(cache=True)
def _lookup_many(slots, entries, meta, protos, srcs, sports, dsts, dports, now, ids, directions):
    """Look up n tuples; write entry ids (-1 when none or expired) and directions.

    The loop runs in stages of `_STAGE` lookups. The first stage loads each
    home slot, the second probes, and the third reads the expiry of each hit.
    The loads within one stage do not depend on each other, so the CPU can
    wait for several cache misses at once.
    """
    n = protos.size
    mask = meta[M_MASK]
    seed = meta[M_SEED]
    homes = np.empty(_STAGE, dtype=np.int64)
    first_tags = np.empty(_STAGE, dtype=np.int64)
    found = np.empty(_STAGE, dtype=np.int64)
    for base in range(0, n, _STAGE):
        m = min(_STAGE, n - base)
        for k in range(m):
            i = base + k
            code = _proto_code(protos[i])
            home = _hash(code, srcs[i], dsts[i], _ports(sports[i], dports[i]), seed) & mask
            homes[k] = home
            first_tags[k] = np.int64(slots[home, S_TAG])

        for k in range(m):
            i = base + k
            found[k] = -1
            code = _proto_code(protos[i])
            if code == 0:
                continue
            src = srcs[i]
            dst = dsts[i]
            ports = _ports(sports[i], dports[i])
            j = homes[k]
            tag = first_tags[k]
            for _ in range(mask + 1):
                if tag == 0:
                    break
                if (
                    ((tag >> 1) & 3) == code
                    and slots[j, S_SRC] == src
                    and slots[j, S_DST] == dst
                    and slots[j, S_PORTS] == ports
                ):
                    found[k] = tag
                    break
                j = (j + 1) & mask
                tag = np.int64(slots[j, S_TAG])

        for k in range(m):
            i = base + k
            tag = found[k]
            ids[i] = -1
            directions[i] = 0
            if tag > 0:
                e = (tag >> 3) - 1
                if now < entries[e].expires:
                    ids[i] = e
                    directions[i] = tag & 1
    return n


@njit(cache=True)
def _record_key(r):
    """Return the conntrack tuple of a parsed frame as (proto, src, sport, dst, dport); proto 0 when untracked.

    Tracked: IPv4 TCP and UDP with a parsed L4 header, and ICMP echo request
    and reply. ICMP errors are looked up by the tuple they quote (`lookup_icmp_error`).
    """
    if r.status != 0 or not (r.flags & IS_IPV4) or r.l4_off < 0:
        return 0, 0, 0, 0, 0
    if r.flags & (IS_TCP | IS_UDP):
        return np.int64(r.ip_proto), np.int64(r.ip_src), np.int64(r.sport), np.int64(r.ip_dst), np.int64(r.dport)
    if r.flags & IS_ICMP and (r.icmp_type == ICMP_ECHO_REQUEST or r.icmp_type == ICMP_ECHO_REPLY):
        ident = np.int64(r.icmp_id)
        return IPPROTO_ICMP, np.int64(r.ip_src), ident, np.int64(r.ip_dst), ident
    return 0, 0, 0, 0, 0


@njit(cache=True)
def _lookup_records(slots, entries, meta, records, now, ids, directions):
    n = records.size
    protos = np.empty(n, dtype=np.int64)
    srcs = np.empty(n, dtype=np.int64)
    sports = np.empty(n, dtype=np.int64)
    dsts = np.empty(n, dtype=np.int64)
    dports = np.empty(n, dtype=np.int64)
    for i in range(n):
        protos[i], srcs[i], sports[i], dsts[i], dports[i] = _record_key(records[i])
    return _lookup_many(slots, entries, meta, protos, srcs, sports, dsts, dports, now, ids, directions)


@njit(cache=True)
def _update_records(entries, meta, fmeta, records, ids, directions, now, states):
    """Apply `_update` for every frame with an entry whose tuple still matches; states[i] = -1 otherwise."""
    for i in range(records.size):
        states[i] = -1
        e = ids[i]
        if e < 0 or e >= meta[M_CAPACITY] or not (entries[e].status & ST_IN_USE):
            continue
        proto, src, sport, dst, dport = _record_key(records[i])
        if proto != entries[e].proto or not _matches(entries, e, directions[i], src, sport, dst, dport):
            continue
        flags = np.int64(records[i].tcp_flags) if proto == IPPROTO_TCP else 0
        states[i] = _update(entries, meta, fmeta, e, directions[i], flags, now)
    return records.size


# ---------------------------------------------------------------------------
# Checksums and rewriting (jitted)


@njit(cache=True)
def _get16(buf, p):
    return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])


@njit(cache=True)
def _get32(buf, p):
    return (_get16(buf, p) << 16) | _get16(buf, p + 2)


@njit(cache=True)
def _put16(buf, p, value):
    """Write a 16-bit word; return its checksum delta, ~old + new (RFC 1624)."""
    old = _get16(buf, p)
    buf[p] = (value >> 8) & 0xFF
    buf[p + 1] = value & 0xFF
    return (~old & 0xFFFF) + (value & 0xFFFF)


@njit(cache=True)
def _put32(buf, p, value):
    return _put16(buf, p, (value >> 16) & 0xFFFF) + _put16(buf, p + 2, value & 0xFFFF)


@njit(cache=True)
def _fold(x):
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


@njit(cache=True)
def _adjust_complete(buf, p, delta):
    """Apply a delta to a complete checksum field: HC' = ~(~HC + delta); return the field's own delta."""
    old = _get16(buf, p)
    new = ~_fold((~old & 0xFFFF) + delta) & 0xFFFF
    return _put16(buf, p, new)


@njit(cache=True)
def _adjust_partial(buf, p, delta):
    """Apply a delta to a partial checksum field, which contains the folded sum itself (no inversion)."""
    old = _get16(buf, p)
    return _put16(buf, p, _fold(old + delta))


@njit(cache=True)
def _adjust_udp(buf, p, delta):
    """Apply a delta to a complete UDP checksum: zero means none, and a zero result is sent as 0xFFFF."""
    old = _get16(buf, p)
    if old == 0:
        return 0
    new = ~_fold((~old & 0xFFFF) + delta) & 0xFFFF
    if new == 0:
        new = 0xFFFF
    return _put16(buf, p, new)


@njit(cache=True)
def _rewrite(buf, start, end, l3_off, l4_off, proto, new_src, new_sport, new_dst, new_dport, partial):
    """Translate the IPv4 packet of the frame buf[start:end]; return a REWRITE_* status."""
    ip = start + l3_off
    if l3_off < 0 or ip + 20 > end or (buf[ip] >> 4) != 4:
        return REWRITE_UNSUPPORTED
    ihl = np.int64(buf[ip] & 0x0F) * 4
    if ihl < 20 or ip + ihl > end:
        return REWRITE_TRUNCATED
    if l4_off >= 0:
        # Check the L4 header before touching a byte, so a failed rewrite leaves the frame as it was.
        q = start + l4_off
        if proto == IPPROTO_TCP:
            need = 20
        elif proto == IPPROTO_UDP or proto == IPPROTO_ICMP:
            need = 8
        else:
            return REWRITE_UNSUPPORTED
        if q + need > end:
            return REWRITE_TRUNCATED

    addresses = _put32(buf, ip + 12, new_src) + _put32(buf, ip + 16, new_dst)
    _adjust_complete(buf, ip + 10, addresses)
    if l4_off < 0:
        # A later fragment: it has no L4 header, only addresses to change.
        return REWRITE_OK

    q = start + l4_off
    if proto == IPPROTO_ICMP:
        icmp_type = buf[q]
        if icmp_type == ICMP_ECHO_REQUEST or icmp_type == ICMP_ECHO_REPLY:
            ident = _put16(buf, q + 4, new_sport)
            if not partial:
                _adjust_complete(buf, q + 2, ident)
        return REWRITE_OK

    ports = _put16(buf, q, new_sport) + _put16(buf, q + 2, new_dport)
    if proto == IPPROTO_TCP:
        if partial:
            _adjust_partial(buf, q + 16, addresses)
        else:
            _adjust_complete(buf, q + 16, addresses + ports)
    else:
        if partial:
            _adjust_partial(buf, q + 6, addresses)
        else:
            _adjust_udp(buf, q + 6, addresses + ports)
    return REWRITE_OK


@njit(cache=True)
def _embedded_tuple(buf, start, end, l4_off):
    """Return (status, proto, src, sport, dst, dport) of the packet an ICMP error quotes."""
    q = start + l4_off + 8
    if l4_off < 0 or q + 20 > end:
        return REWRITE_TRUNCATED, 0, 0, 0, 0, 0
    if (buf[q] >> 4) != 4:
        return REWRITE_UNSUPPORTED, 0, 0, 0, 0, 0
    ihl = np.int64(buf[q] & 0x0F) * 4
    if ihl < 20 or q + ihl + 8 > end:
        return REWRITE_TRUNCATED, 0, 0, 0, 0, 0
    proto = np.int64(buf[q + 9])
    src = _get32(buf, q + 12)
    dst = _get32(buf, q + 16)
    t = q + ihl
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP:
        return REWRITE_OK, proto, src, _get16(buf, t), dst, _get16(buf, t + 2)
    if proto == IPPROTO_ICMP and (buf[t] == ICMP_ECHO_REQUEST or buf[t] == ICMP_ECHO_REPLY):
        ident = _get16(buf, t + 4)
        return REWRITE_OK, proto, src, ident, dst, ident
    return REWRITE_UNSUPPORTED, proto, src, 0, dst, 0


@njit(cache=True)
def _rewrite_icmp_error(buf, start, end, l3_off, l4_off, new_src, new_sport, new_dst, new_dport, partial):
    """Translate an ICMP error travelling in the direction whose translation is given.

    The outer addresses become (new_src, new_dst). The quoted packet travelled
    the other way, so it gets the inverse: source (new_dst, new_dport),
    destination (new_src, new_sport). Every 16-bit word changed inside the
    ICMP message adds to the delta of the ICMP checksum. All those words lie
    at even offsets from the ICMP header, as the incremental update needs.
    """
    status, proto, _src, _sport, _dst, _dport = _embedded_tuple(buf, start, end, l4_off)
    if status != REWRITE_OK:
        return status
    ip = start + l3_off
    if l3_off < 0 or ip + 20 > end or (buf[ip] >> 4) != 4:
        return REWRITE_UNSUPPORTED

    outer = _put32(buf, ip + 12, new_src) + _put32(buf, ip + 16, new_dst)
    _adjust_complete(buf, ip + 10, outer)

    icmp = start + l4_off
    q = icmp + 8
    ihl = np.int64(buf[q] & 0x0F) * 4
    t = q + ihl
    inner_addresses = _put32(buf, q + 12, new_dst) + _put32(buf, q + 16, new_src)
    delta = inner_addresses + _adjust_complete(buf, q + 10, inner_addresses)

    if proto == IPPROTO_ICMP:
        ident = _put16(buf, t + 4, new_dport)
        delta += ident + _adjust_complete(buf, t + 2, ident)
    else:
        ports = _put16(buf, t, new_dport) + _put16(buf, t + 2, new_sport)
        delta += ports
        # The quote may stop before the TCP checksum, because RFC 792 requires
        # only the first 8 bytes of the L4 header. Then there is no checksum to update.
        if proto == IPPROTO_UDP:
            delta += _adjust_udp(buf, t + 6, inner_addresses + ports)
        elif t + 18 <= end:
            delta += _adjust_complete(buf, t + 16, inner_addresses + ports)

    if not partial:
        _adjust_complete(buf, icmp + 2, delta)
    return REWRITE_OK


@njit(cache=True)
def _rewrite_batch(buf, offsets, lengths, records, entries, meta, ids, directions, statuses):
    """Translate every frame with an entry id; statuses[i] = REWRITE_* (-1 for frames without an entry)."""
    for i in range(records.size):
        statuses[i] = -1
        e = ids[i]
        if e < 0:
            continue
        r = records[i]
        direction = directions[i]
        if e >= meta[M_CAPACITY] or not (entries[e].status & ST_IN_USE):
            statuses[i] = REWRITE_STALE
            continue
        proto, src, sport, dst, dport = _record_key(r)
        if proto != entries[e].proto or not _matches(entries, e, direction, src, sport, dst, dport):
            statuses[i] = REWRITE_STALE
            continue
        new_src, new_sport, new_dst, new_dport = _translation(entries, e, direction)
        start = offsets[i]
        end = start + lengths[i]
        partial = (r.flags & NEEDS_CSUM) != 0
        statuses[i] = _rewrite(
            buf, start, end, r.l3_off, r.l4_off, proto, new_src, new_sport, new_dst, new_dport, partial
        )
    return records.size


# ---------------------------------------------------------------------------
# Python API


def _as_buffer(frame) -> np.ndarray:
    """View a bytearray or uint8 array as a writable numpy array without copying."""
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 1:
            raise TypeError(f"frame must be a 1-D uint8 array, got {frame.dtype} with {frame.ndim} dimensions")
        buf = frame
    elif isinstance(frame, bytearray):
        buf = np.frombuffer(frame, dtype=np.uint8)
    else:
        raise TypeError(f"frame must be a bytearray or a uint8 numpy array to rewrite in place, got {type(frame).__name__}")
    if not buf.flags.writeable:
        raise TypeError("frame is read-only: pass a bytearray or a writable uint8 array")
    return buf


def _check_status(status: int, action: str) -> None:
    if status != REWRITE_OK:
        raise ValueError(f"cannot {action}: {REWRITE_STATUS_NAMES[status]} (check l3_off, l4_off and proto)")


def rewrite(
    frame,
    l3_off: int,
    l4_off: int,
    proto: int,
    new_src: int,
    new_sport: int,
    new_dst: int,
    new_dport: int,
    partial_csum: bool = False,
) -> None:
    """Write new addresses and ports into an IPv4 TCP, UDP or ICMP echo packet, in place.

    `frame` is a bytearray or uint8 array holding the whole frame, and the
    offsets count from its first byte, as in a parser record (`l3_off`,
    `l4_off`, `ip_proto`). An `l4_off` of -1 (a later fragment) rewrites the
    addresses only. For ICMP echo the identifier becomes `new_sport`. Other
    ICMP messages get new addresses only, so translate errors with
    `rewrite_icmp_error`. With `partial_csum` (virtio-net NEEDS_CSUM) the TCP
    or UDP checksum field contains the pseudo-header sum, and only the
    addresses change it.

    Raises ValueError when a header does not fit in the frame or the packet is
    not IPv4 TCP, UDP or ICMP; the frame is then unchanged.
    """
    buf = _as_buffer(frame)
    status = _rewrite(buf, 0, buf.size, l3_off, l4_off, proto, new_src, new_sport, new_dst, new_dport, partial_csum)
    _check_status(status, "rewrite the packet")


def rewrite_icmp_error(
    frame,
    l3_off: int,
    l4_off: int,
    new_src: int,
    new_sport: int,
    new_dst: int,
    new_dport: int,
    partial_csum: bool = False,
) -> None:
    """Translate an ICMP error about a tracked flow, in place: outer addresses and the quoted packet.

    Pass the translation of the direction the error travels in
    (`Conntrack.lookup_icmp_error` finds it). As Linux NAT does, the outer
    source becomes `new_src` even when a router sent the error. The quoted
    packet's addresses and ports (or echo identifier) get the inverse
    translation, and the quoted IP checksum, the quoted TCP or UDP checksum
    when quoted, and the ICMP checksum are updated.

    Raises ValueError when the ICMP message or the quoted headers are
    truncated or the quoted packet is not IPv4 TCP, UDP or ICMP echo.
    """
    buf = _as_buffer(frame)
    status = _rewrite_icmp_error(buf, 0, buf.size, l3_off, l4_off, new_src, new_sport, new_dst, new_dport, partial_csum)
    _check_status(status, "rewrite the ICMP error")


def embedded_tuple(frame, l4_off: int) -> tuple[int, int, int, int, int] | None:
    """Return (proto, src, sport, dst, dport) of the packet an ICMP error quotes, or None when unusable."""
    buf = np.frombuffer(frame, dtype=np.uint8) if not isinstance(frame, np.ndarray) else frame
    status, proto, src, sport, dst, dport = _embedded_tuple(buf, 0, buf.size, l4_off)
    if status != REWRITE_OK:
        return None
    return int(proto), int(src), int(sport), int(dst), int(dport)


def is_icmp_error(icmp_type: int) -> bool:
    return icmp_type in ICMP_ERROR_TYPES


def _ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value)))


def _check_tuple(name: str, value) -> tuple[int, int, int, int]:
    """Unpack (src, sport, dst, dport); raise ValueError naming the field that is out of range."""
    try:
        src, sport, dst, dport = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (src, sport, dst, dport), got {value!r}") from None
    if 0 <= src <= 0xFFFFFFFF and 0 <= dst <= 0xFFFFFFFF and 0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF:
        return src, sport, dst, dport
    for field, number, limit in (("src", src, 1 << 32), ("sport", sport, 1 << 16), ("dst", dst, 1 << 32), ("dport", dport, 1 << 16)):
        if not 0 <= number < limit:
            raise ValueError(f"{name} {field} {number} is out of range 0..{limit - 1}")
    raise ValueError(f"{name} has a value that is not a number: {value!r}")


class Conntrack:
    """Connection tracking table with a fixed capacity; see the module documentation."""

    def __init__(self, max_entries: int = 65536, timeouts: Mapping[str, float] | None = None, hash_seed: int = 0):
        """Allocate every array for `max_entries` connections.

        `timeouts` overrides entries of `TIMEOUTS` ("tcp" sets ESTABLISHED and
        "tcp_fin" FIN_WAIT, as `ipvsadm --set` does). `hash_seed` varies the
        hash function. NOTE: with the default seed 0 the slot of every tuple is
        predictable, so a peer that chooses its ports could lengthen probe runs.
        The runtime should pass a seed drawn from its generator.
        """
        if not 1 <= max_entries <= MAX_CAPACITY:
            raise ValueError(f"max_entries must be between 1 and {MAX_CAPACITY}, got {max_entries}")
        chosen = dict(TIMEOUTS)
        for name, seconds in (timeouts or {}).items():
            if name not in TIMEOUTS:
                raise ValueError(f"unknown timeout {name!r}; known: {', '.join(TIMEOUTS)}")
            if not seconds > 0:
                raise ValueError(f"timeout {name} must be positive seconds, got {seconds!r}")
            chosen[name] = float(seconds)
        self.timeouts = chosen

        nslots = 16
        while nslots < SLOTS_PER_ENTRY * max_entries:
            nslots *= 2
        self.slots = np.zeros((nslots, 4), dtype=np.uint32)
        self.table = np.zeros(max_entries, dtype=ENTRY_DTYPE)
        self.table["older"] = -1
        self.table["newer"] = np.arange(1, max_entries + 1, dtype=np.int32)
        self.table["newer"][-1] = -1

        self.meta = np.zeros(META_LEN, dtype=np.int64)
        self.meta[M_CAPACITY] = max_entries
        self.meta[M_MASK] = nslots - 1
        self.meta[M_SEED] = int(hash_seed) & ((1 << 63) - 1)
        self.meta[M_FREE] = 0
        self.meta[M_OLDEST] = -1
        self.meta[M_NEWEST] = -1

        self.fmeta = np.zeros(FMETA_LEN, dtype=np.float64)
        for number, name in enumerate(TCP_STATES):
            self.fmeta[number] = TCP_STATE_TIMEOUTS[name]
        self.fmeta[ESTABLISHED] = chosen["tcp"]
        self.fmeta[FIN_WAIT] = chosen["tcp_fin"]
        self.fmeta[F_UDP] = chosen["udp"]
        self.fmeta[F_ICMP] = chosen["icmp"]
        self.fmeta[F_LAST_SWEEP] = -math.inf

        self._overflow_logged_at = -math.inf
        self._overflows_at_log = 0

    # -- size and counters --------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self.meta[M_CAPACITY])

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays of the table; fixed at construction."""
        return self.slots.nbytes + self.table.nbytes + self.meta.nbytes + self.fmeta.nbytes

    def __len__(self) -> int:
        """Number of entries in use, including expired ones not yet removed."""
        return int(self.meta[M_COUNT])

    @property
    def evictions(self) -> int:
        """Unreplied entries removed to make room for a new flow."""
        return int(self.meta[M_EVICTIONS])

    @property
    def overflows(self) -> int:
        """New flows rejected because every entry had seen a reply."""
        return int(self.meta[M_OVERFLOWS])

    @property
    def clashes(self) -> int:
        """New flows rejected because a tuple belonged to a live entry."""
        return int(self.meta[M_CLASHES])

    @property
    def expired(self) -> int:
        """Entries removed because their timeout passed."""
        return int(self.meta[M_EXPIRED])

    # -- slow path -----------------------------------------------------------

    def lookup(self, proto: int, src: int, sport: int, dst: int, dport: int, now: float) -> tuple[int, int]:
        """Return (entry_id, direction) of the live entry with this tuple, or (-1, 0)."""
        ref = _lookup_ref(self.slots, self.table, self.meta, proto, src, sport, dst, dport, now)
        if ref < 0:
            return -1, 0
        return ref >> 1, ref & 1

    def create(
        self,
        proto: int,
        orig: tuple[int, int, int, int],
        reply: tuple[int, int, int, int],
        now: float,
        tcp_flags: int = 0,
        backend: int = 0,
    ) -> int:
        """Add a connection; return its entry id, REJECTED_FULL (-1) or REJECTED_CLASH (-2).

        `orig` is the first packet's (src, sport, dst, dport) as it arrived and
        `reply` how the reply direction looks on the wire after translation.
        The first packet's `tcp_flags` set the initial TCP state. A full table
        evicts its oldest unreplied entry; REJECTED_FULL means every entry has
        seen a reply. REJECTED_CLASH means a live entry already has one of the
        two tuples.
        """
        if proto not in PROTO_NAMES:
            raise ValueError(f"proto must be 1 (ICMP), 6 (TCP) or 17 (UDP), got {proto}")
        o_src, o_sport, o_dst, o_dport = _check_tuple("orig", orig)
        r_src, r_sport, r_dst, r_dport = _check_tuple("reply", reply)
        entry_id = int(
            _create(
                self.slots,
                self.table,
                self.meta,
                self.fmeta,
                proto,
                o_src,
                o_sport,
                o_dst,
                o_dport,
                r_src,
                r_sport,
                r_dst,
                r_dport,
                float(now),
                int(tcp_flags),
                int(backend),
            )
        )
        if entry_id == REJECTED_FULL:
            self._log_overflow(now)
        return entry_id

    def create_many(self, protos, orig, reply, now: float, tcp_flags=None, backends=None) -> np.ndarray:
        """Add many connections with one numba call; return an entry id or REJECTED_* per connection.

        `orig` and `reply` are each four arrays (srcs, sports, dsts, dports).
        Connections are created in order, exactly as by repeated `create`.
        """
        protos = np.ascontiguousarray(protos, dtype=np.int64)
        n = protos.size
        if not np.isin(protos, list(PROTO_NAMES)).all():
            raise ValueError("every proto must be 1 (ICMP), 6 (TCP) or 17 (UDP)")
        columns = []
        for name, arrays in (("orig", orig), ("reply", reply)):
            if len(arrays) != 4:
                raise ValueError(f"{name} must be four arrays (srcs, sports, dsts, dports)")
            for field, values, limit in zip(("src", "sport", "dst", "dport"), arrays, (1 << 32, 1 << 16, 1 << 32, 1 << 16)):
                column = np.ascontiguousarray(values, dtype=np.int64)
                if column.size != n:
                    raise ValueError(f"{name} {field} has {column.size} values for {n} protos")
                if n and (column.min() < 0 or column.max() >= limit):
                    raise ValueError(f"{name} {field} has values outside 0..{limit - 1}")
                columns.append(column)
        flags = np.zeros(n, dtype=np.int64) if tcp_flags is None else np.ascontiguousarray(tcp_flags, dtype=np.int64)
        tags = np.zeros(n, dtype=np.int64) if backends is None else np.ascontiguousarray(backends, dtype=np.int64)
        if flags.size != n or tags.size != n:
            raise ValueError("tcp_flags and backends must have one value per proto")

        ids = np.empty(n, dtype=np.int64)
        _create_many(self.slots, self.table, self.meta, self.fmeta, protos, *columns, float(now), flags, tags, ids)
        if (ids == REJECTED_FULL).any():
            self._log_overflow(now)
        return ids

    def update(self, entry_id: int, direction: int, tcp_flags: int, now: float) -> str | None:
        """Record one packet of the entry: TCP state, timeout, seen reply; return the TCP state name.

        Returns None for UDP and ICMP entries.
        """
        self._check_entry(entry_id)
        if direction not in (ORIGINAL, REPLY):
            raise ValueError(f"direction must be ORIGINAL (0) or REPLY (1), got {direction}")
        state = _update(self.table, self.meta, self.fmeta, entry_id, direction, int(tcp_flags), float(now))
        if self.table[entry_id]["proto"] != IPPROTO_TCP:
            return None
        return TCP_STATES[state]

    def translation(self, entry_id: int, direction: int) -> tuple[int, int, int, int]:
        """Return (new_src, new_sport, new_dst, new_dport) to write into a packet of that direction."""
        self._check_entry(entry_id)
        if direction not in (ORIGINAL, REPLY):
            raise ValueError(f"direction must be ORIGINAL (0) or REPLY (1), got {direction}")
        return tuple(int(v) for v in _translation(self.table, entry_id, direction))

    def backend(self, entry_id: int) -> int:
        self._check_entry(entry_id)
        return int(self.table[entry_id]["backend"])

    def state(self, entry_id: int) -> str | None:
        """TCP state name of the entry; None for UDP and ICMP."""
        self._check_entry(entry_id)
        row = self.table[entry_id]
        return TCP_STATES[row["state"]] if row["proto"] == IPPROTO_TCP else None

    def seen_reply(self, entry_id: int) -> bool:
        self._check_entry(entry_id)
        return bool(self.table[entry_id]["status"] & ST_SEEN_REPLY)

    def expires_at(self, entry_id: int) -> float:
        self._check_entry(entry_id)
        return float(self.table[entry_id]["expires"])

    def remove(self, entry_id: int) -> None:
        self._check_entry(entry_id)
        _remove(self.slots, self.table, self.meta, entry_id)

    def expire(self, now: float, max_scan: int = 0) -> int:
        """Remove entries whose timeout passed; return how many.

        `max_scan` > 0 examines only that many entries, continuing where the
        previous partial scan stopped, so a periodic timer can spread the work.
        """
        return int(_expire(self.slots, self.table, self.meta, float(now), int(max_scan)))

    def lookup_icmp_error(self, frame, l4_off: int, now: float) -> tuple[int, int]:
        """Return (entry_id, direction the error travels) for an ICMP error, or (-1, 0).

        The quoted packet went the other way, so its tuple reversed is the
        tuple of the error's own direction.
        """
        quoted = embedded_tuple(frame, l4_off)
        if quoted is None:
            return -1, 0
        proto, src, sport, dst, dport = quoted
        return self.lookup(proto, dst, dport, src, sport, now)

    def pick_snat_port(
        self,
        proto: int,
        reply_src: int,
        reply_sport: int,
        snat_addr: int,
        rng: np.random.Generator,
        now: float,
        low: int = SNAT_PORT_MIN,
        high: int = SNAT_PORT_MAX,
    ) -> int:
        """Choose a source port for SNAT to `snat_addr` whose reply tuple is free; -1 when none is.

        The search starts at a port drawn from `rng` and walks up through
        [low, high], wrapping, so the same seed gives the same ports. For ICMP
        echo the port is the new echo identifier.
        """
        if not 0 <= low <= high <= 0xFFFF:
            raise ValueError(f"SNAT port range {low}-{high} is not within 0-65535")
        if proto not in PROTO_NAMES:
            raise ValueError(f"proto must be 1 (ICMP), 6 (TCP) or 17 (UDP), got {proto}")
        start = int(rng.integers(low, high + 1))
        return int(
            _free_reply_port(
                self.slots, self.table, self.meta, proto, reply_src, reply_sport, snat_addr, start, low, high, float(now)
            )
        )

    # -- fast path -----------------------------------------------------------

    def lookup_many(self, protos, srcs, sports, dsts, dports, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Look up arrays of tuples with one numba call; return (entry ids, directions), -1 for none."""
        protos = np.ascontiguousarray(protos, dtype=np.int64)
        n = protos.size
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (srcs, sports, dsts, dports)]
        if any(a.size != n for a in arrays):
            raise ValueError("protos, srcs, sports, dsts and dports must have the same length")
        ids = np.empty(n, dtype=np.int64)
        directions = np.empty(n, dtype=np.int64)
        _lookup_many(self.slots, self.table, self.meta, protos, *arrays, float(now), ids, directions)
        return ids, directions

    def lookup_records(self, records: np.ndarray, now: float, ids=None, directions=None) -> tuple[np.ndarray, np.ndarray]:
        """Look up parser records (tapnet.parse.RECORD_DTYPE) with one numba call.

        Returns (entry ids, directions), -1 where a frame is untracked, has no
        entry or its entry expired. ICMP errors are not matched here: look them
        up with `lookup_icmp_error`. `ids` and `directions` are reused when given.
        """
        n = records.size
        if ids is None:
            ids = np.empty(n, dtype=np.int64)
        if directions is None:
            directions = np.empty(n, dtype=np.int64)
        _lookup_records(self.slots, self.table, self.meta, records, float(now), ids[:n], directions[:n])
        return ids[:n], directions[:n]

    def update_records(self, records: np.ndarray, ids: np.ndarray, directions: np.ndarray, now: float) -> np.ndarray:
        """Record one packet per frame with an entry (see `update`); return the new states, -1 where skipped.

        A frame is skipped when its entry is gone or now holds another
        connection, which happens when `create` evicted it after the lookup.
        """
        states = np.empty(records.size, dtype=np.int64)
        _update_records(self.table, self.meta, self.fmeta, records, ids, directions, float(now), states)
        return states

    def rewrite_batch(self, batch, records: np.ndarray, ids: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Translate every frame of `batch` that has an entry, in the batch buffer; return REWRITE_* per frame.

        Frames without an entry get -1. A frame whose entry was evicted and
        reused since the lookup gets REWRITE_STALE and is left unchanged.
        """
        n = records.size
        statuses = np.empty(n, dtype=np.int64)
        _rewrite_batch(batch.buf, batch.offsets, batch.lengths, records, self.table, self.meta, ids, directions, statuses)
        return statuses

    # -- inspection ----------------------------------------------------------

    def entries(self, now: float) -> Iterator[dict]:
        """Yield the live entries as dicts shaped like `conntrack -L` lines, in entry id order.

        Each dict has proto, protonum, timeout (whole seconds left), state
        (TCP only), orig and reply tuples, flags (UNREPLIED or ASSURED),
        backend, and `line`, the text `conntrack -L` would print (without its
        mark and use fields, which tapnet does not have).
        """
        used = np.flatnonzero((self.table["status"] & ST_IN_USE) != 0)
        for entry_id in used:
            row = self.table[entry_id]
            if not now < row["expires"]:
                continue
            yield self._describe(int(entry_id), row, now)

    def _describe(self, entry_id: int, row, now: float) -> dict:
        proto = int(row["proto"])
        name = PROTO_NAMES[proto]
        state = TCP_STATES[row["state"]] if proto == IPPROTO_TCP else None
        replied = bool(row["status"] & ST_SEEN_REPLY)
        orig = {
            "src": _ip_text(row["orig_src"]),
            "dst": _ip_text(row["orig_dst"]),
            "sport": int(row["orig_sport"]),
            "dport": int(row["orig_dport"]),
        }
        reply = {
            "src": _ip_text(row["reply_src"]),
            "dst": _ip_text(row["reply_dst"]),
            "sport": int(row["reply_sport"]),
            "dport": int(row["reply_dport"]),
        }
        timeout = int(row["expires"] - now)

        parts = [f"{name:<8} {proto} {timeout}"]
        if state is not None:
            parts.append(state)
        if proto == IPPROTO_ICMP:
            parts.append(f"src={orig['src']} dst={orig['dst']} type=8 code=0 id={orig['sport']}")
        else:
            parts.append(f"src={orig['src']} dst={orig['dst']} sport={orig['sport']} dport={orig['dport']}")
        if not replied:
            parts.append("[UNREPLIED]")
        if proto == IPPROTO_ICMP:
            parts.append(f"src={reply['src']} dst={reply['dst']} type=0 code=0 id={reply['sport']}")
        else:
            parts.append(f"src={reply['src']} dst={reply['dst']} sport={reply['sport']} dport={reply['dport']}")
        if replied:
            parts.append("[ASSURED]")

        return {
            "id": entry_id,
            "proto": name,
            "protonum": proto,
            "timeout": timeout,
            "state": state,
            "orig": orig,
            "reply": reply,
            "flags": ["ASSURED"] if replied else ["UNREPLIED"],
            "backend": int(row["backend"]),
            "line": " ".join(parts),
        }

    def check_invariants(self) -> None:
        """Raise RuntimeError when the index and the entries disagree (for tests; O(capacity))."""
        used = np.flatnonzero((self.table["status"] & ST_IN_USE) != 0)
        if used.size != len(self):
            raise RuntimeError(f"count {len(self)} but {used.size} entries are in use")
        tags = self.slots[:, S_TAG].astype(np.int64)
        occupied = np.flatnonzero(tags != 0)
        if occupied.size != 2 * used.size:
            raise RuntimeError(f"{occupied.size} slots occupied for {used.size} entries; expected two per entry")

        for entry_id in used:
            row = self.table[entry_id]
            for direction, prefix in ((ORIGINAL, "orig"), (REPLY, "reply")):
                i = _find_slot(
                    self.slots,
                    self.meta,
                    _proto_code(int(row["proto"])),
                    int(row[f"{prefix}_src"]),
                    int(row[f"{prefix}_dst"]),
                    (int(row[f"{prefix}_sport"]) << 16) | int(row[f"{prefix}_dport"]),
                )
                if i < 0 or (tags[i] >> 3) - 1 != entry_id or tags[i] & 1 != direction:
                    raise RuntimeError(f"entry {entry_id} {prefix} tuple is not reachable in the index")

        unreplied = []
        e = int(self.meta[M_OLDEST])
        while e >= 0:
            unreplied.append(e)
            if len(unreplied) > self.capacity:
                raise RuntimeError("unreplied list has a cycle")
            e = int(self.table[e]["newer"])
        expected = {int(e) for e in used if not self.table[e]["status"] & ST_SEEN_REPLY}
        if set(unreplied) != expected or len(unreplied) != len(expected):
            raise RuntimeError("unreplied list does not match the entries without a reply")

    # -- helpers -------------------------------------------------------------

    def _check_entry(self, entry_id: int) -> None:
        if not 0 <= entry_id < self.capacity or not self.table[entry_id]["status"] & ST_IN_USE:
            raise ValueError(f"entry {entry_id} is not in use (removed, expired and swept, or never created)")

    def _log_overflow(self, now: float) -> None:
        if now - self._overflow_logged_at < OVERFLOW_LOG_INTERVAL:
            return
        rejected = self.overflows - self._overflows_at_log
        log.warning(
            "conntrack table full (%d entries, all replied): rejected %d new flows since the last warning",
            self.capacity,
            rejected,
        )
        self._overflow_logged_at = now
        self._overflows_at_log = self.overflows
