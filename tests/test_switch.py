"""The learning bridge on its own: learning, lookup, ageing, limits."""

from tapnet.switch import DEFAULT_AGEING, Bridge, is_multicast

MAC_A = 0x0242AC140002
MAC_B = 0x0242AC140003


def test_switch_learns_and_looks_up():
    bridge = Bridge("front", [1, 2, 3])
    assert bridge.learn(MAC_A, 1, now=0.0)
    assert bridge.lookup(MAC_A, now=1.0) == 1
    assert bridge.lookup(MAC_B, now=1.0) is None


def test_switch_moves_mac_to_new_port():
    bridge = Bridge("front", [1, 2])
    bridge.learn(MAC_A, 1, now=0.0)
    bridge.learn(MAC_A, 2, now=5.0)
    assert bridge.lookup(MAC_A, now=6.0) == 2


def test_switch_entry_survives_just_below_ageing():
    bridge = Bridge("front", [1, 2])
    bridge.learn(MAC_A, 1, now=0.0)
    assert bridge.lookup(MAC_A, now=DEFAULT_AGEING - 1) == 1


def test_switch_entry_ages_out_after_300_seconds():
    bridge = Bridge("front", [1, 2])
    bridge.learn(MAC_A, 1, now=0.0)
    assert bridge.lookup(MAC_A, now=DEFAULT_AGEING + 1) is None
    assert bridge.learned == 0


def test_switch_expire_removes_idle_entries():
    bridge = Bridge("front", [1, 2])
    bridge.learn(MAC_A, 1, now=0.0)
    bridge.learn(MAC_B, 2, now=200.0)
    assert bridge.expire(now=350.0) == 1
    assert bridge.lookup(MAC_B, now=350.0) == 2


def test_switch_limit_refuses_new_macs():
    bridge = Bridge("front", [1], limit=2)
    assert bridge.learn(1, 1, now=0.0)
    assert bridge.learn(2, 1, now=0.0)
    assert not bridge.learn(3, 1, now=0.0)
    assert bridge.lookup(3, now=0.0) is None
    assert bridge.learned == 2


def test_switch_limit_frees_room_after_ageing():
    bridge = Bridge("front", [1], limit=1)
    bridge.learn(1, 1, now=0.0)
    assert bridge.learn(2, 1, now=DEFAULT_AGEING + 1)


def test_switch_static_entries_never_age_or_move():
    bridge = Bridge("vote", [1, 2])
    bridge.add_static(MAC_A, 2)
    bridge.learn(MAC_A, 1, now=0.0)
    assert bridge.lookup(MAC_A, now=10_000.0) == 2


def test_switch_flood_excludes_ingress():
    bridge = Bridge("front", [3, 1, 2])
    assert bridge.flood_ports(2) == [1, 3]


def test_switch_remove_port_forgets_its_macs():
    bridge = Bridge("front", [1, 2])
    bridge.learn(MAC_A, 1, now=0.0)
    bridge.remove_port(1)
    assert bridge.lookup(MAC_A, now=0.0) is None
    assert bridge.ports == [2]


def test_multicast_bit():
    assert is_multicast(0xFFFFFFFFFFFF)
    assert is_multicast(0x01005E000001)
    assert not is_multicast(MAC_A)
