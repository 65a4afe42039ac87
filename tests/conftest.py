"""Shared fixtures: live tapnet instances for tests marked `root`.

Tests marked `root` need root, /dev/net/tun and `ip`; without them they are
skipped. A live instance is started as a subprocess with `--detach` and is
always stopped in the fixture's teardown, also when the test fails. The
teardown then checks that no namespace or /etc/netns directory of the
instance remains and removes any it finds (so a failing cleanup is reported
and still leaves the machine clean).
"""

from __future__ import annotations

import pytest

from livekit import live_support_missing, managed_instances


def pytest_collection_modifyitems(config, items):
    reason = live_support_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def live_instances(tmp_path):
    """Start instances for one test; each is stopped and checked in teardown."""
    with managed_instances(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def module_instances(tmp_path_factory):
    """Start instances shared by the tests of one module; stopped and checked after the last of them."""
    with managed_instances(tmp_path_factory.mktemp("stacks")) as start:
        yield start
