"""The state file of an instance, its lock, and cleanup of what the instance made.

`/run/tapnet/<instance>/state.json` lists every object the instance created,
each written to the file before (or, for a PID, right after) the object comes
into being. Cleanup reads only this list, so it removes exactly what this
instance made and never touches another instance or anything else:

- a namespace is removed only when the mounted namespace still has the
  identity (nsfs device and inode) recorded when it was created;
- a process is signalled only when its start time in /proc still matches the
  recorded one, so a reused PID is never killed;
- processes that live inside one of the instance's namespaces are ended too,
  because only the instance and its users can have put them there;
- an /etc/netns directory is removed only when it is a `tn-*` directory the
  file lists;
- a veth pair of the underlay (kind `veth`) has both ends inside the
  instance's namespaces (the underlay namespace and a host or client
  namespace), so it goes when they go; the file lists it so that the state
  shows the whole underlay.

Namespaces carry a `role` besides sandbox namespaces: `underlay`, `host`
(with its `node`) or `client` (with its `client` name). Cleanup treats them
all alike. Sockets (the VTEPs) are fds of the daemon and need no entry.

The running daemon holds an exclusive `flock` on `lock` in the state
directory. The kernel drops it when the daemon dies, even by SIGKILL, so a
free lock with a state file left means leftovers to clean up.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tapnet import netns

log = logging.getLogger(__name__)

STATE_ROOT = Path("/run/tapnet")
STATE_VERSION = 1
# Seconds a process gets between SIGTERM and SIGKILL during cleanup.
TERM_GRACE = 2.0


class StateError(Exception):
    """The state directory or file cannot be used; the message names the fix."""


class InstanceRunning(StateError):
    """Another daemon of the same instance holds the lock."""


def state_dir(instance: str) -> Path:
    return STATE_ROOT / instance


def process_start_time(pid: int) -> int | None:
    """Return the start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it are plain.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[19])


def is_same_process(pid: int, start_time: int | None) -> bool:
    """True when `pid` is alive and is still the process that started at `start_time`."""
    return start_time is not None and process_start_time(pid) == start_time


@dataclass
class StateFile:
    """The object list of one instance, saved atomically on every change."""

    instance: str
    objects: list[dict] = field(default_factory=list)
    daemon: dict | None = None

    @property
    def directory(self) -> Path:
        return state_dir(self.instance)

    @property
    def path(self) -> Path:
        return self.directory / "state.json"

    @classmethod
    def load(cls, instance: str) -> StateFile | None:
        """Read the state file of `instance`, or None when there is none."""
        path = state_dir(instance) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StateError(f"state file {path} is unreadable ({error}); inspect it and remove it by hand") from error
        if data.get("version") != STATE_VERSION:
            raise StateError(f"state file {path} has version {data.get('version')}, expected {STATE_VERSION}")
        return cls(instance, list(data.get("objects", [])), data.get("daemon"))

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"version": STATE_VERSION, "instance": self.instance, "daemon": self.daemon, "objects": self.objects}
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as output:
            json.dump(data, output, indent=1)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, self.path)

    def add(self, kind: str, **fields) -> dict:
        """Record a new object and save; returns the entry for later `update` calls."""
        entry = {"kind": kind, **fields}
        self.objects.append(entry)
        self.save()
        return entry

    def update(self, entry: dict, **fields) -> None:
        entry.update(fields)
        self.save()

    def discard(self, entry: dict) -> None:
        self.objects = [o for o in self.objects if o is not entry]
        self.save()

    def record_daemon(self, pid: int) -> None:
        self.daemon = {"pid": pid, "start_time": process_start_time(pid)}
        self.save()

    def record_process(self, pid: int, sandbox: str) -> dict:
        return self.add("process", pid=pid, start_time=process_start_time(pid), sandbox=sandbox)

    def remove_file(self) -> None:
        self.path.unlink(missing_ok=True)


class InstanceLock:
    """The exclusive flock a running daemon holds on `<state dir>/lock`."""

    def __init__(self, instance: str):
        self.path = state_dir(instance) / "lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise InstanceRunning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceRunning(f"instance {self.path.parent.name!r} is already running; stop it with `tapnet stop --instance {self.path.parent.name}`") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock (a live daemon)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def _signal(pid: int, start_time: int | None, signum: int, group: bool) -> bool:
    """Send `signum` to `pid` (its process group when it leads one) if it is still the recorded process."""
    if not is_same_process(pid, start_time):
        return False
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(processes: list[tuple[int, int | None]], timeout: float) -> list[tuple[int, int | None]]:
    deadline = time.monotonic() + timeout
    remaining = processes
    while remaining and time.monotonic() < deadline:
        _reap_children()
        remaining = [(pid, start) for pid, start in remaining if is_same_process(pid, start) and not _is_zombie(pid)]
        if remaining:
            time.sleep(0.05)
    return remaining


def _is_zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2] == "Z"


def _reap_children() -> None:
    """Collect exited children of this process so they do not linger as zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_processes(processes: list[tuple[int, int | None]], grace: float = TERM_GRACE) -> int:
    """SIGTERM each (pid, start time) still alive, SIGKILL what remains after `grace`; return how many were signalled."""
    alive = [(pid, start) for pid, start in processes if is_same_process(pid, start)]
    for pid, start in alive:
        _signal(pid, start, signal.SIGTERM, group=True)
    stubborn = _wait_gone(alive, grace)
    for pid, start in stubborn:
        log.warning("process %d did not exit after SIGTERM; sending SIGKILL", pid)
        _signal(pid, start, signal.SIGKILL, group=True)
    _wait_gone(stubborn, grace)
    return len(alive)


def processes_in_namespaces(identities: list[list[int]]) -> list[tuple[int, int | None]]:
    """Return (pid, start time) of every process living in one of the given namespaces."""
    found = []
    for identity in identities:
        for pid in netns.pids_in_namespace(identity):
            if pid != os.getpid():
                found.append((pid, process_start_time(pid)))
    return found


@dataclass
class CleanupReport:
    processes: int = 0
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # veth pairs gone with their namespaces, as `<namespace>/<name>`
    etc_dirs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        links = f" (with {len(self.links)} veth pairs)" if self.links else ""
        return (
            f"ended {self.processes} processes, removed {len(self.namespaces)} namespaces{links}"
            f" and {len(self.etc_dirs)} /etc/netns directories"
            + (f"; left alone: {', '.join(self.skipped)}" if self.skipped else "")
        )


def remove_objects(state: StateFile) -> CleanupReport:
    """Remove every object `state` lists (processes, namespaces, /etc/netns directories), then the state file.

    Safe to call again after a partial run: objects already gone are skipped.
    """
    report = CleanupReport()

    # Processes first: a process inside a namespace keeps the namespace alive.
    recorded = [(o["pid"], o.get("start_time")) for o in state.objects if o["kind"] == "process"]
    report.processes += end_processes(recorded)
    namespaces = [o for o in state.objects if o["kind"] == "netns"]
    identities = []
    for entry in namespaces:
        current = netns.namespace_identity(entry["name"])
        if current is None:
            continue
        if entry.get("identity") is None or list(current) == list(entry["identity"]):
            identities.append(current)
    report.processes += end_processes(processes_in_namespaces(identities))

    for entry in namespaces:
        # NOTE: an entry without identity means the daemon died between recording the
        # name and mounting it. The name was checked free just before, so it is removed.
        if netns.remove_namespace(entry["name"], entry.get("identity")):
            report.namespaces.append(entry["name"])
        elif netns.namespace_identity(entry["name"]) is not None:
            report.skipped.append(entry["name"])

    removed = set(report.namespaces)
    for entry in state.objects:
        if entry["kind"] == "veth" and (entry["namespace"] in removed or entry["peer_namespace"] in removed):
            report.links.append(f"{entry['namespace']}/{entry['name']}")

    for entry in state.objects:
        if entry["kind"] == "etc_netns" and netns.remove_etc_dir(entry["path"]):
            report.etc_dirs.append(entry["path"])

    state.objects = [o for o in state.objects if o["kind"] == "netns" and o["name"] in report.skipped]
    state.daemon = None
    if state.objects:
        state.save()
    else:
        state.remove_file()
    return report


def clean_leftovers(instance: str, lock: InstanceLock | None = None) -> CleanupReport | None:
    """Remove what a dead daemon of `instance` left behind; None when there was nothing.

    Pass the `lock` the caller already holds; without one the lock is taken
    for the duration, and InstanceRunning is raised when a daemon holds it.
    """
    own_lock = lock is None
    if own_lock:
        lock = InstanceLock(instance)
        lock.acquire()
    try:
        # A socket file left by a killed daemon only misleads clients.
        (state_dir(instance) / "control.sock").unlink(missing_ok=True)
        state = StateFile.load(instance)
        if state is None:
            return None
        daemon = state.daemon or {}
        log.warning("instance %s: removing leftovers of a daemon that is gone (pid %s)", instance, daemon.get("pid"))
        return remove_objects(state)
    finally:
        if own_lock:
            lock.release()
