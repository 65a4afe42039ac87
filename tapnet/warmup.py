"""Compile (or load from numba's cache) every jitted function the datapath uses.

numba compiles a function on its first call. In the live runtime that call
would block the event loop, so `tapnet start` runs this before it reports
ready, and `scripts/setup.sh` runs it once so that the first start finds a
warm cache. It pushes a few frames through a throw-away `Fabric` of the
built-in demo: ARP, a VIP connection (conntrack and NAT), a partial-checksum
frame and a TCP superframe to a remote task (offload and VXLAN). Then it runs
the ICMP-error translation, the BPF interpreter and a pcapng round trip.
"""

from __future__ import annotations

import io
import struct

import numpy as np


def _frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, payload: bytes = b"warm") -> bytes:
    udp = struct.pack("!HHHH", 40000, 6379, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


# virtio-net header of a TCPv4 superframe: NEEDS_CSUM, GSO_TCPV4, header length 54,
# gso_size 1398, checksum from byte 34 at offset 16.
_TSO_VNET = struct.pack("<BBHHHH", 1, 1, 54, 1398, 34, 16)


def _tcp_superframe(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes) -> bytes:
    payload = bytes(4 * 1398)
    tcp = struct.pack("!HHIIBBHHH", 40001, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src, dst)
    return dst_mac + src_mac + b"\x08\x00" + ip + tcp


def _warm_nat() -> None:
    """Compile the ICMP-error translation too; it runs only when a task sends one."""
    from tapnet import nat

    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), bytes(4)) + bytes(8)
    icmp = bytes((3, 3, 0, 0, 0, 0, 0, 0)) + inner
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, bytes(4), bytes(4))
    frame = bytearray(bytes(12) + b"\x08\x00" + ip + icmp)
    try:
        nat.rewrite_icmp_error(frame, 14, 34, 1, 2, 3, 4)
    except ValueError:
        pass  # the frame is only there to trigger compilation


def _warm_filters(batch) -> None:
    """Run the BPF interpreter once with a hand-written program ("accept every frame"), without tcpdump."""
    from tapnet import bpf

    accept = bpf.Filter("warm-up", bpf.check_program([[0x06, 0, 0, 0xFFFF]]))
    bpf.matches(accept, [batch.frame(0)], [False])


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
    # A TCP superframe (GSO, MSS 1398) to the same remote task: segmented before encapsulation.
    batch.append(port, _tcp_superframe(remote.endpoints[0].mac, local.mac, local.ip.packed, remote.endpoints[0].ip.packed), _TSO_VNET)
    result = fabric.process(batch, 0.0, rng, trace=True)
    parse.parse_inner(batch, parse.parse_batch(batch))
    offload.complete_checksum(batch.frame(2), vnet)
    offload.segment(batch.frame(3), _TSO_VNET)
    _warm_nat()
    _warm_filters(batch)

    out = io.BytesIO()
    writer = pcapio.PcapNgWriter(out)
    interface = writer.interface_id("warm/up")
    frames = [emit.frame for emit in result.emits] or [arp]
    writer.write_frames(np.full(len(frames), interface), frames, np.zeros(len(frames)), [None] * len(frames))
    out.flush()
    pcapio.capture_from_bytes(out.getvalue())


if __name__ == "__main__":
    warm_up()
