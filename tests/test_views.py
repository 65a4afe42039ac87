"""Tables and control requests of `tapnet.views`, on a real Fabric: fdb, neigh, subscribe, poll, show."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from tapnet import bpf, views
from tapnet import watch as watch_module
from tapnet.batch import FrameBatch
from tapnet.capture import CaptureEntry
from tapnet.model import mac_for_ip
from tapnet.stack import load_stack
from tracekit import Traced

BROADCAST = "ff:ff:ff:ff:ff:ff"
TWO_NODES = """
x-tapnet:
  nodes: [node1, node2]
  peers:
    - {network: vote, ip: 10.0.7.200, vtep: 198.51.100.50}
services:
  a:
    deploy: {replicas: 2}
    networks: [vote]
networks:
  vote:
    driver: overlay
    ipam: {config: [{subnet: 10.0.7.0/24}]}
"""


@pytest.fixture
def overlay():
    return Traced(load_stack(TWO_NODES))


def _announce(wire, sandbox: str, network: str, now: float) -> None:
    frame = Ether(src=wire.mac(sandbox, network), dst=BROADCAST) / ARP(psrc=wire.ip(sandbox, network))
    wire.run([(wire.port(sandbox, network), frame)], now=now)


# ---- fdb --------------------------------------------------------------------------------


def test_fdb_lists_learned_and_remote_entries(overlay):
    _announce(overlay, "a.1", "vote", now=10.0)
    rows = views.fdb_rows(overlay.fabric, now=12.5)
    node1_vtep = str(overlay.cluster.node("node2").underlay_ip)
    vni = overlay.cluster.networks["vote"].vni

    learned = [r for r in rows if r["dst"] is None]
    assert learned == [
        {"mac": overlay.mac("a.1", "vote"), "port": "node1/a.1/eth0", "network": "vote", "node": "node1", "age": 2.5, "static": False, "dst": None, "vni": None}
    ]
    remote = {(r["node"], r["mac"]): r for r in rows if r["dst"] is not None}
    assert remote[("node1", overlay.mac("a.2", "vote"))]["dst"] == node1_vtep
    assert remote[("node1", overlay.mac("a.2", "vote"))]["port"] == "node1/vxlan"
    assert remote[("node1", overlay.mac("a.2", "vote"))]["vni"] == vni
    assert remote[("node2", overlay.mac("a.1", "vote"))]["port"] == "node2/vxlan"
    assert remote[("node1", "02:42:0a:00:07:c8")]["dst"] == "198.51.100.50"


def test_fdb_text_reads_like_bridge_fdb(overlay):
    _announce(overlay, "a.1", "vote", now=10.0)
    lines = views.format_fdb(views.fdb_rows(overlay.fabric, now=12.5)).splitlines()
    vni = overlay.cluster.networks["vote"].vni
    assert lines[0] == f"{overlay.mac('a.1', 'vote')} dev node1/a.1/eth0 master vote used 2"
    node2_ip = overlay.cluster.node("node2").underlay_ip
    assert f"{overlay.mac('a.2', 'vote')} dev node1/vxlan dst {node2_ip} vni {vni} master vote self permanent" in lines


def test_fdb_forgets_aged_entries(overlay):
    _announce(overlay, "a.1", "vote", now=10.0)
    assert [r for r in views.fdb_rows(overlay.fabric, now=400.0) if r["dst"] is None] == []


# ---- neigh ------------------------------------------------------------------------------


def test_neigh_lists_gateway_remote_endpoints_and_vips(overlay):
    rows = views.neigh_rows(overlay.fabric)
    node1_vote = {r["ip"]: r for r in rows if r["dev"] == "node1/vote"}
    vote = overlay.cluster.networks["vote"]

    assert node1_vote[str(vote.gateway)]["role"] == "gateway"
    assert node1_vote[str(vote.gateway)]["lladdr"] == mac_for_ip(vote.gateway).hex(":")
    remote = node1_vote[overlay.ip("a.2", "vote")]
    assert remote["role"] == "remote"
    assert remote["vtep"] == str(overlay.cluster.node("node2").underlay_ip)
    assert remote["lladdr"] == overlay.mac("a.2", "vote")
    assert node1_vote["10.0.7.200"]["vtep"] == "198.51.100.50"
    vip = overlay.cluster.services["a"].vips["vote"]
    assert node1_vote[str(vip)]["role"] == "vip"
    assert node1_vote[str(vip)]["service"] == "a"
    assert overlay.ip("a.1", "vote") not in node1_vote, "a local endpoint answers ARP itself"


def test_neigh_rows_are_what_the_datapath_answers(overlay):
    """Every row's address gets an ARP reply with that MAC on that node."""
    for row in views.neigh_rows(overlay.fabric):
        if row["node"] != "node1" or row["network"] != "vote":
            continue
        request = Ether(src=overlay.mac("a.1", "vote"), dst=BROADCAST) / ARP(op=1, hwsrc=overlay.mac("a.1", "vote"), psrc=overlay.ip("a.1", "vote"), pdst=row["ip"])
        result = overlay.run([(overlay.port("a.1", "vote"), request)], now=1.0)
        replies = [Ether(e.frame) for e in result.emits if Ether(e.frame).haslayer(ARP) and Ether(e.frame)[ARP].op == 2]
        assert [r[ARP].hwsrc for r in replies] == [row["lladdr"]], row


def test_neigh_text_reads_like_ip_neigh(overlay):
    text = views.format_neigh(views.neigh_rows(overlay.fabric))
    vote = overlay.cluster.networks["vote"]
    assert f"{vote.gateway} dev node1/vote lladdr {mac_for_ip(vote.gateway).hex(':')} router PERMANENT  gateway" in text.splitlines()


# ---- control requests ---------------------------------------------------------------------


def _instance(wire):
    loop = SimpleNamespace(watch=None)
    return SimpleNamespace(name="tvw", fabric=wire.fabric, cluster=wire.cluster, loop=loop, stack_label="test", wire=wire)


def _request(instance, op: str, **arguments):
    return views.handle_request(instance, op, {"op": op, **arguments})


def _feed(instance, frames, now: float = 0.0):
    """Run one batch the way TapLoop.forward_from does, with whatever watch the requests installed."""
    wire = instance.wire
    batch = FrameBatch(capacity_frames=16)
    for port, frame in frames:
        batch.append(port, bytes(frame), timestamp=now)
    watch = instance.loop.watch
    trace = watch is not None and watch.before(batch)
    result = wire.fabric.process(batch, now, wire.rng, trace=trace)
    if watch is not None:
        watch.after(batch, result, now)


@pytest.fixture
def instance(monkeypatch):
    # The daemon's clock is trio's; here every request and batch happens at time 0.
    monkeypatch.setattr(trio, "current_time", lambda: 0.0)
    views._watches.clear()
    yield _instance(Traced())
    views._watches.clear()


def test_subscribe_installs_watch_and_unsubscribe_removes_it(instance):
    flt = bpf.compile_filter("icmp")
    reply = _request(instance, "trace-subscribe", kind="trace", expression=flt.expression, program=flt.to_rows())
    assert instance.loop.watch is views._watches["tvw"]
    assert _request(instance, "trace-unsubscribe", id=reply["id"]) == {"removed": True}
    assert instance.loop.watch is None


def test_poll_returns_stories_seen_by_loop(instance):
    reply = _request(instance, "trace-subscribe", kind="trace", expression="", program=None)
    wire = instance.wire
    gateway_ip, gateway_mac = wire.gateway("front")
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=gateway_mac) / IP(src=wire.ip("proxy.1", "front"), dst=gateway_ip) / ICMP()
    _feed(instance, [(wire.port("proxy.1", "front"), frame)])

    polled = _request(instance, "trace-poll", id=reply["id"])
    [story] = polled["items"]
    assert story["verdict"] == "reply"
    assert polled["dropped"] == 0
    assert _request(instance, "trace-show", id=story["id"])["summary"] == story["summary"]
    dot = _request(instance, "diagram", trace=story["id"])["dot"]
    assert 'label="1 reply"' in dot


def test_capture_poll_returns_frames_as_base64(instance):
    reply = _request(instance, "trace-subscribe", kind="capture", expression="", program=None)
    wire = instance.wire
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP(psrc=wire.ip("proxy.1", "front"))
    _feed(instance, [(wire.port("proxy.1", "front"), frame)])

    polled = _request(instance, "trace-poll", id=reply["id"])
    entries = [CaptureEntry.from_wire(item) for item in polled["items"]]
    assert [e.port for e in entries] == ["node1/proxy.1/eth0", "node1/app.1/eth0"]
    assert all(e.frame == bytes(frame) for e in entries)


def test_no_subscriber_means_no_watch_in_loop(instance):
    reply = _request(instance, "trace-subscribe", kind="capture", expression="", program=None)
    _request(instance, "trace-unsubscribe", id=reply["id"])
    _feed(instance, [(instance.wire.port("proxy.1", "front"), Ether(src=instance.wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP())])
    assert instance.loop.watch is None
    assert views._watches["tvw"].batches_matched == 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"kind": "trace", "expression": "icmp", "program": None}, "came without its BPF program"),
        ({"kind": "trace", "expression": "x", "program": [[6, 0, 0, 1], [0xFF, 0, 0, 0]]}, "unknown opcode"),
        ({"kind": "watch", "expression": "", "program": None}, "invalid subscriber kind"),
    ],
)
def test_bad_subscription_is_rejected(instance, arguments, message):
    with pytest.raises(ValueError, match=message):
        _request(instance, "trace-subscribe", **arguments)
    assert instance.loop.watch is None


def test_unknown_trace_id_names_the_limit(instance):
    with pytest.raises(ValueError, match="no trace 42 in instance 'tvw'"):
        _request(instance, "trace-show", id=42)


def test_non_integer_id_is_rejected(instance):
    with pytest.raises(ValueError, match="'id' must be an integer"):
        _request(instance, "trace-poll", id="1")


def test_loop_without_trace_hook_is_reported(instance):
    del instance.loop.watch
    with pytest.raises(ValueError, match="no trace hook"):
        _request(instance, "trace-subscribe", kind="trace", expression="", program=None)


def test_idle_client_turns_tracing_off(instance):
    _request(instance, "trace-subscribe", kind="trace", expression="", program=None)
    wire = instance.wire
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP()
    _feed(instance, [(wire.port("proxy.1", "front"), frame)], now=watch_module.IDLE_TIMEOUT + 1.0)
    assert instance.loop.watch is None


def test_capture_of_missing_instance_leaves_no_file(tmp_path, capsys):
    from tapnet import cli

    path = tmp_path / "never.pcapng"
    status = cli.main(["capture", "--instance", "tn-no-such-instance", "-w", str(path)])
    assert status == 1
    assert not path.exists()
    assert "is not running" in capsys.readouterr().err
