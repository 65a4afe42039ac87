"""Starting, stopping and crashing live instances (root only).

Each test uses its own instance names, so a failure in one leaves the others
unaffected; the fixtures stop every instance and check for leftovers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livekit import NETNS_DIR, REPO, STATE_ROOT, instance_etc_dirs, instance_namespaces, run_tapnet, tapnet_env

pytestmark = pytest.mark.root

SUBNET = "10.79.1.0/24"
STACK = f"""
services:
  web:
    command: python3 -m http.server 8080 --bind 0.0.0.0
    networks: [front]
  client:
    networks: [front]
networks:
  front:
    driver: bridge
    ipam:
      config:
        - subnet: {SUBNET}
"""

MALFORMED_STACKS = [
    pytest.param("services: [web\n", id="yaml-syntax"),
    pytest.param("services:\n  web:\n    networks: [nowhere]\n", id="unknown-network"),
    pytest.param("services:\n  web:\n    networks: [front]\nnetworks:\n  front:\n    driver: macvlan\n", id="unknown-driver"),
]


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def test_sigkill_then_stop_removes_only_that_instance(live_instances):
    killed = live_instances("lvk", STACK)
    bystander = live_instances("lvo", STACK)
    daemon = killed.daemon_pid()
    task = next(row["pid"] for row in killed.ps() if row["sandbox"] == "web.1")
    bystander_namespaces = instance_namespaces("lvo")

    os.kill(daemon, signal.SIGKILL)
    assert wait_until(lambda: not process_alive(daemon))
    assert instance_namespaces("lvk"), "a SIGKILLed daemon cannot clean up; its namespaces should still exist"

    result = run_tapnet("stop", "--instance", "lvk")

    assert result.returncode == 0, result.stderr
    assert "leftovers removed" in result.stdout
    assert instance_namespaces("lvk") == []
    assert instance_etc_dirs("lvk") == []
    assert not process_alive(task)
    assert instance_namespaces("lvo") == bystander_namespaces
    web = bystander.address("web.1", "front")
    assert bystander.exec("client.1", "ping", "-c", "3", "-i", "0.2", "-W", "2", web).returncode == 0


def test_sigterm_stops_and_cleans(live_instances):
    instance = live_instances("lvs", STACK)
    daemon = instance.daemon_pid()

    os.kill(daemon, signal.SIGTERM)

    assert wait_until(lambda: not process_alive(daemon))
    assert instance_namespaces("lvs") == []
    assert instance_etc_dirs("lvs") == []
    assert not (STATE_ROOT / "lvs" / "state.json").exists()


@pytest.mark.parametrize("text", MALFORMED_STACKS)
def test_malformed_stack_rejected_without_leftovers(tmp_path, text):
    stack = tmp_path / "bad.yml"
    stack.write_text(text)

    result = run_tapnet("start", str(stack), "--instance", "lvm", "--detach")

    assert result.returncode == 1
    assert "invalid stack" in result.stderr
    assert instance_namespaces("lvm") == []
    assert not (STATE_ROOT / "lvm" / "state.json").exists()


def test_missing_stack_file_rejected(tmp_path):
    result = run_tapnet("start", str(tmp_path / "absent.yml"), "--instance", "lvm")

    assert result.returncode == 1
    assert "not found" in result.stderr


def test_second_start_of_running_instance_fails(live_instances, tmp_path):
    instance = live_instances("lvd", STACK)

    result = run_tapnet("start", str(instance.stack_path), "--instance", "lvd", "--detach")

    assert result.returncode == 1
    assert "already running" in result.stderr
    web = instance.address("web.1", "front")
    assert instance.exec("client.1", "ping", "-c", "1", "-W", "2", web).returncode == 0


def test_taken_namespace_name_rolls_back(tmp_path):
    # The second sandbox's namespace name is taken by a namespace this test made.
    taken = "tn-lvn-client.1"
    subprocess.run(["ip", "netns", "add", taken], check=True)
    try:
        inode = os.stat(NETNS_DIR / taken).st_ino
        stack = tmp_path / "stack.yml"
        stack.write_text(STACK)

        result = run_tapnet("start", str(stack), "--instance", "lvn")

        assert result.returncode == 1
        assert taken in result.stderr
        assert instance_namespaces("lvn") == [taken]
        assert os.stat(NETNS_DIR / taken).st_ino == inode
        assert instance_etc_dirs("lvn") == []
    finally:
        subprocess.run(["ip", "netns", "delete", taken], check=False)
        run_tapnet("stop", "--instance", "lvn")
        shutil.rmtree(STATE_ROOT / "lvn", ignore_errors=True)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_start_without_root_fails_clearly(tmp_path):
    stack = tmp_path / "stack.yml"
    stack.write_text(STACK)
    stack.chmod(0o644)
    tmp_path.chmod(0o755)

    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "tapnet.cli", "start", str(stack), "--instance", "lvu"],
        cwd=REPO,
        env=tapnet_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1, result.stderr
    assert "needs root" in result.stderr
    assert instance_namespaces("lvu") == []


def test_foreground_start_stops_on_ctrl_c(tmp_path):
    stack = tmp_path / "stack.yml"
    stack.write_text(STACK)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tapnet.cli", "start", str(stack), "--instance", "lvf"],
        cwd=REPO,
        env=tapnet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = ""
        for line in daemon.stdout:
            banner += line
            if "running" in line:
                break
        assert "web.1" in banner
        assert instance_namespaces("lvf") == ["tn-lvf-client.1", "tn-lvf-host-node1", "tn-lvf-underlay", "tn-lvf-web.1"]

        daemon.send_signal(signal.SIGINT)

        assert daemon.wait(timeout=30) == 0
        assert instance_namespaces("lvf") == []
        assert instance_etc_dirs("lvf") == []
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        run_tapnet("stop", "--instance", "lvf")
        shutil.rmtree(STATE_ROOT / "lvf", ignore_errors=True)
