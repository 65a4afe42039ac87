"""The live runtime: sandboxes on real namespaces and TAPs, driven by one trio loop.

`Instance` realises a cluster on this machine (namespaces, TAP endpoints,
/etc/netns files, task processes), recording each object in the state file
before it exists, and removes them all again in `teardown`.

`TapLoop` moves frames between the TAP fds and the sans-I/O datapath. One
trio task waits on an epoll set of every TAP. When any TAP is readable it
drains all ready TAPs into one `FrameBatch` (numba kernels in
`tapnet.tapio`, one `readv` per frame and no Python per frame). Each TAP
gets an equal share of the batch's `BATCH_FRAMES` slots, so one busy port
cannot starve the others. The task then calls `Fabric.process` once for
the batch with trio's clock and the instance's generator, and writes the
emitted frames with non-blocking writes, again in one numba call. Nothing
between the drain and the last write awaits. A full TAP queue (EAGAIN)
drops the frame and counts it; no step blocks the event loop.

`tapnet.underlay` builds each node's host namespace on the underlay bridge
and runs the nodes' UDP sockets (VTEP and DNS upstream) as datapath ports.
Frames the datapath emits on those ports go through `TapLoop._write` to
`SocketPorts.send`, so every emit takes one path whichever loop produced it.

`run_daemon` ties them together with the control socket and the signals
that stop the instance.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from tapnet import mesh, netns, servicectl, tapio
from tapnet.batch import MAX_FRAME, VNET_HDR_LEN, FrameBatch
from tapnet.model import Cluster
from tapnet.state import InstanceLock, StateFile, clean_leftovers, remove_objects
from tapnet.underlay import SocketPorts, Underlay

log = logging.getLogger(__name__)

# Frames per batch, drained from all ready TAPs together. With several TAPs
# ready each gets an equal share, but at least MIN_DRAIN_FRAMES.
BATCH_FRAMES = 256
MIN_DRAIN_FRAMES = 16
# Distinct sets of ready TAPs whose kernel arguments are kept; the cache starts over when full.
READY_SETS_CACHED = 64
# Larger emitted frames (TCP superframes) are written with os.writev from their own
# bytes, because copying them into the joined buffer of tapio.write costs more than
# the Python around one os.writev (about 3 us on the 2-core VM of perf/README.md).
JOIN_MAX_FRAME = 8192
# Each read needs room for a whole superframe, so the batch has room for at most
# 64 superframes of 64 KiB; small frames take all BATCH_FRAMES slots first.
BATCH_BYTES = 64 * MAX_FRAME
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
        self.port_by_fd = {tap.fd: pid for pid, tap in zip(self.port_ids, taps)}
        self.name_by_port = dict(enumerate(fabric.port_names))
        for fd in self.port_by_fd:
            os.set_blocking(fd, False)  # a blocking read or write in the kernels would stall the event loop

        self.batch = FrameBatch(BATCH_FRAMES, BATCH_BYTES)
        self._drain_state = np.zeros(tapio.STATE_LEN, dtype=np.int64)
        self._rx_errors = np.zeros(len(taps), dtype=np.int32)
        self._rx_short = np.zeros(len(taps), dtype=np.int64)
        self._iov = np.zeros(4, dtype=np.uint64)
        # (fd array, port array) per set of ready fds seen lately, because building
        # the two arrays costs more than draining one frame.
        self._ready_arrays: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        tapio.warm_up()

        self.drops: Counter[tuple[str, str]] = Counter()  # (port name, reason) -> frames
        self.batches = 0
        self.dead_fds: set[int] = set()  # fds whose read failed for good; they left the epoll set
        self.socket_ports: SocketPorts | None = None  # sends emits on the nodes' UDP-socket ports; set by run_daemon
        self.watch = None  # trace and capture subscribers (tapnet.watch.Watch); set by tapnet.views while any exists
        self._epoll: select.epoll | None = None
        self._logged: Counter[str] = Counter()

    async def run(self) -> None:
        with select.epoll() as epoll:
            for fd in self.port_by_fd:
                epoll.register(fd, select.EPOLLIN)
            self._epoll = epoll
            try:
                async with trio.open_nursery() as nursery:
                    if self.taps:
                        nursery.start_soon(self._serve_taps, epoll)
                    nursery.start_soon(self._tick)
            finally:
                self._epoll = None

    async def _serve_taps(self, epoll: select.epoll) -> None:
        # A single task serves every TAP: the epoll set becomes readable when any
        # TAP is, and its level-triggered events name every ready TAP in turn.
        while len(self.dead_fds) < len(self.port_by_fd):
            await trio.lowlevel.wait_readable(epoll.fileno())
            self.forward_ready([fd for fd, _ in epoll.poll(0)], trio.current_time())
        log.error("stopped reading TAPs: every TAP fd failed")

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            result = self.fabric.tick(trio.current_time())
            for emit in result.emits:
                self._write(emit.port, emit.frame, emit.vnet)
            self._logged.clear()

    def forward_ready(self, fds: list[int], now: float) -> int:
        """Drain the TAPs `fds` into one batch, run the datapath once and write what it emits; return frames read."""
        fds = [fd for fd in fds if fd in self.port_by_fd and fd not in self.dead_fds]
        if not fds:
            return 0
        count = self._drain(fds, now)
        if count == 0:
            return 0

        watch = self.watch
        try:
            trace = watch is not None and watch.before(self.batch)
            result = self.fabric.process(self.batch, now, self.rng, trace=trace)
            if watch is not None:
                watch.after(self.batch, result, now)
        except Exception:
            for port, n in Counter(self.batch.ports[:count].tolist()).items():
                self.drops[(self.name_by_port[port], DROP_DATAPATH_ERROR)] += n
            if self._may_log(DROP_DATAPATH_ERROR):
                log.exception("datapath failed on a batch of %d frames from %d TAP(s); batch dropped", count, len(fds))
            return count

        self._write_batch(result.emits)
        self.batches += 1
        return count

    def _drain(self, fds: list[int], now: float) -> int:
        key = tuple(fds)
        arrays = self._ready_arrays.get(key)
        if arrays is None:
            if len(self._ready_arrays) >= READY_SETS_CACHED:
                self._ready_arrays.clear()
            arrays = (np.array(fds, dtype=np.int32), np.array([self.port_by_fd[fd] for fd in fds], dtype=np.int32))
            self._ready_arrays[key] = arrays
        fd_array, ports = arrays

        # Ready TAPs share the batch; each read is bounded, so a stream of short reads cannot spin.
        per_fd = max(MIN_DRAIN_FRAMES, BATCH_FRAMES // len(fds))
        batch = self.batch
        state = self._drain_state
        tapio.drain(
            fd_array, ports, per_fd, batch.buf, batch.offsets, batch.lengths, batch.ports, batch.vnet,
            batch.timestamps, now, state, self._rx_errors, self._rx_short, self._iov,
        )
        batch.count, batch.used, problems = state.tolist()
        if problems:
            n = len(fds)
            self._count_rx_problems(fds, self._rx_errors[:n].tolist(), self._rx_short[:n].tolist())
        return batch.count

    def _count_rx_problems(self, fds: list[int], errors: list[int], short: list[int]) -> None:
        for fd, code, n_short in zip(fds, errors, short):
            name = self.name_by_port[self.port_by_fd[fd]]
            if n_short:
                self.drops[(name, DROP_RX_SHORT)] += n_short
            if code:
                # EBADFD or EIO once the device is gone: the fd stays readable, so
                # reading it on would spin. It leaves the epoll set for good.
                log.error("reading TAP of %s failed: %s; the port no longer receives", name, os.strerror(code))
                self.dead_fds.add(fd)
                if self._epoll is not None:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass  # a closed fd has already left the epoll set

    def _write_batch(self, emits: list) -> None:
        """Write every emitted frame in order; each run of small frames for TAPs goes out in one tapio.write call."""
        fd_by_port = self.fd_by_port
        plan: list[int] = []  # (fd, message length) pairs, see tapio.write
        parts: list[bytes] = []  # each message's virtio-net header, then its frame
        for emit in emits:
            fd = fd_by_port.get(emit.port)
            frame = emit.frame
            vnet = emit.vnet
            if fd is not None and len(frame) <= JOIN_MAX_FRAME and (vnet is None or len(vnet) == VNET_HDR_LEN):
                parts.append(ZERO_VNET if vnet is None else vnet)
                parts.append(frame)
                plan.append(fd)
                plan.append(VNET_HDR_LEN + len(frame))
                continue
            # Socket ports, missing TAPs, odd headers and large frames go one by one,
            # after the frames emitted before them, so every port keeps the datapath's order.
            if plan:
                self._write_messages(plan, parts)
                plan, parts = [], []
            self._write(emit.port, frame, vnet)
        if plan:
            self._write_messages(plan, parts)

    def _write_messages(self, plan: list[int], parts: list[bytes]) -> None:
        plan_array = np.array(plan, dtype=np.int64)
        if tapio.write(plan_array, np.frombuffer(b"".join(parts), dtype=np.uint8)):
            for i in range(1, len(plan), 2):
                if plan_array[i] < 0:
                    self._count_tx_failure(plan[i - 1], -int(plan_array[i]), plan[i] - VNET_HDR_LEN)

    def _write(self, port: int, frame: bytes, vnet: bytes | None) -> None:
        """Write one emitted frame to whichever port it names: a TAP, or a node's UDP socket."""
        fd = self.fd_by_port.get(port)
        if fd is None and self.socket_ports is not None and self.socket_ports.owns(port):
            self.socket_ports.send(port, frame)
            return
        if fd is None:
            self.drops[(self.name_by_port.get(port, f"port {port}"), DROP_NO_TAP)] += 1
            return
        try:
            os.writev(fd, [vnet if vnet is not None else ZERO_VNET, frame])
        except OSError as error:
            self._count_tx_failure(fd, error.errno, len(frame))

    def _count_tx_failure(self, fd: int, code: int, length: int) -> None:
        name = self.name_by_port[self.port_by_fd[fd]]
        if code == errno.EAGAIN:
            self.drops[(name, DROP_TX_FULL)] += 1
            return
        self.drops[(name, DROP_TX_ERROR)] += 1
        if self._may_log(DROP_TX_ERROR):
            log.warning("writing a %d-byte frame to %s failed: %s", length, name, os.strerror(code))

    def _may_log(self, kind: str) -> bool:
        self._logged[kind] += 1
        return self._logged[kind] <= ERROR_LOGS_PER_TICK

    def add_taps(self, taps: list[netns.Tap]) -> None:
        """Start reading `taps`, whose ports the fabric already has (after `Fabric.update_cluster`)."""
        self.name_by_port = dict(enumerate(self.fabric.port_names))
        for tap in taps:
            port = self.fabric.port_id(tap.port)
            self.taps.append(tap)
            self.port_ids.append(port)
            self.fd_by_port[port] = tap.fd
            self.port_by_fd[tap.fd] = port
            self.dead_fds.discard(tap.fd)
            if self._epoll is not None:
                self._epoll.register(tap.fd, select.EPOLLIN)
        self._resize_per_tap_arrays()

    def remove_taps(self, taps: list[netns.Tap]) -> None:
        """Stop reading `taps` and close them; their ports keep their counters."""
        for tap in taps:
            fd = tap.fd
            port = self.port_by_fd.pop(fd, None)
            if port is not None:
                self.fd_by_port.pop(port, None)
                self.port_ids.remove(port)
            if self._epoll is not None and fd not in self.dead_fds:
                self._epoll.unregister(fd)
            self.dead_fds.discard(fd)
            self.taps.remove(tap)
            tap.close()
        self._resize_per_tap_arrays()

    def _resize_per_tap_arrays(self) -> None:
        # A closed fd number can come back for another TAP, so cached fd -> port arrays go.
        self._ready_arrays.clear()
        n = max(1, len(self.taps))
        if len(self._rx_errors) < n:
            self._rx_errors = np.zeros(n, dtype=np.int32)
            self._rx_short = np.zeros(n, dtype=np.int64)

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
    underlay: Underlay = field(default_factory=Underlay)
    sockets: SocketPorts | None = None
    seed: int = 0
    started_at: float = field(default_factory=time.time)
    stopping: trio.Event | None = None
    relays: list = field(default_factory=list)  # tapnet.mesh.Relay listeners on 127.0.0.1
    conntrack_max: int | None = None  # entries per node's conntrack table; None keeps tapnet.lb.CONNTRACK_MAX

    @property
    def log_dir(self) -> Path:
        return self.state.directory / "logs"

    def realise(self) -> None:
        """Create every sandbox namespace, its /etc/netns files and its TAP endpoints."""
        for sandbox in self.cluster.sandboxes.values():
            self.taps.extend(self.realise_sandbox(sandbox, self.cluster))

    def realise_sandbox(self, sandbox, cluster: Cluster) -> list[netns.Tap]:
        """Create one sandbox's namespace (recorded in the state first), /etc/netns files and TAPs; return the TAPs."""
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

        self.state.add("etc_netns", path=str(netns.ETC_NETNS_DIR / namespace), sandbox=sandbox.name)
        netns.write_etc_files(namespace, sandbox, cluster)

        taps = netns.create_endpoints(namespace, sandbox, cluster)
        log.info("sandbox %s ready in %s (%s)", sandbox.name, namespace, ", ".join(f"{e.ifname} {e.ip}" for e in sandbox.endpoints))
        return taps

    def realise_underlay(self) -> None:
        """Create the underlay bridge, each node's host namespace with its sockets, and the client namespaces."""
        self.underlay.build(self.name, self.cluster, self.state, self.fabric)

    def start_tasks(self) -> None:
        """Start each sandbox's command inside its namespace, logging to logs/<sandbox>.log."""
        for sandbox in self.cluster.sandboxes.values():
            self.start_task(sandbox)

    def start_task(self, sandbox) -> None:
        """Start one sandbox's command, if it has one, and record its PID in the state."""
        if not sandbox.command:
            return
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
        for relay in self.relays:
            relay.close()
        self.relays.clear()
        self.underlay.close()
        report = remove_objects(self.state)
        log.info("instance %s stopped: %s", self.name, report.summary())


def build_fabric(cluster: Cluster):
    """Build the datapath and compile its numba parser before any frame arrives."""
    # Imported here so that `tapnet ps` and friends do not pay for numba.
    from tapnet.datapath import Fabric

    fabric = Fabric(cluster)
    warm_up_parser()
    from tapnet.warmup import warm_up

    warm_up()  # conntrack, NAT, offload and capture code too, so no first frame compiles them
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
    conntrack_max: int | None = None,
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
        instance = Instance(name, cluster, state, stack_label=stack_label, seed=seed, conntrack_max=conntrack_max)
        log.info("instance %s: random seed %d", name, seed)
        try:
            # Relay ports first: one in use stops the start before any namespace exists.
            instance.relays = mesh.open_relays(cluster)
            instance.fabric = build_fabric(cluster)
            servicectl.size_conntrack(instance.fabric, conntrack_max, seed)
            instance.realise_underlay()
            instance.taps.extend(mesh.realise(cluster, instance.underlay.hosts))
            mesh.aim_relays(instance.relays, cluster, instance.underlay.hosts)
            instance.realise()
            rng = np.random.default_rng(seed)
            instance.loop = TapLoop(instance.fabric, instance.taps, rng)
            instance.sockets = SocketPorts(instance.fabric, instance.underlay.ports, rng, instance.loop._write, instance.loop.drops)
            instance.loop.socket_ports = instance.sockets
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
            nursery.start_soon(instance.sockets.run)
            nursery.start_soon(_watch_tasks, instance)
            nursery.start_soon(_watch_signals, signals, instance)
            nursery.start_soon(mesh.serve_relays, instance.relays)
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

