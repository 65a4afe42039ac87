"""The live runtime: sandboxes on real namespaces and TAPs, driven by one trio loop.

`Instance` realises a cluster on this machine (namespaces, TAP endpoints,
/etc/netns files, task processes), recording each object in the state file
before it exists, and removes them all again in `teardown`.

`TapLoop` moves frames between the TAP fds and the sans-I/O datapath. One
trio task per TAP waits for readiness and drains the fd into the shared
`FrameBatch`. It reads at most `DRAIN_FRAMES` frames, so one busy port cannot
starve the others. It then calls `Fabric.process` once for the batch with
trio's clock and the instance's generator, and writes the emitted frames with
non-blocking writes. Nothing between the drain and the last write awaits, so the shared
batch is never used by two tasks at once. A full TAP queue (EAGAIN) drops
the frame and counts it; no step blocks the event loop.

`run_daemon` ties both together with the control socket and the signals
that stop the instance.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from tapnet import netns
from tapnet.batch import MAX_FRAME, VNET_HDR_LEN, FrameBatch
from tapnet.model import Cluster
from tapnet.state import InstanceLock, StateFile, clean_leftovers, remove_objects

log = logging.getLogger(__name__)

# Frames drained from one TAP per wake-up; 64 superframes of 64 KiB fill the batch buffer.
DRAIN_FRAMES = 64
BATCH_BYTES = DRAIN_FRAMES * MAX_FRAME
# Seconds between calls of `Fabric.tick` (MAC ageing) and task exit checks.
TICK_INTERVAL = 1.0
# At most this many log lines per error kind per TICK_INTERVAL; the rest are only counted.
ERROR_LOGS_PER_TICK = 5
ZERO_VNET = bytes(VNET_HDR_LEN)

# Drop reasons the runtime counts itself, beside the datapath's.
DROP_TX_FULL = "tap-tx-full"  # write to a TAP returned EAGAIN
DROP_TX_ERROR = "tap-tx-error"  # write to a TAP failed otherwise (for example a bad virtio-net header)
DROP_RX_SHORT = "tap-rx-short"  # read returned less than a virtio-net header
DROP_NO_TAP = "no-tap"  # the datapath emitted to a port that has no TAP in this process
DROP_DATAPATH_ERROR = "datapath-error"  # Fabric.process raised; the batch is lost


@dataclass
class TaskProcess:
    sandbox: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    exit_status: int | None = None


class TapLoop:
    """Frames between TAP fds and the datapath, on trio."""

    def __init__(self, fabric, taps: list[netns.Tap], rng: np.random.Generator):
        self.fabric = fabric
        self.taps = taps
        self.rng = rng
        self.port_ids = [fabric.port_id(tap.port) for tap in taps]
        self.fd_by_port = {pid: tap.fd for pid, tap in zip(self.port_ids, taps)}
        self.name_by_port = dict(enumerate(fabric.port_names))

        self.batch = FrameBatch(DRAIN_FRAMES, BATCH_BYTES)
        self._buf_view = memoryview(self.batch.buf)
        self._vnet_rows = [memoryview(self.batch.vnet[i]) for i in range(DRAIN_FRAMES)]

        self.drops: Counter[tuple[str, str]] = Counter()  # (port name, reason) -> frames
        self.batches = 0
        self.dead_fds: set[int] = set()  # fds whose read failed for good; their tasks end
        self._logged: Counter[str] = Counter()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(len(self.taps)):
                nursery.start_soon(self._serve_tap, index)
            nursery.start_soon(self._tick)

    async def _serve_tap(self, index: int) -> None:
        fd = self.taps[index].fd
        port = self.port_ids[index]
        while fd not in self.dead_fds:
            await trio.lowlevel.wait_readable(fd)
            self.forward_from(fd, port, trio.current_time())
        log.error("stopped reading %s: its TAP fd failed; the port no longer receives", self.name_by_port[port])

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            self.fabric.tick(trio.current_time())
            self._logged.clear()

    def forward_from(self, fd: int, port: int, now: float) -> int:
        """Drain `fd` into the batch, run the datapath once and write what it emits; return frames read."""
        count = self._drain(fd, port, now)
        if count == 0:
            return 0

        try:
            result = self.fabric.process(self.batch, now, self.rng)
        except Exception:
            self.drops[(self.name_by_port[port], DROP_DATAPATH_ERROR)] += count
            if self._may_log(DROP_DATAPATH_ERROR):
                log.exception("datapath failed on a batch of %d frames from %s; batch dropped", count, self.name_by_port[port])
            return count

        for emit in result.emits:
            self._write(emit.port, emit.frame, emit.vnet)
        self.batches += 1
        return count

    def _drain(self, fd: int, port: int, now: float) -> int:
        batch = self.batch
        batch.clear()
        # Bounded by reads, not frames, so a stream of short reads cannot spin here.
        for _ in range(DRAIN_FRAMES):
            i = batch.count
            try:
                n = os.readv(fd, [self._vnet_rows[i], self._buf_view[batch.used : batch.used + MAX_FRAME]])
            except BlockingIOError:
                break
            except OSError as error:
                # EBADFD or EIO once the device is gone: the fd stays readable, so
                # serving it on would spin. Its task stops after this batch.
                log.error("reading TAP of %s failed: %s", self.name_by_port[port], error)
                self.dead_fds.add(fd)
                break
            if n < VNET_HDR_LEN:
                self.drops[(self.name_by_port[port], DROP_RX_SHORT)] += 1
                continue
            batch.offsets[i] = batch.used
            batch.lengths[i] = n - VNET_HDR_LEN
            batch.ports[i] = port
            batch.timestamps[i] = now
            batch.count += 1
            batch.used += n - VNET_HDR_LEN
        return batch.count

    def _write(self, port: int, frame: bytes, vnet: bytes | None) -> None:
        fd = self.fd_by_port.get(port)
        name = self.name_by_port.get(port, f"port {port}")
        if fd is None:
            self.drops[(name, DROP_NO_TAP)] += 1
            return
        try:
            os.writev(fd, [vnet if vnet is not None else ZERO_VNET, frame])
        except BlockingIOError:
            self.drops[(name, DROP_TX_FULL)] += 1
        except OSError as error:
            self.drops[(name, DROP_TX_ERROR)] += 1
            if self._may_log(DROP_TX_ERROR):
                log.warning("writing a %d-byte frame to %s failed: %s", len(frame), name, error)

    def _may_log(self, kind: str) -> bool:
        self._logged[kind] += 1
        return self._logged[kind] <= ERROR_LOGS_PER_TICK

    def counters(self) -> dict[str, dict]:
        """Per-port counters of the datapath with the runtime's own drops merged in."""
        out = self.fabric.counters()
        for (name, reason), n in self.drops.items():
            entry = out.setdefault(name, {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "drops": {}})
            entry["drops"][reason] = entry["drops"].get(reason, 0) + n
        return out


@dataclass
class Instance:
    """One running tapnet: the cluster, what was made for it, and the live datapath."""

    name: str
    cluster: Cluster
    state: StateFile
    stack_label: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)  # sandbox -> namespace
    taps: list[netns.Tap] = field(default_factory=list)
    tasks: dict[str, TaskProcess] = field(default_factory=dict)
    fabric: object | None = None
    loop: TapLoop | None = None
    seed: int = 0
    started_at: float = field(default_factory=time.time)
    stopping: trio.Event | None = None

    @property
    def log_dir(self) -> Path:
        return self.state.directory / "logs"

    def realise(self) -> None:
        """Create every sandbox namespace, its /etc/netns files and its TAP endpoints."""
        for sandbox in self.cluster.sandboxes.values():
            namespace = netns.namespace_name(self.name, sandbox.name)
            if netns.namespace_identity(namespace) is not None:
                raise netns.NamespaceTaken(
                    f"namespace {namespace} (sandbox {sandbox.name}) already exists and is not listed in the state of "
                    f"instance {self.name}; remove it (ip netns delete {namespace}) or use another --instance"
                )
            entry = self.state.add("netns", name=namespace, sandbox=sandbox.name, identity=None)
            identity = netns.create_namespace(namespace)
            self.state.update(entry, identity=identity)
            self.namespaces[sandbox.name] = namespace

            self.state.add("etc_netns", path=str(netns.ETC_NETNS_DIR / namespace))
            netns.write_etc_files(namespace, sandbox, self.cluster)

            self.taps.extend(netns.create_endpoints(namespace, sandbox, self.cluster))
            log.info("sandbox %s ready in %s (%s)", sandbox.name, namespace, ", ".join(f"{e.ifname} {e.ip}" for e in sandbox.endpoints))

    def start_tasks(self) -> None:
        """Start each sandbox's command inside its namespace, logging to logs/<sandbox>.log."""
        for sandbox in self.cluster.sandboxes.values():
            if not sandbox.command:
                continue
            log_path = self.log_dir / f"{sandbox.name}.log"
            popen = netns.spawn_in_namespace(self.namespaces[sandbox.name], list(sandbox.command), log_path)
            self.state.record_process(popen.pid, sandbox.name)
            self.tasks[sandbox.name] = TaskProcess(sandbox.name, list(sandbox.command), popen, log_path)
            log.info("task %s started: pid %d, %s", sandbox.name, popen.pid, " ".join(sandbox.command))

    def poll_tasks(self) -> None:
        for task in self.tasks.values():
            if task.exit_status is None:
                status = task.popen.poll()
                if status is not None:
                    task.exit_status = status
                    log.warning("task %s exited with status %d (log: %s)", task.sandbox, status, task.log_path)

    def teardown(self) -> None:
        """Close every TAP, then end processes and remove namespaces and /etc/netns files the state lists."""
        for tap in self.taps:
            tap.close()
        self.taps.clear()
        report = remove_objects(self.state)
        log.info("instance %s stopped: %s", self.name, report.summary())


def build_fabric(cluster: Cluster):
    """Build the datapath and compile its numba parser before any frame arrives."""
    # Imported here so that `tapnet ps` and friends do not pay for numba.
    from tapnet.datapath import Fabric

    fabric = Fabric(cluster)
    warm_up_parser()
    return fabric


def warm_up_parser() -> None:
    """Compile the batch parsers now, or load them from numba's cache.

    Without this the first frame compiles them inside `Fabric.process`, which
    blocks the event loop (and the control socket) for as long as the
    compilation takes. On a loaded 2-core machine that was over 40 s.
    """
    from tapnet import parse

    batch = FrameBatch(1, 64)
    batch.append(0, bytes(60))
    records = parse.parse_batch(batch)
    parse.parse_inner(batch, records)


def run_daemon(
    name: str,
    cluster: Cluster,
    serve_control: Callable,
    on_ready: Callable[[Instance], None],
    stack_label: str = "",
    seed: int | None = None,
) -> int:
    """Realise `cluster` as instance `name` and run it until SIGINT, SIGTERM or a stop request.

    Takes the instance lock (InstanceRunning when held), removes leftovers of
    a previous daemon, and always tears down what it made before returning.
    `serve_control(instance, task_status=...)` runs the control socket.
    """
    netns.check_host_support()
    lock = InstanceLock(name)
    lock.acquire()
    # Until trio's signal receiver takes over, SIGTERM unwinds like Ctrl-C so that
    # the teardown below still runs (the default action would end the process at once).
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        report = clean_leftovers(name, lock)
        if report is not None:
            log.warning("instance %s: leftovers removed: %s", name, report.summary())

        state = StateFile(name)
        state.record_daemon(os.getpid())
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        instance = Instance(name, cluster, state, stack_label=stack_label, seed=seed)
        log.info("instance %s: random seed %d", name, seed)
        try:
            instance.fabric = build_fabric(cluster)
            instance.realise()
            instance.loop = TapLoop(instance.fabric, instance.taps, np.random.default_rng(seed))
            instance.start_tasks()
            trio.run(_main, instance, serve_control, on_ready)
        finally:
            instance.teardown()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        lock.release()
    return 0


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


async def _main(instance: Instance, serve_control: Callable, on_ready: Callable[[Instance], None]) -> None:
    instance.stopping = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(instance.loop.run)
            nursery.start_soon(_watch_tasks, instance)
            nursery.start_soon(_watch_signals, signals, instance)
            await nursery.start(serve_control, instance)
            on_ready(instance)
            await instance.stopping.wait()
            nursery.cancel_scope.cancel()


async def _watch_signals(signals, instance: Instance) -> None:
    async for signum in signals:
        log.info("instance %s: %s received, stopping", instance.name, signal.Signals(signum).name)
        instance.stopping.set()
        return


async def _watch_tasks(instance: Instance) -> None:
    while True:
        instance.poll_tasks()
        await trio.sleep(TICK_INTERVAL)

