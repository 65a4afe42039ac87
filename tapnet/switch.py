"""Learning bridge: one forwarding database (FDB) per network on a node.

The bridge maps MAC addresses to the port they were last seen on, as the Linux
bridge does. It has no notion of IP, VXLAN or gateways. The datapath looks up
the port of a destination MAC here and the ports a flood reaches.

MACs are 48-bit integers (first byte most significant), ports are the
datapath's integer port ids, and time is the `now` the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linux bridge default ageing time (`ip link ... type bridge ageing_time`), 300 s.
DEFAULT_AGEING = 300.0
# Maximum learned entries per network. Linux (6.5+) has `fdb_max_learned`,
# unlimited by default; tapnet bounds the table so a MAC flood cannot grow it
# without limit.
DEFAULT_FDB_LIMIT = 8192

BROADCAST = 0xFFFF_FFFF_FFFF
MULTICAST_BIT = 1 << 40  # the I/G bit of the first octet


def is_multicast(mac: int) -> bool:
    """True for group addresses, broadcast included."""
    return bool(mac & MULTICAST_BIT)


@dataclass
class FdbEntry:
    port: int
    updated: float
    static: bool = False


class Bridge:
    """The FDB and port set of one network on one node."""

    def __init__(
        self,
        network: str,
        ports: list[int],
        *,
        ageing: float = DEFAULT_AGEING,
        limit: int = DEFAULT_FDB_LIMIT,
    ):
        self.network = network
        self.ports = sorted(ports)
        self.ageing = ageing
        self.limit = limit
        self.fdb: dict[int, FdbEntry] = {}
        self.learned = 0  # dynamic entries, counted against `limit`

    def learn(self, mac: int, port: int, now: float) -> bool:
        """Record that `mac` was seen on `port`; False when the table is full and the MAC is new."""
        entry = self.fdb.get(mac)
        if entry is not None:
            if not entry.static:
                entry.port = port
                entry.updated = now
            return True
        if self.learned >= self.limit:
            self.expire(now)
            if self.learned >= self.limit:
                return False
        self.fdb[mac] = FdbEntry(port, now)
        self.learned += 1
        return True

    def lookup(self, mac: int, now: float) -> int | None:
        """Return the port that `mac` lives on, or None when unknown or aged out."""
        entry = self.fdb.get(mac)
        if entry is None:
            return None
        if not entry.static and now - entry.updated > self.ageing:
            del self.fdb[mac]
            self.learned -= 1
            return None
        return entry.port

    def flood_ports(self, ingress: int) -> list[int]:
        """Return every port of the network except the one the frame came from."""
        return [p for p in self.ports if p != ingress]

    def expire(self, now: float) -> int:
        """Remove entries idle for longer than the ageing time; return how many went."""
        stale = [mac for mac, e in self.fdb.items() if not e.static and now - e.updated > self.ageing]
        for mac in stale:
            del self.fdb[mac]
        self.learned -= len(stale)
        return len(stale)

    def add_static(self, mac: int, port: int) -> None:
        """Pin `mac` to `port` (remote endpoints known from cluster state; never aged)."""
        old = self.fdb.get(mac)
        if old is not None and not old.static:
            self.learned -= 1
        self.fdb[mac] = FdbEntry(port, 0.0, static=True)

    def remove_port(self, port: int) -> None:
        """Forget a port and every entry learned on it."""
        self.ports = [p for p in self.ports if p != port]
        gone = [mac for mac, e in self.fdb.items() if e.port == port]
        for mac in gone:
            if not self.fdb[mac].static:
                self.learned -= 1
            del self.fdb[mac]

    def rows(self, now: float) -> list[tuple[int, int, float, bool]]:
        """(mac, port, age in seconds, static) for every live entry, sorted by MAC."""
        out = []
        for mac, entry in sorted(self.fdb.items()):
            age = 0.0 if entry.static else now - entry.updated
            if entry.static or age <= self.ageing:
                out.append((mac, entry.port, age, entry.static))
        return out
