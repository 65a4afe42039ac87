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


def _keep_scapy_off_the_network() -> None:
    """Make scapy raise instead of sending anything from a test process.

    Without this, `bytes(Ether() / IP(dst=...))` asks the host's routing table
    for the next hop and may broadcast an ARP request on the machine's own
    interface to fill in the destination MAC. Tests only build bytes: every
    frame names its MACs, and scapy's senders and resolvers are disabled.
    """
    import scapy.layers.inet  # noqa: F401  (registers the resolvers cleared below)
    import scapy.layers.inet6
    import scapy.layers.l2
    import scapy.sendrecv
    from scapy.config import conf

    def refuse(*args, **kwargs):
        raise RuntimeError("scapy tried to use the network from a test; build frames with explicit MACs")

    conf.raise_no_dst_mac = True
    conf.neighbor.resolvers = {}
    scapy.layers.l2.getmacbyip = refuse
    scapy.layers.inet6.getmacbyip6 = refuse
    for name in ("send", "sendp", "sr", "sr1", "srp", "srp1", "sniff"):
        setattr(scapy.sendrecv, name, refuse)


_keep_scapy_off_the_network()


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
