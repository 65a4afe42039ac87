"""Trace stories through a real Fabric and Watch: fields of each record, filters, stories across nodes, bounds."""

from __future__ import annotations

import struct

import dns.message
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from dpkit import SMALL_STACK
from tapnet import reasons, watch as watch_module
from tapnet.model import mac_for_ip
from tapnet.stack import load_stack
from tapnet.watch import format_story
from tracekit import WALL_OFFSET, Traced, events

BROADCAST = "ff:ff:ff:ff:ff:ff"
# Every test frame names both MACs: scapy would otherwise resolve a missing
# destination MAC through the host's routing table and ARP on its interface.
NODE1_MAC, NODE2_MAC = "02:42:c6:33:64:02", "02:42:c6:33:64:03"

# Two nodes with one overlay; subnets apart from the root namespace's addresses.
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

# A service without tasks, so its VIP has no backend.
EMPTY_SERVICE = SMALL_STACK.replace("services:\n", "services:\n  empty:\n    deploy: {replicas: 0}\n    networks: [front]\n", 1)


@pytest.fixture
def wire():
    return Traced()


@pytest.fixture
def overlay():
    wire = Traced(load_stack(TWO_NODES))
    first, second = (wire.cluster.sandboxes[s].node for s in ("a.1", "a.2"))
    assert first != second, "a.1 and a.2 must sit on different nodes"
    return wire


def _from(wire, sandbox: str, network: str, dst: str) -> Ether:
    return Ether(src=wire.mac(sandbox, network), dst=dst)


def _to_gateway(wire, sandbox="proxy.1", network="front") -> tuple[int, Ether]:
    gateway_ip, gateway_mac = wire.gateway(network)
    return wire.port(sandbox, network), _from(wire, sandbox, network, gateway_mac) / IP(src=wire.ip(sandbox, network), dst=gateway_ip)


# ---- records, field by field ----------------------------------------------------


def test_arp_for_gateway_story(wire):
    subscriber = wire.subscribe()
    gateway_ip, gateway_mac = wire.gateway("front")
    port = wire.port("proxy.1", "front")
    request = _from(wire, "proxy.1", "front", BROADCAST) / ARP(op=1, hwsrc=wire.mac("proxy.1", "front"), psrc=wire.ip("proxy.1", "front"), pdst=gateway_ip)
    wire.run([(port, request)], now=5.0)

    story = wire.only_story(subscriber, now=5.0)
    assert story["ingress"] == "node1/proxy.1/eth0"
    assert story["node"] == "node1"
    assert story["summary"] == f"ARP, Request who-has {gateway_ip} tell {wire.ip('proxy.1', 'front')}"
    assert story["time"] == WALL_OFFSET + 5.0
    assert events(story) == [("switch", "learn"), ("gateway", "arp-reply"), ("switch", "flood")]
    assert story["hops"][0]["events"][1]["detail"] == f"{gateway_ip} is-at {gateway_mac}"
    assert story["verdict"] == "reply"
    assert story["reason"] is None
    assert story["egress"][0] == "node1/proxy.1/eth0"
    assert story["unfinished"] is None


def test_icmp_echo_to_gateway_story(wire):
    subscriber = wire.subscribe()
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / ICMP(id=7, seq=3))], now=1.0)

    story = wire.only_story(subscriber, now=1.0)
    gateway_ip = wire.gateway("front")[0]
    assert story["summary"] == f"IP {wire.ip('proxy.1', 'front')} > {gateway_ip}: ICMP echo request, id 7, seq 3"
    assert events(story) == [("switch", "learn"), ("gateway", "echo-reply")]
    assert story["verdict"] == "reply"
    assert story["egress"] == ["node1/proxy.1/eth0"]
    assert story["path"] == ["node1/proxy.1/eth0", "node1/proxy.1/eth0"]


def test_dns_lookup_story(wire):
    subscriber = wire.subscribe("udp port 53")
    port, frame = _to_gateway(wire)
    query = dns.message.make_query("app", "A").to_wire()
    wire.run([(port, frame / UDP(sport=40000, dport=53) / Raw(query))], now=1.0)

    story = wire.only_story(subscriber, now=1.0)
    assert events(story) == [("switch", "learn"), ("dns", "answer")]
    vip = wire.cluster.services["app"].vips["front"]
    assert story["hops"][0]["events"][1]["detail"] == f"app. A: {vip} (vip app on front)"
    assert story["verdict"] == "reply"
    assert story["egress"] == ["node1/proxy.1/eth0"]


def test_unicast_between_sandboxes_names_fdb_hit(wire):
    subscriber = wire.subscribe("udp")
    app, proxy = wire.port("app.1", "front"), wire.port("proxy.1", "front")
    hello = _from(wire, "app.1", "front", BROADCAST) / ARP(psrc=wire.ip("app.1", "front"))
    unicast = _from(wire, "proxy.1", "front", wire.mac("app.1", "front")) / IP(src=wire.ip("proxy.1", "front"), dst=wire.ip("app.1", "front")) / UDP(dport=9)
    wire.run([(app, hello), (proxy, unicast)], now=1.0)

    story = wire.only_story(subscriber, now=1.0)
    assert events(story) == [("switch", "learn"), ("switch", "fdb-hit")]
    assert story["verdict"] == "deliver"
    assert story["egress"] == ["node1/app.1/eth0"]


# ---- each drop reason -------------------------------------------------------------


def _gateway_udp(wire, payload: bytes, chksum=None):
    port, frame = _to_gateway(wire)
    udp = UDP(sport=40000, dport=53) if chksum is None else UDP(sport=40000, dport=53, chksum=chksum)
    return port, frame / udp / Raw(payload)


def _vip_frame(wire, service: str, layer):
    vip = wire.cluster.services[service].vips["front"]
    mac = mac_for_ip(vip).hex(":")
    return wire.port("proxy.1", "front"), _from(wire, "proxy.1", "front", mac) / IP(src=wire.ip("proxy.1", "front"), dst=str(vip)) / layer


def _on_vxlan_port(wire, frame):
    return wire.fabric.port_id("node1/vxlan"), frame


def _datagram(wire, inner, src="198.51.100.3", vni=None, flags=0x08):
    vni = wire.cluster.networks["vote"].vni if vni is None else vni
    return (
        Ether(src=NODE2_MAC, dst=NODE1_MAC)
        / IP(src=src, dst="198.51.100.2")
        / UDP(sport=40000, dport=4789, chksum=0)
        / VXLAN(flags=flags, vni=vni)
        / inner
    )


def _overlay_inner(wire, dst: str):
    return Ether(src=wire.mac("a.2", "vote"), dst=dst) / IP(src=wire.ip("a.2", "vote"), dst=wire.ip("a.1", "vote")) / UDP()


QUERY = dns.message.make_query("app", "A")

# (reason, stack, build(wire) -> (port, frame[, vnet]), stage of the deciding event)
DROP_CASES = [
    ("malformed-ethernet", None, lambda w: (w.port("proxy.1", "front"), b"\x02\x42" * 4), "parse"),
    ("malformed-vlan", None, lambda w: (w.port("proxy.1", "front"), bytes(_from(w, "proxy.1", "front", BROADCAST)) [:12] + b"\x81\x00\x00"), "parse"),
    ("malformed-arp", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", BROADCAST) / ARP(hwtype=6)), "parse"),
    ("malformed-ipv4", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", BROADCAST) / IP(len=400) / UDP()), "parse"),
    ("malformed-ipv6", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", BROADCAST) / IPv6(plen=500) / UDP()), "parse"),
    ("malformed-icmp", None, lambda w: (w.port("proxy.1", "front"), _icmp_stub(w)), "parse"),
    ("malformed-udp", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", BROADCAST) / IP() / UDP(len=200) / (b"x" * 20)), "parse"),
    ("malformed-tcp", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", BROADCAST) / IP() / TCP(dataofs=2)), "parse"),
    ("malformed-vxlan", TWO_NODES, lambda w: _on_vxlan_port(w, Ether(src=NODE2_MAC, dst=NODE1_MAC) / IP(src="198.51.100.3", dst="198.51.100.2") / UDP(dport=4789) / Raw(b"\x08\x00\x00")), "parse"),
    (
        "malformed-vnet-hdr",
        None,
        lambda w: (*_gateway_udp(w, b"x" * 40, chksum=0), struct.pack("<BBHHHH", 1, 0, 0, 0, 500, 6)),
        "parse",
    ),
    ("unknown-port", None, lambda w: (999, Ether(src=NODE2_MAC, dst=NODE1_MAC) / IP(src="198.51.100.3", dst="198.51.100.2")), "datapath"),
    ("invalid-src-mac", None, lambda w: (w.port("proxy.1", "front"), Ether(src="01:00:5e:00:00:01", dst=BROADCAST) / ARP()), "switch"),
    ("isolation", None, lambda w: _routed_ping(w, "172.21.0.5"), "gateway"),
    ("no-egress", None, lambda w: _routed_ping(w, "100.64.0.1"), "gateway"),
    ("internal", None, lambda w: _routed_ping(w, "172.20.0.9", sandbox="vault.1", network="secret"), "gateway"),
    ("gateway-no-service", None, lambda w: _routed_ping(w, w.gateway("front")[0], TCP(dport=80, flags="S")), "gateway"),
    ("ip-fragment", None, lambda w: _routed_ping(w, w.gateway("front")[0], flags="MF"), "gateway"),
    ("unsupported-ethertype", None, lambda w: (w.port("proxy.1", "front"), _from(w, "proxy.1", "front", w.gateway("front")[1]) / IPv6() / UDP()), "gateway"),
    ("not-vxlan", TWO_NODES, lambda w: _on_vxlan_port(w, Ether(src=NODE2_MAC, dst=NODE1_MAC) / IP(src="198.51.100.3", dst="198.51.100.2") / UDP(dport=53)), "vxlan"),
    ("vxlan-unknown-vtep", TWO_NODES, lambda w: _on_vxlan_port(w, _datagram(w, _overlay_inner(w, w.mac("a.1", "vote")), src="198.51.100.99")), "vxlan"),
    ("vxlan-i-flag-clear", TWO_NODES, lambda w: _on_vxlan_port(w, _datagram(w, _overlay_inner(w, w.mac("a.1", "vote")), flags=0)), "vxlan"),
    ("vxlan-unknown-vni", TWO_NODES, lambda w: _on_vxlan_port(w, _datagram(w, _overlay_inner(w, w.mac("a.1", "vote")), vni=9999)), "vxlan"),
    ("vxlan-unknown-mac", TWO_NODES, lambda w: _on_vxlan_port(w, _datagram(w, _overlay_inner(w, "02:42:0a:00:07:63"))), "vxlan"),
    ("vxlan-broadcast", TWO_NODES, lambda w: _on_vxlan_port(w, _datagram(w, Ether(src=w.mac("a.2", "vote"), dst=BROADCAST) / ARP())), "vxlan"),
    ("dns-malformed", None, lambda w: _gateway_udp(w, b"abc"), "dns"),
    ("dns-not-query", None, lambda w: _gateway_udp(w, dns.message.make_response(QUERY).to_wire()), "dns"),
    ("dns-bad-checksum", None, lambda w: _gateway_udp(w, QUERY.to_wire(), chksum=0x1234), "dns"),
    (
        "dns-upstream-unexpected",
        None,
        lambda w: (w.fabric.port_id("node1/upstream"), Ether(src="02:42:c6:33:64:3c", dst=NODE1_MAC) / IP(src="198.51.100.60", dst="198.51.100.2") / UDP(sport=53, dport=40000) / Raw(QUERY.to_wire())),
        "dns",
    ),
    ("vip-no-service", None, lambda w: _vip_proto(w, 47), "lb"),
    ("vip-no-connection", None, lambda w: _vip_frame(w, "app", TCP(flags="A")), "lb"),
    ("no-backend", EMPTY_SERVICE, lambda w: _vip_frame(w, "empty", TCP(flags="S")), "lb"),
]


def _icmp_stub(wire):
    """ICMP whose header is cut after 2 bytes, inside a consistent IPv4 packet."""
    gateway_ip, gateway_mac = wire.gateway("front")
    return _from(wire, "proxy.1", "front", gateway_mac) / IP(src=wire.ip("proxy.1", "front"), dst=gateway_ip, proto=1) / Raw(b"\x08\x00")


def _routed_ping(wire, dst: str, layer=None, sandbox="proxy.1", network="front", flags=0):
    """A packet from `sandbox` to the gateway's MAC for `dst`, carrying `layer` (default an ICMP echo request)."""
    gateway_mac = wire.gateway(network)[1]
    packet = _from(wire, sandbox, network, gateway_mac) / IP(src=wire.ip(sandbox, network), dst=dst, flags=flags) / (layer or ICMP())
    return wire.port(sandbox, network), packet


def _vip_proto(wire, proto: int):
    vip = wire.cluster.services["app"].vips["front"]
    frame = _from(wire, "proxy.1", "front", mac_for_ip(vip).hex(":")) / IP(src=wire.ip("proxy.1", "front"), dst=str(vip), proto=proto) / Raw(b"x" * 8)
    return wire.port("proxy.1", "front"), frame


# Drop reasons this table does not produce, and why.
NOT_IN_TABLE = {
    "same-port": "needs two frames; test_same_port_story covers it",
    "ttl-exceeded": "no stage drops with it: the gateway routes nothing",
    "no-port": "no stage drops with it: flooding to no port is verdict flood",
    "offload-failed": "the parser rejects every virtio-net header that segmentation would reject (malformed-vnet-hdr)",
    "dns-unknown-sandbox": "needs a port whose sandbox left the model while the port stays",
    "dns-busy": "needs the forwarding or TCP table filled; tests/test_dns.py fills it",
    "dns-tcp-unexpected": "needs a DNS TCP exchange; tests/test_dns.py covers it",
    "backend-gone": "needs a connection whose task is then removed; tests/test_lb.py covers it",
    "conntrack-full": "needs a full conntrack table; tests/test_lb.py covers it",
    "ingress-port-closed": "needs the ingress routing mesh; tests/test_lb.py covers it",
    "nat-failed": "needs a tuple that is already tracked; tests/test_lb.py covers it",
    "tap-tx-full": "counted by the runtime after the datapath, never in a record",
    "tap-tx-error": "counted by the runtime after the datapath, never in a record",
    "tap-rx-short": "counted by the runtime before the datapath, never in a record",
    "no-tap": "counted by the runtime after the datapath, never in a record",
    "datapath-error": "counted by the runtime when the datapath raises, never in a record",
    "udp-tx-full": "counted by the runtime's sockets, never in a record",
    "udp-tx-error": "counted by the runtime's sockets, never in a record",
}


@pytest.mark.parametrize("reason, stack, build, stage", DROP_CASES, ids=[c[0] for c in DROP_CASES])
def test_drop_story_names_reason(reason, stack, build, stage):
    wire = Traced(load_stack(stack)) if stack else Traced()
    subscriber = wire.subscribe()
    wire.run([build(wire)], now=2.0)

    story = wire.only_story(subscriber, now=2.0)
    last = story["hops"][0]["events"][-1]
    assert story["verdict"] == "drop"
    assert story["reason"] == reason
    assert story["egress"] == []
    assert last["stage"] == stage
    assert last["decision"] == "drop"
    assert last["detail"]
    assert f"verdict: drop reason={reason}" in format_story(story)


def test_same_port_story(wire):
    subscriber = wire.subscribe("udp")
    port = wire.port("proxy.1", "front")
    hello = _from(wire, "proxy.1", "front", BROADCAST) / ARP()
    back = Ether(src="02:42:ac:14:00:77", dst=wire.mac("proxy.1", "front")) / IP() / UDP()
    wire.run([(port, hello), (port, back)], now=1.0)

    story = wire.only_story(subscriber, now=1.0)
    assert story["reason"] == "same-port"
    assert events(story)[-1] == ("switch", "drop")


def test_drop_table_covers_every_reason():
    covered = {case[0] for case in DROP_CASES} | set(NOT_IN_TABLE)
    drops = {r.code for r in reasons.all_reasons() if r.code not in reasons.NOT_DROPS}
    assert drops - covered == set(), "add a trace case (or a reason in NOT_IN_TABLE) for these drop reasons"


# ---- filters ---------------------------------------------------------------------


def test_filter_matching_nothing_leaves_batch_untraced(wire):
    subscriber = wire.subscribe("tcp port 6379")
    port, frame = _to_gateway(wire)
    result = wire.run([(port, frame / ICMP())], now=1.0)
    assert wire.traced == [False]
    assert result.records == []
    assert wire.stories(subscriber, now=1.0) == []


def test_filter_keeps_only_matching_frames(wire):
    subscriber = wire.subscribe("icmp")
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / UDP(dport=9)), (port, frame / ICMP(seq=1)), (port, frame / TCP())], now=1.0)
    stories = wire.stories(subscriber, now=1.0)
    assert [s["summary"].split(": ")[1] for s in stories] == ["ICMP echo request, id 0, seq 1"]


def test_subscribers_get_their_own_matches(wire):
    icmp = wire.subscribe("icmp")
    arp = wire.subscribe("arp")
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / ICMP()), (port, _from(wire, "proxy.1", "front", BROADCAST) / ARP())], now=1.0)
    assert [s["summary"][:3] for s in wire.stories(icmp, now=1.0)] == ["IP "]
    assert [s["summary"][:3] for s in wire.stories(arp, now=1.0)] == ["ARP"]


# ---- stories across nodes ---------------------------------------------------------


def _a1_to_a2(wire, flags="S"):
    return wire.port("a.1", "vote"), _from(wire, "a.1", "vote", wire.mac("a.2", "vote")) / IP(src=wire.ip("a.1", "vote"), dst=wire.ip("a.2", "vote")) / TCP(sport=43000, dport=6379, flags=flags)


def test_vxlan_story_spans_both_nodes(overlay):
    subscriber = overlay.subscribe("host " + overlay.ip("a.2", "vote") + " and tcp port 6379")
    first = overlay.run([_a1_to_a2(overlay)], now=1.0)
    assert overlay.stories(subscriber, now=1.0) == [], "the story waits for its re-entry on node2"
    overlay.carry(first, now=1.01)

    story = overlay.only_story(subscriber, now=1.02)
    vni = overlay.cluster.networks["vote"].vni
    node1_ip, node2_ip = (str(overlay.cluster.node(n).underlay_ip) for n in ("node1", "node2"))
    assert len(story["hops"]) == 2
    assert story["ingress"] == "node1/a.1/eth0"
    assert events(story, 0) == [("switch", "learn"), ("vxlan", "encap")]
    assert story["hops"][0]["events"][1]["detail"] == f"vni {vni} to vtep {node2_ip}"
    assert story["hops"][0]["egress"] == ["node1/vxlan"]
    assert story["hops"][1]["ingress"] == "node2/vxlan"
    assert story["hops"][1]["node"] == "node2"
    assert events(story, 1) == [("vxlan", "decap"), ("switch", "deliver")]
    assert story["hops"][1]["events"][0]["detail"] == f"vni {vni} from vtep {node1_ip} to network vote"
    assert story["verdict"] == "deliver"
    assert story["egress"] == ["node2/a.2/eth0"]
    assert story["path"] == ["node1/a.1/eth0", "node1/vxlan", "node2/vxlan", "node2/a.2/eth0"]
    assert story["unfinished"] is None


def test_vxlan_story_shown_as_one_block(overlay):
    subscriber = overlay.subscribe()
    overlay.carry(overlay.run([_a1_to_a2(overlay)], now=1.0), now=1.01)
    text = format_story(overlay.only_story(subscriber, now=1.02))
    lines = text.splitlines()
    assert lines[0].startswith("trace 1 ")
    assert lines[0].endswith("node1/a.1/eth0: IP 10.0.7.3.43000 > 10.0.7.4.6379: Flags [S], length 0")
    assert any(line.startswith("  -> node2/vxlan (record 2): IP 198.51.100.2.") for line in lines)
    assert lines[-1].strip() == "verdict: deliver to node2/a.2/eth0"


def test_same_payload_twice_correlates_in_order(overlay):
    subscriber = overlay.subscribe()
    first = overlay.run([_a1_to_a2(overlay)], now=1.0)
    second = overlay.run([_a1_to_a2(overlay)], now=1.1)
    overlay.carry(first, now=1.2)
    overlay.carry(second, now=1.3)
    stories = overlay.stories(subscriber, now=1.4)
    assert [[hop["id"] for hop in s["hops"]] for s in stories] == [[1, 3], [2, 4]]


def test_lost_tunnel_frame_leaves_story_unfinished(overlay):
    subscriber = overlay.subscribe()
    overlay.run([_a1_to_a2(overlay)], now=1.0)
    assert overlay.stories(subscriber, now=1.5) == []
    [story] = overlay.stories(subscriber, now=1.0 + watch_module.TUNNEL_WINDOW + 0.1)
    assert len(story["hops"]) == 1
    assert story["unfinished"] == f"1 encapsulated frame(s) not seen re-entering within {watch_module.TUNNEL_WINDOW:g} s"


def test_external_peer_story_completes_at_once(overlay):
    subscriber = overlay.subscribe()
    frame = _from(overlay, "a.1", "vote", "02:42:0a:00:07:c8") / IP(src=overlay.ip("a.1", "vote"), dst="10.0.7.200") / ICMP()
    overlay.run([(overlay.port("a.1", "vote"), frame)], now=1.0)
    story = overlay.only_story(subscriber, now=1.0)
    assert story["egress"] == ["node1/vxlan"]
    assert story["unfinished"] is None


def test_reentry_from_unknown_sender_starts_own_story(overlay):
    subscriber = overlay.subscribe()
    datagram = _datagram(overlay, _overlay_inner(overlay, overlay.mac("a.1", "vote")))
    overlay.run([_on_vxlan_port(overlay, datagram)], now=1.0)
    story = overlay.only_story(subscriber, now=1.0)
    assert story["ingress"] == "node1/vxlan"
    assert story["verdict"] == "deliver"


# ---- bounds --------------------------------------------------------------------------


def test_full_queue_counts_dropped_stories(wire, monkeypatch):
    monkeypatch.setattr(watch_module, "TRACE_QUEUE_STORIES", 3)
    subscriber = wire.subscribe()
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / ICMP(seq=n)) for n in range(5)], now=1.0)
    polled = wire.watch.poll(subscriber.id, now=1.0)
    assert len(polled["items"]) == 3
    assert polled["dropped"] == 2
    assert wire.watch.poll(subscriber.id, now=1.0)["dropped"] == 0


def test_ring_keeps_most_recent_stories():
    wire = Traced()
    wire.watch.ring_size = 2
    wire.subscribe()
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / ICMP(seq=n)) for n in range(4)], now=1.0)
    assert wire.watch.show(1) is None
    assert wire.watch.show(4)["hops"][0]["summary"].endswith("seq 3")
    assert sorted(wire.watch.ring) == [3, 4]


def test_idle_subscriber_is_removed(wire):
    subscriber = wire.subscribe(now=0.0)
    port, frame = _to_gateway(wire)
    wire.run([(port, frame / ICMP())], now=watch_module.IDLE_TIMEOUT + 1.0)
    assert not wire.watch.active
    with pytest.raises(ValueError, match="no trace or capture subscriber"):
        wire.watch.poll(subscriber.id, now=watch_module.IDLE_TIMEOUT + 1.0)


def test_polling_keeps_subscriber_alive(wire):
    subscriber = wire.subscribe(now=0.0)
    for second in range(1, 3 * int(watch_module.IDLE_TIMEOUT)):
        wire.watch.poll(subscriber.id, now=float(second))
    assert wire.watch.active


def test_open_stories_are_bounded(overlay, monkeypatch):
    monkeypatch.setattr(watch_module, "MAX_OPEN_STORIES", 2)
    subscriber = overlay.subscribe()
    for n in range(3):
        overlay.run([_a1_to_a2(overlay)], now=1.0 + n / 100)
    [cut] = overlay.stories(subscriber, now=1.03)
    assert cut["id"] == 1
    assert cut["unfinished"].startswith("completed early")
    assert len(overlay.watch.open) == 2


def test_last_unsubscribe_completes_open_stories(overlay):
    subscriber = overlay.subscribe()
    overlay.run([_a1_to_a2(overlay)], now=1.0)
    overlay.watch.unsubscribe(subscriber.id)
    assert overlay.watch.open == {}
    assert overlay.watch.show(1)["unfinished"] is not None


def test_broken_filter_state_never_raises_into_the_runtime(wire):
    wire.subscribe("icmp")
    wire.watch._filters = "not a filter set"  # any fault inside the watch
    wire.watch._ports_seen = len(wire.fabric.ports)
    port, frame = _to_gateway(wire)
    result = wire.run([(port, frame / ICMP())], now=1.0)
    assert wire.traced == [False]
    assert wire.watch.errors == 1
    assert len(result.emits) == 1
