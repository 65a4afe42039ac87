"""`tapnet replay`: regression cases, determinism, and the command's checks and errors.

The cases live in tests/replay/<case>/ (built by tests/replay/make_cases.py).
Each is replayed through the real datapath and compared with its
expected.pcapng, and also checked against the hand-written expectations in
its case.yml, which do not come from a replay.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tapnet import cli
from tapnet.compare import canonical_field, diff_frames
from tapnet.pcapio import PcapNgWriter, capture_from_bytes, open_capture
from tapnet.stack import load_stack_file
from tapnet.testing import assert_replay_matches, expectation_failures, run_replay

CASES_DIR = Path(__file__).resolve().parent / "replay"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "case.yml").exists())


def case_files(name: str):
    directory = CASES_DIR / name
    description = yaml.safe_load((directory / "case.yml").read_text())
    stack = None if description["stack"] == "demo" else directory / description["stack"]
    return directory, description, stack


def test_cases_exist():
    assert {"arp-gateway", "icmp-gateway", "isolation", "no-egress", "mac-ageing", "malformed"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_case_matches_expected(name):
    directory, description, stack = case_files(name)
    assert_replay_matches(stack, directory / "input.pcapng", directory / "expected.pcapng", seed=description["seed"])


@pytest.mark.parametrize("name", CASES)
def test_case_meets_its_expectations(name):
    directory, description, stack = case_files(name)
    output, result = run_replay(stack, directory / "input.pcapng", seed=description["seed"])
    assert expectation_failures(output, result, description["expect"]) == []


@pytest.mark.parametrize("name", CASES)
def test_case_replay_is_deterministic(name):
    directory, description, stack = case_files(name)
    first, _ = run_replay(stack, directory / "input.pcapng", seed=description["seed"])
    second, _ = run_replay(stack, directory / "input.pcapng", seed=description["seed"])
    one_by_one, _ = run_replay(stack, directory / "input.pcapng", seed=description["seed"], frames_per_batch=1)
    assert first == second
    assert one_by_one == first


def test_cli_output_equals_expected_bytes(tmp_path):
    # The expected files were written by the same replay, so even the bytes agree.
    directory = CASES_DIR / "mac-ageing"
    out = tmp_path / "out.pcapng"
    argv = ["replay", "--stack", str(directory / "stack.yml"), "-r", str(directory / "input.pcapng"), "-w", str(out)]
    assert cli.main(argv) == 0
    assert out.read_bytes() == (directory / "expected.pcapng").read_bytes()


# ---------------------------------------------------------------------------
# tshark reads what the replay writes


def tshark_stderr(stderr: str) -> list[str]:
    """stderr lines of tshark, without the notice it prints whenever it runs as root."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith('Running as user "root"')]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("name", CASES)
def test_tshark_reads_output_and_comments(tmp_path, name):
    directory, description, stack = case_files(name)
    output, result = run_replay(stack, directory / "input.pcapng", seed=description["seed"])
    path = tmp_path / "out.pcapng"
    path.write_bytes(output)

    fields = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name", "-e", "frame.comment"],
        capture_output=True, text=True, timeout=120,
    )
    assert fields.returncode == 0
    assert tshark_stderr(fields.stderr) == []
    rows = [line.split("\t") for line in fields.stdout.splitlines()]
    assert len(rows) == result.frames_out
    assert all(row[1].startswith("trace ") for row in rows)

    # With checksum validation on, tshark's expert info contains no warning or error.
    expert = subprocess.run(
        ["tshark", "-r", str(path), "-q", "-z", "expert,warn",
         "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"],
        capture_output=True, text=True, timeout=120,
    )
    assert expert.returncode == 0
    assert "Errors (" not in expert.stdout
    assert "Warns (" not in expert.stdout


# ---------------------------------------------------------------------------
# --expect and --ignore


def rewrite_capture(source: Path, target: Path, alter) -> None:
    """Copy a pcapng capture frame by frame; `alter(port, index on port, frame)` returns the new frame or None to drop it."""
    capture = open_capture(source)
    stream = io.BytesIO()
    writer = PcapNgWriter(stream)
    seen: dict[str, int] = {}
    ids, frames, times, comments = [], [], [], []
    for i in range(len(capture)):
        port = capture.interface_name(i)
        index = seen.get(port, 0)
        seen[port] = index + 1
        frame = alter(port, index, capture.frame(i))
        if frame is None:
            continue
        ids.append(writer.interface_id(port))
        frames.append(frame)
        times.append(capture.timestamps[i])
        comments.append(capture.comment(i))
    writer.write_frames(ids, frames, times, comments)
    target.write_bytes(stream.getvalue())


def set_byte(offset: int, value: int):
    def alter(frame: bytes) -> bytes:
        changed = bytearray(frame)
        changed[offset] = value
        return bytes(changed)

    return alter


AGEING = CASES_DIR / "mac-ageing"
AGEING_ARGS = ["replay", "--stack", str(AGEING / "stack.yml"), "-r", str(AGEING / "input.pcapng")]
ALTERED_PORT = "node1/web.2/eth0"

# Field, and the change to the second frame on ALTERED_PORT (an ICMP echo)
# that alters that field alone: checksums stay as they were.
ALTERATIONS = [
    ("ip.ttl", set_byte(14 + 8, 7)),
    ("eth.src", set_byte(11, 0x99)),
    ("icmp.seq", set_byte(14 + 20 + 7, 0x55)),
]


@pytest.mark.parametrize("field, alter", ALTERATIONS, ids=[a[0] for a in ALTERATIONS])
def test_expect_reports_port_and_field(tmp_path, capsys, field, alter):
    expected = tmp_path / "expected.pcapng"
    rewrite_capture(
        AGEING / "expected.pcapng",
        expected,
        lambda port, index, frame: alter(frame) if (port, index) == (ALTERED_PORT, 1) else frame,
    )
    assert cli.main([*AGEING_ARGS, "--expect", str(expected)]) == 1
    report = capsys.readouterr().err
    assert f"port {ALTERED_PORT}, frame 1 on that port" in report
    assert f"  {field}: expected " in report
    assert "1 of 10 compared frames differ" in report


@pytest.mark.parametrize("field, alter", ALTERATIONS, ids=[a[0] for a in ALTERATIONS])
def test_expect_ignore_accepts_altered_field(tmp_path, capsys, field, alter):
    expected = tmp_path / "expected.pcapng"
    rewrite_capture(
        AGEING / "expected.pcapng",
        expected,
        lambda port, index, frame: alter(frame) if (port, index) == (ALTERED_PORT, 1) else frame,
    )
    assert cli.main([*AGEING_ARGS, "--expect", str(expected), "--ignore", field]) == 0
    assert "matches" in capsys.readouterr().out


def test_expect_reports_extra_frames(tmp_path, capsys):
    expected = tmp_path / "expected.pcapng"
    # Without web.3's last frame in the expected file, the replay has one extra.
    rewrite_capture(
        AGEING / "expected.pcapng",
        expected,
        lambda port, index, frame: None if (port, index) == ("node1/web.3/eth0", 1) else frame,
    )
    assert cli.main([*AGEING_ARGS, "--expect", str(expected)]) == 1
    report = capsys.readouterr().err
    assert "port node1/web.3/eth0: 1 extra frame(s) (expected 1, got 2)" in report


def test_expect_reports_missing_frames(tmp_path, capsys):
    expected = tmp_path / "expected.pcapng"
    capture = open_capture(AGEING / "expected.pcapng")
    stream = io.BytesIO()
    writer = PcapNgWriter(stream)
    ids = [writer.interface_id(capture.interface_name(i)) for i in range(len(capture))]
    frames = [capture.frame(i) for i in range(len(capture))]
    comments = [capture.comment(i) for i in range(len(capture))]
    # One more frame, on a port the replay never writes to.
    extra = bytes(Ether(src="02:42:ac:1e:02:05", dst="02:42:ac:1e:02:04") / IP() / ICMP())
    times = [*capture.timestamps, capture.timestamps[-1]]
    writer.write_frames([*ids, writer.interface_id("node1/db.1/eth0")], [*frames, extra], times, [*comments, None])
    expected.write_bytes(stream.getvalue())
    assert cli.main([*AGEING_ARGS, "--expect", str(expected)]) == 1
    assert "port node1/db.1/eth0: 1 frame(s) missing (expected 1, got 0)" in capsys.readouterr().err


def test_no_comments_differs_only_in_comments(capsys):
    args = [*AGEING_ARGS, "--no-comments", "--expect", str(AGEING / "expected.pcapng")]
    assert cli.main(args) == 1
    assert "frame.comment: expected 'trace 1 " in capsys.readouterr().err
    assert cli.main([*args, "--ignore", "frame.comment"]) == 0


def test_ignore_unknown_field_lists_known(capsys):
    assert cli.main([*AGEING_ARGS, "--expect", str(AGEING / "expected.pcapng"), "--ignore", "ip.colour"]) == 2
    error = capsys.readouterr().err
    assert "unknown field 'ip.colour'" in error
    assert "ip.ttl" in error
    assert "tcp.seq" in error


def test_field_names_are_tshark_fields():
    from tapnet.compare import ALIASES, FRAME_FIELDS, LAYER_FIELDS

    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    listing = subprocess.run(["tshark", "-G", "fields"], capture_output=True, text=True, timeout=120).stdout
    # Protocols count too: tshark 4.0 lists pkt_comment as a protocol whose text is frame.comment.
    tshark_fields = {line.split("\t")[2] for line in listing.splitlines() if line[:2] in ("F\t", "P\t")}
    ours = set(LAYER_FIELDS) | set(FRAME_FIELDS) | set(ALIASES)
    assert ours - tshark_fields == {"ip.options"}


def test_diff_names_inner_header_of_vxlan():
    from scapy.layers.inet import UDP
    from scapy.layers.vxlan import VXLAN

    def vxlan(inner_ttl: int) -> bytes:
        outer = Ether(src="02:42:c6:33:64:02", dst="02:42:c6:33:64:03") / IP(src="198.51.100.2", dst="198.51.100.3") / UDP(sport=50000, dport=4789) / VXLAN(vni=4097)
        return bytes(outer / Ether(src="02:42:0a:00:00:05", dst="02:42:0a:00:00:06") / IP(src="10.0.0.5", dst="10.0.0.6", ttl=inner_ttl) / ICMP())

    names = [d.name for d in diff_frames(vxlan(64), vxlan(63))]
    assert "ip.ttl#2" in names
    assert "ip.ttl" not in names


def test_canonical_field_aliases():
    assert canonical_field("tcp.seq_raw") == "tcp.seq"
    assert canonical_field("pkt_comment") == "frame.comment"


# ---------------------------------------------------------------------------
# Inputs and errors


def test_plain_pcap_needs_port(tmp_path, capsys):
    capture = open_capture(AGEING / "input.pcapng")
    web1 = [i for i in range(len(capture)) if capture.interface_name(i) == "node1/web.1/eth0"]
    packets = []
    for i in web1:
        packet = Ether(capture.frame(i))
        packet.time = capture.timestamps[i]
        packets.append(packet)
    pcap = tmp_path / "web1.pcap"
    wrpcap(str(pcap), packets)
    args = ["replay", "--stack", str(AGEING / "stack.yml"), "-r", str(pcap)]

    assert cli.main([*args, "--summary"]) == 2
    error = capsys.readouterr().err
    assert "give one with --port NAME" in error
    assert "node1/web.1/eth0" in error

    out = tmp_path / "out.pcapng"
    assert cli.main([*args, "--port", "node1/web.1/eth0", "-w", str(out)]) == 0
    written = open_capture(out)
    # Without web.2 and web.3 speaking first, both pings are unknown unicast: flooded.
    assert [written.interface_name(i) for i in range(len(written))] == [
        "node1/web.2/eth0", "node1/web.3/eth0", "node1/cache.1/eth0",
    ] * 2


def test_unknown_interface_name_lists_ports(tmp_path, capsys):
    stream = io.BytesIO()
    writer = PcapNgWriter(stream)
    frame = bytes(Ether(src="02:42:ac:1e:01:04", dst="ff:ff:ff:ff:ff:ff") / IP() / ICMP())
    writer.write_frames([writer.interface_id("node1/nobody.1/eth0")], [frame], [1.0])
    path = tmp_path / "in.pcapng"
    path.write_bytes(stream.getvalue())
    assert cli.main(["replay", "--stack", str(AGEING / "stack.yml"), "-r", str(path), "--summary"]) == 2
    error = capsys.readouterr().err
    assert "capture interface 'node1/nobody.1/eth0' is not a port of the stack" in error
    assert "node1/web.1/eth0, node1/web.2/eth0" in error


def test_failed_replay_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "out.pcapng"
    args = [*AGEING_ARGS, "--port", "node1/web.9/eth0", "-w", str(out)]
    assert cli.main(args) == 2
    assert "is not a port of the stack" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_port_option_lists_ports(capsys):
    assert cli.main([*AGEING_ARGS, "--port", "node1/web.9/eth0", "--summary"]) == 2
    error = capsys.readouterr().err
    assert "--port 'node1/web.9/eth0' is not a port of the stack" in error
    assert "node1/cache.1/eth1" in error


def test_truncated_capture_is_an_error(tmp_path, capsys):
    content = (AGEING / "input.pcapng").read_bytes()
    path = tmp_path / "cut.pcapng"
    path.write_bytes(content[:-10])
    out = tmp_path / "out.pcapng"
    assert cli.main(["replay", "--stack", str(AGEING / "stack.yml"), "-r", str(path), "-w", str(out)]) == 2
    error = capsys.readouterr().err
    assert "truncated pcapng block" in error
    assert "byte offset" in error
    assert not out.exists()


def test_nothing_to_do_is_an_error(capsys):
    assert cli.main(AGEING_ARGS) == 2
    assert "give -w OUT.pcapng, --summary or --expect" in capsys.readouterr().err


def test_summary_counts_ports_and_drops(capsys):
    malformed = CASES_DIR / "malformed"
    args = ["replay", "--stack", str(malformed / "stack.yml"), "-r", str(malformed / "input.pcapng"), "--summary"]
    assert cli.main(args) == 0
    summary = capsys.readouterr().out
    assert "frames read 10, frames written 1" in summary
    assert "malformed-ipv4           2" in summary
    rx_bytes = int(open_capture(malformed / "input.pcapng").lengths.sum())
    web1 = next(line for line in summary.splitlines() if line.startswith("node1/web.1/eth0 ")).split()
    assert web1[1:4] == ["10", str(rx_bytes), "1"]


def test_seed_leaves_no_mark_on_output():
    # These frames draw no random numbers, so any seed must give the same bytes.
    directory = CASES_DIR / "isolation"
    first, _ = run_replay(None, directory / "input.pcapng", seed=0)
    other, _ = run_replay(None, directory / "input.pcapng", seed=12345)
    assert first == other


def test_replay_runs_on_compiled_cluster():
    cluster = load_stack_file(AGEING / "stack.yml")
    output, result = run_replay(cluster, AGEING / "input.pcapng")
    assert result.frames_in == 4
    assert len(capture_from_bytes(output)) == result.frames_out == 10


def test_complete_checksum_matches_scapy():
    import socket
    import struct

    from scapy.layers.inet import UDP
    from scapy.utils import checksum

    from tapnet.replay import complete_checksum

    source, destination = "172.30.1.4", "172.30.1.5"
    full = bytes(Ether(src="02:42:0a:00:00:05", dst="02:42:0a:00:00:06") / IP(src=source, dst=destination) / UDP(sport=1000, dport=2000) / (b"z" * 33))
    # An offloaded frame carries only the pseudo-header sum, not complemented, in the checksum field.
    udp_length = len(full) - 14 - 20  # odd, so the last byte is summed with a zero pad
    pseudo_header = socket.inet_aton(source) + socket.inet_aton(destination) + bytes([0, 17]) + udp_length.to_bytes(2, "big")
    partial = bytearray(full)
    partial[40:42] = (0xFFFF - checksum(pseudo_header)).to_bytes(2, "big")
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6)  # NEEDS_CSUM, csum_start 34, csum_offset 6

    assert complete_checksum(bytes(partial), vnet) == full
    assert complete_checksum(bytes(partial), bytes(10)) == bytes(partial)
