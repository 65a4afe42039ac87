"""Filters: tapnet's BPF interpreter selects exactly the frames tcpdump selects, also inside VXLAN."""

from __future__ import annotations

import shutil
import subprocess

import dpkt
import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from tapnet import bpf

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump to compile filters")

A_MAC, B_MAC = "02:42:0a:00:07:05", "02:42:0a:00:07:06"


def _frames() -> list[bytes]:
    """Hand-made frames covering the protocols the filters below test, then seeded random ones."""
    eth = Ether(src=A_MAC, dst=B_MAC)
    frames = [
        eth / IP(src="10.0.7.5", dst="10.0.7.6") / TCP(sport=43000, dport=6379, flags="S"),
        eth / IP(src="10.0.7.6", dst="10.0.7.5") / TCP(sport=6379, dport=43000, flags="SA"),
        eth / IP(src="10.0.7.5", dst="10.0.7.6", options=b"\x01\x01\x01\x00") / TCP(dport=6379, flags="PA") / Raw(b"PING\r\n"),
        eth / IP(src="10.0.7.5", dst="10.0.7.1") / UDP(sport=40000, dport=53) / Raw(b"\x12\x34" + b"\x00" * 10),
        eth / IP(src="10.0.7.5", dst="10.0.7.1", ttl=1) / ICMP(type=8, id=7, seq=1),
        eth / IP(src="10.0.7.1", dst="10.0.7.5") / ICMP(type=0, id=7, seq=1),
        eth / IP(src="10.0.7.5", dst="10.0.7.6", flags="MF", frag=0) / UDP(dport=9) / Raw(b"x" * 40),
        eth / IP(src="10.0.7.5", dst="10.0.7.6", frag=100, proto=17) / Raw(b"y" * 40),
        Ether(src=A_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="10.0.7.5", pdst="10.0.7.1"),
        Ether(src=B_MAC, dst=A_MAC) / ARP(op=2, psrc="10.0.7.1", hwsrc=B_MAC, pdst="10.0.7.5"),
        Ether(src=A_MAC, dst="01:00:5e:00:00:fb") / IP(src="10.0.7.5", dst="224.0.0.251") / UDP(sport=5353, dport=5353),
        Ether(src=A_MAC, dst=B_MAC) / Dot1Q(vlan=42) / IP(src="10.0.7.5", dst="10.0.7.6") / TCP(dport=80),
        Ether(src=A_MAC, dst=B_MAC) / IPv6(src="fd00:7::5", dst="fd00:7::6") / TCP(dport=80),
        Ether(src=A_MAC, dst=B_MAC) / IPv6(src="fd00:7::5", dst="fd00:7::6") / UDP(dport=53),
        Ether(src=A_MAC, dst=B_MAC) / IP(src="172.20.0.5", dst="172.21.0.9") / UDP(sport=1000, dport=2000) / Raw(b"z" * 900),
        Ether(src=A_MAC, dst=B_MAC, type=0x88CC) / Raw(b"\x02\x07\x04" + b"\x00" * 40),
        bytes(eth / IP(src="10.0.7.5", dst="10.0.7.6") / UDP(dport=7) / Raw(b"abcd")) + bytes(14),  # Ethernet padding
        bytes(Ether(src=A_MAC, dst=B_MAC) / IP(src="10.0.7.5", dst="10.0.7.6") / TCP(dport=6379))[:40],  # cut inside TCP
        bytes(Ether(src=A_MAC, dst=B_MAC))[:10],  # shorter than Ethernet
    ]
    frames = [bytes(f) for f in frames]
    rng = np.random.default_rng(7)
    template = bytes(eth / IP(src="10.0.7.5", dst="10.0.7.6") / TCP(sport=1, dport=2) / Raw(b"\x00" * 40))
    for _ in range(200):
        # Mutate a valid frame at a few places, so most stay parseable enough to exercise deep loads.
        frame = bytearray(template[: int(rng.integers(14, len(template) + 1))])
        for position in rng.integers(0, len(frame), size=int(rng.integers(1, 6))):
            frame[position] = int(rng.integers(0, 256))
        frames.append(bytes(frame))
    return frames


FRAMES = _frames()

EXPRESSIONS = [
    "host 10.0.7.5 and tcp port 6379",
    "tcp",
    "udp",
    "icmp",
    "arp",
    "ip6",
    "not ip",
    "src host 10.0.7.5 and dst port 53",
    "net 10.0.7.0/24",
    "portrange 1-1024",
    "ether host " + B_MAC,
    "ether src " + A_MAC,
    "ether broadcast",
    "ether multicast",
    "ip multicast",
    "ether proto 0x88cc",
    "vlan and tcp port 80",
    "ip6 and tcp port 80",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)",
    "icmp[icmptype] == icmp-echo",
    "ip[8] < 2",
    "ip[0] & 0xf > 5",
    "ip[6:2] & 0x1fff != 0",
    "ip[2:2] / 4 > 200",
    "ip[2:2] % 7 = 3",
    "len * 2 > 200",
    "len - 14 > ip[2:2]",
    "ip[8] << 2 > 200",
    "ip[8] >> 1 = 32",
    "ip[8] ^ 1 = 65",
    "ip[1] | 1 = 1",
    "greater 100",
    "less 60",
    "arp[6:2] = 2",
    "udp[8:2] = 0x1234",
    "tcp[((tcp[12] & 0xf0) >> 2):4] = 0x50494e47",
    "ip proto 17 and not udp port 53",
]


def tcpdump_selection(frames: list[bytes], expression: str, tmp_path) -> list[bool]:
    """Which frames tcpdump's own filter keeps: frame i carries timestamp i, read back from tcpdump's output."""
    source = tmp_path / "frames.pcap"
    with open(source, "wb") as stream:
        writer = dpkt.pcap.Writer(stream, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for i, frame in enumerate(frames):
            writer.writepkt(frame, ts=float(i))
    completed = subprocess.run(["tcpdump", "-r", str(source), "-w", "-", "--", expression], capture_output=True, timeout=30)
    assert completed.returncode == 0, completed.stderr.decode()
    kept = {int(round(ts)) for ts, _ in dpkt.pcap.Reader(_Bytes(completed.stdout))}
    return [i in kept for i in range(len(frames))]


class _Bytes:
    def __init__(self, data: bytes):
        import io

        self._stream = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._stream.read(n)


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_filter_selects_what_tcpdump_selects(expression, tmp_path):
    expected = tcpdump_selection(FRAMES, expression, tmp_path)
    assert bpf.matches(expression, FRAMES) == expected
    assert any(expected), f"no frame matches {expression!r}; the case tests nothing"


def _in_vxlan(inner: bytes, vni: int = 4097) -> bytes:
    outer = (
        Ether(src="02:42:c6:33:64:02", dst="02:42:c6:33:64:03")
        / IP(src="198.51.100.2", dst="198.51.100.3")
        / UDP(sport=50000, dport=4789, chksum=0)
        / VXLAN(flags=0x08, vni=vni)
    )
    return bytes(outer) + inner


@pytest.mark.parametrize("expression", ["host 10.0.7.5 and tcp port 6379", "arp", "icmp[icmptype] == icmp-echo", "ether host " + B_MAC, "udp", "vlan and tcp port 80", "len > 100"])
def test_tunnel_frames_match_on_inner_frame(expression, tmp_path):
    inner = [f for f in FRAMES[:17] if len(f) >= 14]
    expected = tcpdump_selection(inner, expression, tmp_path)
    wrapped = [_in_vxlan(f) for f in inner]
    assert bpf.matches(expression, wrapped, tunnel=[True] * len(wrapped)) == expected


def test_vxlan_off_vtep_port_matches_outer():
    wrapped = _in_vxlan(FRAMES[0])
    assert bpf.matches("udp port 4789", [wrapped]) == [True]
    assert bpf.matches("host 10.0.7.5", [wrapped]) == [False]


def test_plain_frame_on_vtep_port_matches_whole():
    plain = bytes(Ether(src="02:42:c6:33:64:03", dst="02:42:c6:33:64:02") / IP(src="198.51.100.3", dst="198.51.100.2") / UDP(dport=53))
    assert bpf.matches("udp port 53", [plain], tunnel=[True]) == [True]


def test_truncated_vxlan_matches_outer_headers():
    cut = _in_vxlan(FRAMES[0])[:55]
    assert bpf.matches("udp port 4789", [cut], tunnel=[True]) == [True]


def test_empty_filter_matches_everything():
    assert bpf.compile_filter("  ").matches_all
    assert bpf.matches("", FRAMES[:5]) == [True] * 5


def test_invalid_expression_names_tcpdump_error():
    with pytest.raises(bpf.FilterError, match="invalid filter 'host and'"):
        bpf.compile_filter("host and")


# ---- the interpreter on hand-written programs ----------------------------------


def _run(rows, frame: bytes = b"\x00" * 64) -> bool:
    flt = bpf.Filter("test", bpf.check_program(rows))
    return bpf.matches(flt, [frame])[0]


def test_division_by_zero_in_x_is_no_match():
    assert not _run([[bpf.LDX_IMM, 0, 0, 0], [bpf.LD_IMM, 0, 0, 5], [bpf.ALU_DIV_X, 0, 0, 0], [bpf.RET_K, 0, 0, 1]])


def test_load_beyond_frame_is_no_match():
    assert not _run([[bpf.LD_W_ABS, 0, 0, 62], [bpf.RET_K, 0, 0, 1]])
    assert _run([[bpf.LD_W_ABS, 0, 0, 60], [bpf.RET_K, 0, 0, 1]])


def test_shift_by_32_gives_zero():
    rows = [[bpf.LD_IMM, 0, 0, 1], [bpf.LDX_IMM, 0, 0, 32], [bpf.ALU_LSH_X, 0, 0, 0], [bpf.RET_A, 0, 0, 0]]
    assert not _run(rows)


def test_scratch_memory_round_trip():
    rows = [[bpf.LD_IMM, 0, 0, 9], [bpf.ST, 0, 0, 15], [bpf.LD_IMM, 0, 0, 0], [bpf.LDX_MEM, 0, 0, 15], [bpf.MISC_TXA, 0, 0, 0], [bpf.RET_A, 0, 0, 0]]
    assert _run(rows)


BAD_PROGRAMS = [
    ("empty", [], "0 instructions"),
    ("unknown opcode", [[0xFF, 0, 0, 0], [bpf.RET_K, 0, 0, 1]], "unknown opcode"),
    ("jump past end", [[bpf.JMP_JEQ_K, 5, 0, 1], [bpf.RET_K, 0, 0, 1]], "jump beyond"),
    ("ja past end", [[bpf.JMP_JA, 0, 0, 1], [bpf.RET_K, 0, 0, 1]], "jump beyond"),
    ("scratch index", [[bpf.ST, 0, 0, 16], [bpf.RET_K, 0, 0, 1]], "scratch memory"),
    ("constant division by zero", [[bpf.ALU_DIV_K, 0, 0, 0], [bpf.RET_K, 0, 0, 1]], "division by zero"),
    ("no final return", [[bpf.LD_IMM, 0, 0, 1]], "last instruction must return"),
    ("k out of range", [[bpf.LD_IMM, 0, 0, 1 << 32], [bpf.RET_K, 0, 0, 1]], "k 0-"),
    ("not rows of four", [[1, 2, 3]], "rows of four"),
]


@pytest.mark.parametrize("rows, message", [c[1:] for c in BAD_PROGRAMS], ids=[c[0] for c in BAD_PROGRAMS])
def test_check_program_rejects(rows, message):
    with pytest.raises(bpf.FilterError, match=message):
        bpf.check_program(rows)


def test_filter_set_runs_several_filters_in_one_call():
    filters = bpf.FilterSet([bpf.compile_filter("tcp"), bpf.MATCH_ALL, bpf.compile_filter("arp")], np.zeros(1, dtype=bool))
    matched = filters.match_frames(FRAMES[:10], [0] * 10)
    assert matched[0].tolist() == bpf.matches("tcp", FRAMES[:10])
    assert matched[1].all()
    assert matched[2].tolist() == bpf.matches("arp", FRAMES[:10])
