"""Helpers for live tests: run the tapnet CLI, start and stop instances, find leftovers.

Used by tests/conftest.py and the modules in tests/live/ (tests marked `root`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETNS_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
STATE_ROOT = Path("/run/tapnet")
START_TIMEOUT = 200  # seconds; the first start compiles the numba parser


def live_support_missing() -> str | None:
    """Return why live tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (namespaces and TAP devices)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


def tapnet_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_tapnet(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m tapnet.cli ARGS` and return the completed process (text output)."""
    completed = subprocess.run(
        [sys.executable, "-m", "tapnet.cli", *args],
        cwd=REPO,
        env=tapnet_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"tapnet {' '.join(args)} exited {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    return completed


def namespace_prefix(instance: str) -> str:
    return f"tn-{instance}-"


def instance_namespaces(instance: str) -> list[str]:
    """Mounted namespaces whose name belongs to `instance`."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(namespace_prefix(instance)))


def instance_etc_dirs(instance: str) -> list[str]:
    if not ETC_NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(ETC_NETNS_DIR) if n.startswith(namespace_prefix(instance)))


def root_link_names() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def force_remove(instance: str) -> list[str]:
    """Last-resort cleanup after a failed `tapnet stop`: end the recorded daemon, delete the instance's namespaces."""
    removed = []
    state_file = STATE_ROOT / instance / "state.json"
    if state_file.exists():
        daemon = (json.loads(state_file.read_text()).get("daemon") or {})
        pid = daemon.get("pid")
        if pid and Path(f"/proc/{pid}").exists():
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[19]) == daemon.get("start_time"):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"daemon {pid}")
    for name in instance_namespaces(instance):
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        removed.append(name)
    for name in instance_etc_dirs(instance):
        shutil.rmtree(ETC_NETNS_DIR / name, ignore_errors=True)
        removed.append(str(ETC_NETNS_DIR / name))
    return removed


@dataclass
class LiveInstance:
    """A tapnet instance started by a test."""

    name: str
    stack_path: Path
    start_output: str = ""
    extra: dict = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return run_tapnet(*args, "--instance", self.name, timeout=timeout, check=check)

    def exec(self, sandbox: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command in `sandbox` through `tapnet exec`; the result keeps its exit status."""
        return run_tapnet("exec", "--instance", self.name, sandbox, "--", *command, timeout=timeout)

    def stats(self) -> dict:
        return json.loads(self.cli("stats", "--json").stdout)

    def ps(self) -> list[dict]:
        return json.loads(self.cli("ps", "--json").stdout)

    def address(self, sandbox: str, network: str) -> str:
        for row in self.ps():
            if row["sandbox"] == sandbox:
                return row["addresses"][network]
        raise KeyError(f"sandbox {sandbox} not found in instance {self.name}")

    def daemon_pid(self) -> int:
        return json.loads((STATE_ROOT / self.name / "state.json").read_text())["daemon"]["pid"]

    def daemon_log(self) -> str:
        path = STATE_ROOT / self.name / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else "(no daemon log)"

    def drops(self, reason: str) -> int:
        return sum(port["drops"].get(reason, 0) for port in self.stats().values())


def netns_run(namespace: str, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside a namespace the test or tapnet created (`ip netns exec`), with text output."""
    assert namespace.startswith("tn"), f"refusing to run in namespace {namespace!r}: not a tn namespace"
    completed = subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(command)} in {namespace} exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}")
    return completed


def end_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End a process the test started, by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def capture(namespace: str, interface: str, path: Path, bpf_filter: str, snaplen: int = 0, timeout: float = 10.0):
    """Run tcpdump on `interface` inside `namespace`, writing `path`, for the duration of the block.

    Waits until tcpdump reports that it listens, so traffic sent inside the
    block is captured, and ends tcpdump by PID afterwards (also on failure).
    """
    # Immediate mode: without it tcpdump reads the kernel's capture ring once a
    # block fills or times out, so packets of the last second would be lost at exit.
    argv = ["ip", "netns", "exec", namespace, "tcpdump", "--immediate-mode", "-i", interface, "-U", "-n", "-w", str(path)]
    if snaplen:
        argv += ["-s", str(snaplen)]
    process = subprocess.Popen([*argv, bpf_filter], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stderr], [], [], timeout)
        line = process.stderr.readline() if ready else ""
        assert "listening on" in line, f"tcpdump in {namespace} did not start: {line!r}"
        yield process
        time.sleep(0.2)  # let tcpdump write the last packets
    finally:
        end_process(process)


def start_instance(name: str, stack_text: str, directory: Path) -> LiveInstance:
    stack_path = directory / f"{name}.yml"
    stack_path.write_text(stack_text)
    completed = run_tapnet("start", str(stack_path), "--instance", name, "--detach", timeout=START_TIMEOUT)
    instance = LiveInstance(name, stack_path, completed.stdout)
    if completed.returncode != 0:
        raise AssertionError(f"tapnet start {name} exited {completed.returncode}\n{completed.stderr}\n{instance.daemon_log()[-3000:]}")
    return instance


def stop_and_check(name: str) -> list[str]:
    """Stop instance `name` and return the problems found (empty when everything is gone)."""
    problems = []
    completed = run_tapnet("stop", "--instance", name, timeout=60)
    if completed.returncode != 0:
        problems.append(f"tapnet stop exited {completed.returncode}: {completed.stderr.strip()}")
    leftovers = instance_namespaces(name) + instance_etc_dirs(name)
    if leftovers:
        problems.append(f"left behind: {leftovers}; force-removed {force_remove(name)}")
    elif completed.returncode == 0:
        # `tapnet stop` keeps the state directory for its logs; the test made it, so the test removes it.
        shutil.rmtree(Path("/run/tapnet") / name, ignore_errors=True)
    return problems


@contextlib.contextmanager
def managed_instances(directory: Path):
    """Yield `start(name, stack_text) -> LiveInstance`; on exit stop every instance started and check what remains."""
    started: list[str] = []
    links_before = root_link_names()

    def start(name: str, stack_text: str) -> LiveInstance:
        assert not instance_namespaces(name), f"namespaces of instance {name} exist before the test: {instance_namespaces(name)}"
        started.append(name)
        return start_instance(name, stack_text, directory)

    try:
        yield start
    finally:
        problems = []
        for name in started:
            problems += stop_and_check(name)
        # Other projects' links use the tn prefix by rule; anything else new is a leak of ours.
        new_links = {name for name in root_link_names() - links_before if not name.startswith("tn")}
        if new_links:
            problems.append(f"links appeared in the root namespace: {sorted(new_links)}")
    assert not problems, "; ".join(problems)
