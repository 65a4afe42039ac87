"""The node datapath with frames built by scapy: bridge, gateway, isolation, drops."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from dpkit import Wire
from tapnet.batch import FrameBatch
from tapnet import reasons

BROADCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture
def wire():
    return Wire()


def test_gateway_answers_arp(wire):
    gw_ip, gw_mac = wire.gateway("front")
    request = Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP(
        op=1, hwsrc=wire.mac("proxy.1", "front"), psrc=wire.ip("proxy.1", "front"), pdst=gw_ip
    )
    result = wire.send([(wire.port("proxy.1", "front"), request)])
    replies = [(p, f) for p, f in wire.out(result) if f.haslayer(ARP) and f[ARP].op == 2]
    assert len(replies) == 1
    port, reply = replies[0]
    assert port == wire.port("proxy.1", "front")
    assert reply[ARP].hwsrc == gw_mac
    assert reply[ARP].psrc == gw_ip
    assert reply[ARP].pdst == wire.ip("proxy.1", "front")
    assert reply.dst == wire.mac("proxy.1", "front")


def test_arp_broadcast_floods_only_its_network(wire):
    request = Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP(
        op=1, hwsrc=wire.mac("proxy.1", "front"), psrc=wire.ip("proxy.1", "front"), pdst=wire.ip("app.1", "front")
    )
    result = wire.send([(wire.port("proxy.1", "front"), request)])
    ports = [p for p, _ in wire.out(result)]
    assert ports == [wire.port("app.1", "front")]


def test_gateway_answers_ping_with_valid_checksums(wire):
    gw_ip, gw_mac = wire.gateway("front")
    request = (
        Ether(src=wire.mac("proxy.1", "front"), dst=gw_mac)
        / IP(src=wire.ip("proxy.1", "front"), dst=gw_ip)
        / ICMP(type=8, id=7, seq=3)
        / b"tapnet-ping"
    )
    result = wire.send([(wire.port("proxy.1", "front"), request)])
    [(port, reply)] = wire.out(result)
    assert port == wire.port("proxy.1", "front")
    assert reply[ICMP].type == 0
    assert (reply[ICMP].id, reply[ICMP].seq) == (7, 3)
    assert bytes(reply[ICMP].payload) == b"tapnet-ping"
    assert reply[IP].src == gw_ip
    assert reply[IP].dst == wire.ip("proxy.1", "front")
    rebuilt = Ether(bytes(reply))
    ip_sum, icmp_sum = rebuilt[IP].chksum, rebuilt[ICMP].chksum
    del rebuilt[IP].chksum, rebuilt[ICMP].chksum
    recomputed = Ether(bytes(rebuilt))
    assert ip_sum == recomputed[IP].chksum
    assert icmp_sum == recomputed[ICMP].chksum


def test_unknown_unicast_floods_inside_network(wire):
    frame = Ether(src=wire.mac("app.1", "back"), dst="02:42:ac:15:00:63") / IP(
        src=wire.ip("app.1", "back"), dst="172.21.0.99"
    ) / UDP(sport=1000, dport=2000)
    result = wire.send([(wire.port("app.1", "back"), frame)])
    assert [p for p, _ in wire.out(result)] == [wire.port("db.1", "back")]
    assert result.records[0].verdict == "flood"


def test_learned_unicast_goes_to_one_port(wire):
    db_port, app_port = wire.port("db.1", "back"), wire.port("app.1", "back")
    hello = Ether(src=wire.mac("db.1", "back"), dst=BROADCAST) / ARP(psrc=wire.ip("db.1", "back"))
    unicast = Ether(src=wire.mac("app.1", "back"), dst=wire.mac("db.1", "back")) / IP(
        src=wire.ip("app.1", "back"), dst=wire.ip("db.1", "back")
    ) / TCP(sport=40000, dport=5432, flags="S")
    result = wire.send([(db_port, hello), (app_port, unicast)])
    delivered = [p for e, (p, _) in zip(result.emits, wire.out(result)) if e.index == 1]
    assert delivered == [db_port]
    assert result.records[1].verdict == "deliver"


def test_routing_to_other_network_is_isolation(wire):
    _, gw_mac = wire.gateway("front")
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=gw_mac) / IP(
        src=wire.ip("proxy.1", "front"), dst=wire.ip("db.1", "back")
    ) / ICMP()
    result = wire.send([(wire.port("proxy.1", "front"), frame)])
    assert result.emits == []
    assert result.records[0].reason == "isolation"
    assert wire.fabric.drops_by_reason() == {"isolation": 1}


def test_address_outside_cluster_is_no_egress(wire):
    _, gw_mac = wire.gateway("front")
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=gw_mac) / IP(
        src=wire.ip("proxy.1", "front"), dst="203.0.113.7"
    ) / UDP(dport=53)
    result = wire.send([(wire.port("proxy.1", "front"), frame)])
    assert result.emits == []
    assert result.records[0].reason == "no-egress"


def test_internal_network_reaches_nothing_outside(wire):
    _, gw_mac = wire.gateway("secret")
    frame = Ether(src=wire.mac("vault.1", "secret"), dst=gw_mac) / IP(
        src=wire.ip("vault.1", "secret"), dst="203.0.113.7"
    ) / UDP(dport=53)
    result = wire.send([(wire.port("vault.1", "secret"), frame)])
    assert result.emits == []
    assert result.records[0].reason == "internal"


def test_internal_network_gateway_still_answers_ping(wire):
    gw_ip, gw_mac = wire.gateway("secret")
    frame = Ether(src=wire.mac("vault.1", "secret"), dst=gw_mac) / IP(
        src=wire.ip("vault.1", "secret"), dst=gw_ip
    ) / ICMP()
    result = wire.send([(wire.port("vault.1", "secret"), frame)])
    assert len(result.emits) == 1


def test_tcp_to_gateway_is_dropped_with_reason(wire):
    gw_ip, gw_mac = wire.gateway("front")
    frame = Ether(src=wire.mac("proxy.1", "front"), dst=gw_mac) / IP(
        src=wire.ip("proxy.1", "front"), dst=gw_ip
    ) / TCP(dport=22)
    result = wire.send([(wire.port("proxy.1", "front"), frame)])
    assert result.records[0].reason == "gateway-no-service"


def test_multicast_source_mac_is_dropped(wire):
    frame = Ether(src="01:00:5e:00:00:01", dst=BROADCAST) / ARP()
    result = wire.send([(wire.port("proxy.1", "front"), frame)])
    assert result.records[0].reason == "invalid-src-mac"


def test_destination_on_ingress_port_is_same_port(wire):
    port = wire.port("proxy.1", "front")
    first = Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP()
    back = Ether(src="02:42:ac:14:00:77", dst=wire.mac("proxy.1", "front")) / IP() / UDP()
    result = wire.send([(port, first), (port, back)])
    assert result.records[1].reason == "same-port"


MALFORMED_CASES = [
    ("truncated Ethernet", lambda e: bytes(e / IP() / UDP())[:10], "malformed-ethernet"),
    ("truncated IPv4", lambda e: bytes(e / IP() / UDP())[:20], "malformed-ipv4"),
    ("IPv4 total length past frame", lambda e: bytes(e / IP(len=400) / UDP()), "malformed-ipv4"),
    ("UDP length past IP payload", lambda e: bytes(e / IP() / UDP(len=200) / (b"x" * 20)), "malformed-udp"),
    ("TCP data offset below 5", lambda e: bytes(e / IP() / TCP(dataofs=2)), "malformed-tcp"),
]


@pytest.mark.parametrize("build, reason", [c[1:] for c in MALFORMED_CASES], ids=[c[0] for c in MALFORMED_CASES])
def test_malformed_frames_are_counted(wire, build, reason):
    frame = build(Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST))
    result = wire.send([(wire.port("proxy.1", "front"), frame)])
    assert result.emits == []
    assert result.records[0].reason == reason
    assert wire.fabric.counters()[wire.fabric.port_names[wire.port("proxy.1", "front")]]["drops"] == {reason: 1}


def test_unknown_port_is_counted_not_raised(wire):
    result = wire.send([(999, Ether(src="02:42:ac:14:00:09", dst=BROADCAST) / IP())])
    assert result.records[0].reason == "unknown-port"


def _learn_then_send(wire, gap: float):
    app_port = wire.port("app.1", "back")
    db_port = wire.port("db.1", "back")
    hello = Ether(src=wire.mac("db.1", "back"), dst=BROADCAST) / ARP(psrc=wire.ip("db.1", "back"))
    wire.send([(db_port, hello)], now=1000.0)
    unicast = Ether(src=wire.mac("app.1", "back"), dst=wire.mac("db.1", "back")) / IP() / UDP()
    return wire.send([(app_port, unicast)], now=1000.0 + gap)


def test_mac_entry_alive_at_299_seconds(wire):
    result = _learn_then_send(wire, 299.0)
    assert result.records[0].verdict == "deliver"


def test_mac_entry_aged_out_at_301_seconds(wire):
    result = _learn_then_send(wire, 301.0)
    assert result.records[0].verdict == "flood"


def test_fdb_limit_counts_overflow(wire):
    for view in wire.fabric.nodes["node1"].networks.values():
        view.bridge.limit = 2
    port = wire.port("proxy.1", "front")
    frames = [(port, Ether(src=f"02:00:00:00:00:{n:02x}", dst=BROADCAST) / ARP()) for n in range(1, 6)]
    result = wire.send(frames)
    assert wire.fabric.decisions["fdb-full"] == 3
    assert all(r.verdict == "flood" for r in result.records)


def test_trace_off_gives_same_frames(wire):
    frames = [
        (wire.port("proxy.1", "front"), Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP(pdst=wire.gateway("front")[0])),
        (wire.port("app.1", "back"), Ether(src=wire.mac("app.1", "back"), dst=wire.mac("db.1", "back")) / IP() / UDP()),
    ]
    traced = [(e.port, e.frame) for e in wire.send(frames, trace=True).emits]
    other = Wire()
    plain = [(e.port, e.frame) for e in other.send(frames, trace=False).emits]
    assert traced == plain


def test_every_record_has_a_verdict(wire):
    frames = [
        (wire.port("proxy.1", "front"), Ether(src=wire.mac("proxy.1", "front"), dst=BROADCAST) / ARP()),
        (wire.port("proxy.1", "front"), b"\x00" * 5),
    ]
    result = wire.send(frames)
    assert [bool(r.verdict) for r in result.records] == [True, True]
    assert "trace 2" in result.records[1].format()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=8), st.integers(0, 3))
def test_random_frames_never_raise(frames, port_index):
    wire = Wire()
    ports = wire.fabric.port_names
    port = port_index % len(ports)
    result = wire.send([(port, f) for f in frames])
    network = wire.fabric.ports[port].network
    for record in result.records:
        assert record.verdict in {"deliver", "flood", "reply", "drop"}
        if record.verdict == "drop":
            assert record.reason in reasons.BY_CODE
    for emit in result.emits:
        assert wire.fabric.ports[emit.port].network == network


def test_partial_checksum_is_completed_before_delivery(wire):
    import struct

    frame = Ether(src=wire.mac("app.1", "back"), dst=wire.mac("db.1", "back")) / IP(
        src=wire.ip("app.1", "back"), dst=wire.ip("db.1", "back")
    ) / UDP(sport=1000, dport=2000) / b"partial"
    complete = bytes(frame)
    partial = bytearray(complete)
    # What the kernel hands over with checksum offload: the pseudo-header sum, not inverted.
    pseudo = sum(struct.unpack("!4H", complete[26:34])) + 17 + 8 + 7
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    partial[40:42] = struct.pack("!H", pseudo)
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6)
    batch = FrameBatch(4)
    batch.append(wire.port("app.1", "back"), bytes(partial), vnet)
    result = wire.fabric.process(batch, 0.0, wire.rng)
    [emit] = [e for e in result.emits if e.port == wire.port("db.1", "back")] or result.emits
    assert emit.frame == complete
    assert emit.vnet is None
