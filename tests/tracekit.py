"""Helpers for trace and capture tests: a Fabric with a Watch, fed the way the live runtime feeds it."""

from __future__ import annotations

import numpy as np

from dpkit import Wire
from tapnet import bpf
from tapnet.batch import FrameBatch
from tapnet.watch import Watch

# Wall clock the tests' stories and captures are stamped with: 2024-01-01 00:00:00 UTC plus the datapath's `now`.
WALL_OFFSET = 1_704_067_200.0


class Traced(Wire):
    """A Wire whose batches go through a Watch: before, process with the trace flag it returns, after."""

    def __init__(self, cluster=None, seed: int = 0):
        super().__init__(cluster, seed)
        self.watch = Watch(self.fabric, wall_offset=WALL_OFFSET)
        self.traced: list[bool] = []  # the trace flag of each batch, in order

    def subscribe(self, expression: str = "", kind: str = "trace", now: float = 0.0):
        return self.watch.subscribe(kind, bpf.compile_filter(expression), now)

    def run(self, frames, now: float = 0.0):
        """Process (port, packet, [vnet]) tuples as one batch through the watch; returns the Result."""
        batch = FrameBatch(capacity_frames=max(16, len(frames)), capacity_bytes=1 << 20)
        for port, packet, *vnet in frames:
            batch.append(port, bytes(packet), vnet[0] if vnet else None, timestamp=now)
        trace = self.watch.before(batch)
        self.traced.append(trace)
        result = self.fabric.process(batch, now, self.rng, trace=trace)
        self.watch.after(batch, result, now)
        return result

    def stories(self, subscriber, now: float = 0.0) -> list[dict]:
        return self.watch.poll(subscriber.id, now)["items"]

    def only_story(self, subscriber, now: float = 0.0) -> dict:
        stories = self.stories(subscriber, now)
        assert len(stories) == 1, f"expected one story, got {[s['summary'] for s in stories]}"
        return stories[0]

    def vxlan_port(self, node: str) -> int:
        return self.fabric.port_id(f"{node}/vxlan")

    def carry(self, result, now: float):
        """Hand every frame emitted on a VTEP port to the VTEP it is addressed to, as the runtime's sockets do."""
        by_ip = {node.underlay_ip.packed: node.name for node in self.cluster.nodes}
        frames = []
        for emit in result.emits:
            port = self.fabric.ports[emit.port]
            if port.kind != "vxlan":
                continue
            destination = by_ip.get(emit.frame[30:34])
            if destination is not None:
                frames.append((self.vxlan_port(destination), emit.frame))
        return self.run(frames, now) if frames else None


def events(story: dict, hop: int = 0) -> list[tuple[str, str]]:
    """(stage, decision) of every event of one hop."""
    return [(e["stage"], e["decision"]) for e in story["hops"][hop]["events"]]


def ports_of(result, fabric) -> list[str]:
    return [fabric.ports[e.port].name for e in result.emits]


def empty_rng():
    return np.random.default_rng(0)
