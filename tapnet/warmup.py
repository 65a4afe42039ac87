"""Compile (or load from numba's cache) every jitted function the datapath uses.

numba compiles a function on its first call. In the live runtime that call
would block the event loop, so `tapnet start` runs this before it reports
ready, and `scripts/setup.sh` runs it once so that the first start finds a
warm cache. It pushes a few frames through a throw-away `Fabric` of the
built-in demo: ARP, a VIP connection (conntrack and NAT), a partial-checksum
frame to a remote task (offload and VXLAN), and a pcapng round trip.
"""

from __future__ import annotations

import io
import struct

import numpy as np


def _frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, payload: bytes = b"warm") -> bytes:
    udp = struct.pack("!HHHH", 40000, 6379, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def warm_up() -> None:
    from tapnet import offload, parse, pcapio
    from tapnet.batch import FrameBatch
    from tapnet.datapath import Fabric
    from tapnet.stack import load_demo

    cluster = load_demo()
    fabric = Fabric(cluster)
    rng = np.random.default_rng(0)
    client = cluster.sandboxes["worker.1"]
    local = client.endpoints[0]
    vip = cluster.services["redis"].vips["vote"]
    remote = next(s for s in cluster.sandboxes.values() if s.service == "redis" and s.node != client.node)
    port = fabric.port_id(f"{client.node}/{client.name}/{local.ifname}")

    batch = FrameBatch(8, 1 << 16)
    arp = b"\xff" * 6 + local.mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
    arp += local.mac + local.ip.packed + bytes(6) + vip.packed
    batch.append(port, arp)
    batch.append(port, _frame(b"\x02\x42" + vip.packed, local.mac, local.ip.packed, vip.packed))
    # A partial checksum (virtio-net NEEDS_CSUM) bound for another node: completed, then encapsulated.
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6)
    batch.append(port, _frame(remote.endpoints[0].mac, local.mac, local.ip.packed, remote.endpoints[0].ip.packed), vnet)
    result = fabric.process(batch, 0.0, rng, trace=True)
    parse.parse_inner(batch, parse.parse_batch(batch))
    offload.complete_checksum(batch.frame(2), vnet)

    out = io.BytesIO()
    writer = pcapio.PcapNgWriter(out)
    interface = writer.interface_id("warm/up")
    frames = [emit.frame for emit in result.emits] or [arp]
    writer.write_frames(np.full(len(frames), interface), frames, np.zeros(len(frames)), [None] * len(frames))
    out.flush()
    pcapio.capture_from_bytes(out.getvalue())


if __name__ == "__main__":
    warm_up()
