"""Trace and capture subscribers of a running instance, and stories that cross nodes.

Theory of operation
-------------------
A `Watch` sits beside one `Fabric`. The runtime consults it once per batch,
and only while it is installed (while at least one subscriber exists):

    trace = watch.before(batch)          # one numba call: every filter over every frame
    result = fabric.process(batch, now, rng, trace=trace)
    watch.after(batch, result, now)

`before` runs the subscribers' BPF filters (`tapnet.bpf.FilterSet`) over the
batch and requests tracing only when some frame matched. A filter that
matches nothing therefore costs one numba call per batch and no trace
records. `after` turns the records of matching frames into stories and the
frames into capture entries.

A story is what happened to one frame across the cluster: the record of the
frame where it entered tapnet, plus the records of the encapsulated copies
when they re-enter on the receiving node's VTEP port. Correlation keys each
encapsulated frame emitted on a VTEP port by (outer source IPv4, outer
destination IPv4, BLAKE2b-64 digest of the UDP payload, which is the VXLAN
header and the inner frame). The runtime carries that payload between nodes
unchanged, so the frame that re-enters yields the same key, whatever outer
IP id or UDP checksum the receiving side reads. Identical payloads in flight
at once are matched first in, first out. A story is complete, and goes to
its trace subscribers and the ring, when every copy it sent towards another
node of the cluster has re-entered, or `TUNNEL_WINDOW` seconds after the
last hop. A story cut short that way names the reason in `unfinished`.

Everything is bounded: each subscriber's queue (stories or captured bytes),
the open stories, and the ring of completed stories that `tapnet trace
--show ID` reads. What does not fit is dropped and counted, and the next poll
reports the count.

Time comes in as `now` (the runtime's clock, seconds). `wall_offset` turns
it into wall-clock time for display and for capture timestamps.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from tapnet.bpf import Filter, FilterSet
from tapnet.capture import CaptureEntry, capture_form, comment_for, record_decisions
from tapnet.model import VXLAN_PORT

log = logging.getLogger(__name__)

RING_STORIES = 4096  # completed stories kept for `tapnet trace --show ID`
MAX_SUBSCRIBERS = 16
TRACE_QUEUE_STORIES = 10000  # stories one trace subscriber may have waiting between polls
CAPTURE_QUEUE_BYTES = 64 << 20  # frame bytes one capture subscriber may have waiting between polls
IDLE_TIMEOUT = 10.0  # seconds without a poll after which a subscriber is removed (its client is gone)
TUNNEL_WINDOW = 1.0  # seconds an encapsulated frame may take to re-enter on the receiving node
MAX_OPEN_STORIES = 8192  # stories waiting for re-entries; beyond this the oldest completes early
POLL_MAX_STORIES = 1000  # stories per poll response
MAX_ERROR_LOGS = 10  # tracing faults logged with their traceback; later ones are only counted

KINDS = ("trace", "capture")


@dataclass
class Subscriber:
    id: int
    kind: str  # "trace" or "capture"
    filter: Filter
    last_poll: float
    queue: deque = field(default_factory=deque)
    queued_bytes: int = 0
    dropped: int = 0  # since the last poll
    delivered: int = 0
    slot: int = 0  # row of this subscriber's filter in the FilterSet


@dataclass
class Story:
    """One frame's way through the cluster: its records in order, first the one where it entered."""

    id: int
    wall: float
    hops: list  # TraceRecord, in order of processing
    subscribers: tuple[int, ...]
    deadline: float
    pending: int = 0  # encapsulated copies not yet seen re-entering
    keys: list = field(default_factory=list)  # tunnel keys registered for this story
    unfinished: str | None = None

    def to_dict(self, wall_offset: float) -> dict:
        hops = []
        for record in self.hops:
            hop = record.to_dict()
            hop["wall"] = record.time + wall_offset if record.time is not None else None
            hops.append(hop)
        first, last = hops[0], hops[-1]
        path = []
        for hop in hops:
            path.append(hop["ingress"])
            path.extend(hop["egress"])
        return {
            "id": self.id,
            "time": self.wall,
            "node": first["node"],
            "ingress": first["ingress"],
            "summary": first["summary"],
            "hops": hops,
            "verdict": last["verdict"],
            "reason": last["reason"],
            "egress": list(last["egress"]),
            "path": path,
            "unfinished": self.unfinished,
        }


def tunnel_key(frame: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(outer source IPv4, outer destination IPv4, digest of the UDP payload) of a VXLAN frame, or None."""
    l3 = 14
    if len(frame) < l3 + 20:
        return None
    ethertype = frame[12:14]
    if ethertype == b"\x81\x00" and len(frame) >= 18 + 20:
        l3, ethertype = 18, frame[16:18]
    if ethertype != b"\x08\x00" or frame[l3] >> 4 != 4 or frame[l3 + 9] != 17:
        return None
    udp = l3 + (frame[l3] & 0x0F) * 4
    if len(frame) < udp + 8 or int.from_bytes(frame[udp + 2 : udp + 4], "big") != VXLAN_PORT:
        return None
    end = min(len(frame), udp + int.from_bytes(frame[udp + 4 : udp + 6], "big"))
    digest = hashlib.blake2b(frame[udp + 8 : end], digest_size=8).digest()
    return frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], digest


class Watch:
    """Subscribers, their filters, open and completed stories of one fabric."""

    def __init__(self, fabric, wall_offset: float = 0.0, ring_size: int = RING_STORIES):
        self.fabric = fabric
        self.wall_offset = wall_offset
        self.ring_size = ring_size
        self.subscribers: dict[int, Subscriber] = {}
        self.ring: OrderedDict[int, dict] = OrderedDict()
        self.open: OrderedDict[int, Story] = OrderedDict()
        self.tunnel: dict[tuple, deque] = {}  # tunnel key -> story ids, oldest first
        self.stories_cut_short = 0  # completed early because MAX_OPEN_STORIES was reached
        self._next_subscriber = 1
        self._filters: FilterSet | None = None
        self._ports_seen = -1
        self._tunnel_ports = np.zeros(0, dtype=np.bool_)
        self._tunnel_port_ids: frozenset[int] = frozenset()
        self._node_vteps: frozenset[bytes] = frozenset()
        self._hits = 0
        self.batches_matched = 0
        self.errors = 0  # faults caught in before/after
        self.on_empty = None  # called when the last subscriber leaves (the runtime then drops the watch)

    # ---- subscribers ------------------------------------------------------

    def subscribe(self, kind: str, flt: Filter, now: float) -> Subscriber:
        if kind not in KINDS:
            raise ValueError(f"invalid subscriber kind {kind!r}: expected one of {', '.join(KINDS)}")
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise ValueError(f"too many trace and capture clients ({MAX_SUBSCRIBERS}); end one first")
        subscriber = Subscriber(self._next_subscriber, kind, flt, last_poll=now)
        self._next_subscriber += 1
        self.subscribers[subscriber.id] = subscriber
        self._filters = None
        log.info("%s subscriber %d added, filter %r", kind, subscriber.id, flt.expression)
        return subscriber

    def unsubscribe(self, subscriber_id: int) -> bool:
        subscriber = self.subscribers.pop(subscriber_id, None)
        if subscriber is None:
            return False
        self._filters = None
        log.info("%s subscriber %d removed after %d items", subscriber.kind, subscriber.id, subscriber.delivered)
        if not self.subscribers:
            self.flush()
            if self.on_empty is not None:
                self.on_empty()
        return True

    @property
    def active(self) -> bool:
        return bool(self.subscribers)

    def poll(self, subscriber_id: int, now: float, max_items: int = POLL_MAX_STORIES, max_bytes: int = 4 << 20) -> dict:
        """Take what waits for one subscriber: stories (trace) or capture entries, and the count dropped."""
        self.expire(now)
        subscriber = self.subscribers.get(subscriber_id)
        if subscriber is None:
            raise ValueError(f"no trace or capture subscriber {subscriber_id}; it ended or was idle for more than {IDLE_TIMEOUT:g} s")
        subscriber.last_poll = now
        items, size = [], 0
        queue = subscriber.queue
        while queue and len(items) < max_items and (size < max_bytes or not items):
            item = queue.popleft()
            if subscriber.kind == "capture":
                size += len(item.frame)
                subscriber.queued_bytes -= len(item.frame)
                items.append(item.to_wire())
            else:
                items.append(item)
        subscriber.delivered += len(items)
        dropped, subscriber.dropped = subscriber.dropped, 0
        return {"items": items, "dropped": dropped, "more": bool(queue)}

    def show(self, story_id: int) -> dict | None:
        story = self.ring.get(story_id)
        if story is None and story_id in self.open:
            return self.open[story_id].to_dict(self.wall_offset)
        return story

    # ---- the two calls per batch --------------------------------------------

    # Neither call raises: a fault in tracing is logged and counted in `errors`,
    # and the runtime goes on forwarding the batch.

    def before(self, batch) -> bool:
        """Run every filter over the batch; return True when the batch should be traced."""
        try:
            filters = self._filters
            if filters is None or self._ports_seen != len(self.fabric.ports):
                filters = self._build_filters()
            self._hits = filters.match_batch(batch)
        except Exception:
            self._fault("matching a batch against the trace filters")
            self._hits = 0
        return self._hits > 0

    def after(self, batch, result, now: float) -> None:
        """Turn the records of matching frames into stories and capture entries."""
        try:
            if self._hits:
                self.batches_matched += 1
                self._collect(batch, result)
            if self.open or self.subscribers:
                self.expire(now)
        except Exception:
            self._fault("collecting trace records of a batch")
        self._hits = 0

    def _fault(self, what: str) -> None:
        self.errors += 1
        if self.errors <= MAX_ERROR_LOGS:
            log.exception("%s failed (fault %d; only the first %d are logged)", what, self.errors, MAX_ERROR_LOGS)

    def _collect(self, batch, result) -> None:
        count = batch.count
        # Python lists, so that the loop below indexes no numpy array per frame.
        table = self._filters.matched
        matched = {s.id: table[s.slot].tolist() for s in self.subscribers.values()}
        capturing = {s.id for s in self.subscribers.values() if s.kind == "capture"}
        port_ids = batch.ports[:count].tolist()
        tunnel_ports = self._tunnel_port_ids
        ports = self.fabric.ports
        has_vnet = None  # per frame: carries a virtio-net header; computed when a capture needs it
        emits_of: dict[int, list] = {}
        for emit in result.emits:
            if emit.record is not None:
                emits_of.setdefault(id(emit.record), []).append(emit)

        for i, record in enumerate(result.records):
            if record is None:
                continue
            frame = None
            story = None
            if port_ids[i] in tunnel_ports:
                frame = batch.frame(i)
                story = self._claim(tunnel_key(frame), record)
            if story is None:
                selecting = tuple(subscriber for subscriber, rows in matched.items() if rows[i])
                if not selecting:
                    continue
                story = self._open(record, selecting)
            emits = emits_of.get(id(record), ())
            for emit in emits:
                if emit.port in tunnel_ports:
                    self._expect(story, emit.frame, record.time)

            capture_to = [self.subscribers[s] for s in story.subscribers if s in capturing]
            if capture_to:
                if frame is None:
                    frame = batch.frame(i)
                if has_vnet is None:
                    has_vnet = batch.vnet[:count].any(axis=1).tolist()
                hop = len(story.hops)
                decisions = record_decisions(record)
                vnet = batch.vnet[i].tobytes() if has_vnet[i] else None
                entries = [self._entry(story, hop, record, "in", record.ingress, frame, vnet, decisions)]
                for emit in emits:
                    name = ports[emit.port].name if 0 <= emit.port < len(ports) else f"port {emit.port}"
                    entries.append(self._entry(story, hop, record, "out", name, emit.frame, emit.vnet, decisions))
                for subscriber in capture_to:
                    self._push_entries(subscriber, entries)
            if story.pending <= 0:
                self._complete(story)

    def _entry(self, story: Story, hop: int, record, direction: str, port: str, frame: bytes, vnet, decisions: str) -> CaptureEntry:
        captured, notes = capture_form(frame, vnet)
        when = record.time + self.wall_offset
        return CaptureEntry(port, when, captured, comment_for(story.id, hop, record, direction, port, notes, decisions))

    # ---- stories ------------------------------------------------------------

    def _open(self, record, subscribers: tuple[int, ...]) -> Story:
        if len(self.open) >= MAX_OPEN_STORIES:
            oldest = next(iter(self.open.values()))
            oldest.unfinished = f"completed early: more than {MAX_OPEN_STORIES} stories were waiting for re-entries"
            self.stories_cut_short += 1
            self._complete(oldest)
        story = Story(record.id, record.time + self.wall_offset, [record], subscribers, deadline=record.time + TUNNEL_WINDOW)
        self.open[story.id] = story
        return story

    def _expect(self, story: Story, frame: bytes, now: float) -> None:
        """Register an encapsulated copy that should re-enter on another node of the cluster."""
        key = tunnel_key(frame)
        if key is None or key[1] not in self._node_vteps:
            return  # an external peer's VTEP: nothing comes back into tapnet
        self.tunnel.setdefault(key, deque()).append(story.id)
        story.keys.append(key)
        story.pending += 1
        story.deadline = now + TUNNEL_WINDOW

    def _claim(self, key, record) -> Story | None:
        """Find the open story that sent the frame with this tunnel key, and add `record` to it."""
        if key is None:
            return None
        waiting = self.tunnel.get(key)
        while waiting:
            story = self.open.get(waiting.popleft())
            if story is None:
                continue
            if not waiting:
                del self.tunnel[key]
            story.keys.remove(key)
            story.hops.append(record)
            story.pending -= 1
            story.deadline = record.time + TUNNEL_WINDOW
            return story
        self.tunnel.pop(key, None)
        return None

    def _complete(self, story: Story) -> None:
        self.open.pop(story.id, None)
        for key in story.keys:
            waiting = self.tunnel.get(key)
            if waiting is not None:
                try:
                    waiting.remove(story.id)
                except ValueError:
                    pass
                if not waiting:
                    del self.tunnel[key]
        if story.pending > 0 and story.unfinished is None:
            story.unfinished = f"{story.pending} encapsulated frame(s) not seen re-entering within {TUNNEL_WINDOW:g} s"
        story.keys.clear()
        record = story.to_dict(self.wall_offset)
        self.ring[story.id] = record
        while len(self.ring) > self.ring_size:
            self.ring.popitem(last=False)
        for subscriber_id in story.subscribers:
            subscriber = self.subscribers.get(subscriber_id)
            if subscriber is None or subscriber.kind != "trace":
                continue
            if len(subscriber.queue) >= TRACE_QUEUE_STORIES:
                subscriber.dropped += 1
            else:
                subscriber.queue.append(record)

    def _push_entries(self, subscriber: Subscriber, entries: list[CaptureEntry]) -> None:
        for entry in entries:
            if subscriber.queued_bytes + len(entry.frame) > CAPTURE_QUEUE_BYTES:
                subscriber.dropped += 1
                continue
            subscriber.queue.append(entry)
            subscriber.queued_bytes += len(entry.frame)

    def expire(self, now: float) -> None:
        """Complete stories past their deadline and remove subscribers that stopped polling."""
        overdue = [story for story in self.open.values() if story.deadline < now]
        for story in overdue:
            self._complete(story)
        idle = [s.id for s in self.subscribers.values() if now - s.last_poll > IDLE_TIMEOUT]
        for subscriber_id in idle:
            log.warning("%s subscriber %d removed: no poll for %g s", self.subscribers[subscriber_id].kind, subscriber_id, IDLE_TIMEOUT)
            self.unsubscribe(subscriber_id)

    def flush(self) -> None:
        """Complete every open story now (the last subscriber left, or the watch is being removed)."""
        for story in list(self.open.values()):
            self._complete(story)

    # ---- filters --------------------------------------------------------------

    def _build_filters(self) -> FilterSet:
        ports = self.fabric.ports
        self._tunnel_ports = np.array([port.kind == "vxlan" for port in ports], dtype=np.bool_)
        self._tunnel_port_ids = frozenset(port.id for port in ports if port.kind == "vxlan")
        self._node_vteps = frozenset(node.underlay_ip.packed for node in self.fabric.cluster.nodes)
        self._ports_seen = len(ports)
        unique: dict[str, int] = {}
        filters: list[Filter] = []
        for subscriber in self.subscribers.values():
            slot = unique.get(subscriber.filter.expression)
            if slot is None:
                slot = unique[subscriber.filter.expression] = len(filters)
                filters.append(subscriber.filter)
            subscriber.slot = slot
        self._filters = FilterSet(filters, self._tunnel_ports)
        return self._filters


# ---------------------------------------------------------------------------
# Text form of a story (used by the client)


def format_time(wall: float | None) -> str:
    if wall is None:
        return "-"
    return datetime.fromtimestamp(wall).strftime("%H:%M:%S.%f")


def format_story(story: dict) -> str:
    """Format a story as `tapnet trace` prints it: one block per story, one line per stage decision.

    The first line is the trace id, time, ingress port and the frame in
    tcpdump's words. Later hops (the frame re-entering on another node) start
    with `->`. Each hop ends with its verdict.
    """
    lines = []
    for number, hop in enumerate(story["hops"]):
        if number == 0:
            lines.append(f"trace {story['id']} {format_time(story['time'])} {hop['ingress']}: {hop['summary']}")
        else:
            lines.append(f"  -> {hop['ingress']} (record {hop['id']}): {hop['summary']}")
        for event in hop["events"]:
            detail = f"  {event['detail']}" if event["detail"] else ""
            lines.append(f"     {hop['node']:<8} {event['stage']:<8} {event['decision']:<14}{detail}".rstrip())
        lines.append("     " + format_verdict(hop))
    if story.get("unfinished"):
        lines.append(f"     unfinished: {story['unfinished']}")
    return "\n".join(lines)


def format_verdict(hop: dict) -> str:
    text = f"verdict: {hop['verdict'] or 'none'}"
    if hop["reason"]:
        text += f" reason={hop['reason']}"
    if hop["egress"]:
        text += " to " + ", ".join(hop["egress"])
    return text
