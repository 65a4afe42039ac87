"""Turn capture.pcap (tcpdump's recording) into this case's input.pcapng and expected.pcapng.

    python tests/replay/kernel-vxlan/make_case.py

input.pcapng contains the recorded frames unchanged, with their timestamps, on
one interface named `node1/vxlan` (a pcap has no interface names).
expected.pcapng is the replay of input.pcapng, written only when it meets
the expectations of case.yml.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import scapy.layers.inet  # noqa: F401  (registers IPv4, so the expectations can read ip.* fields)
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))

from tapnet.pcapio import PcapNgWriter, open_capture  # noqa: E402
from tapnet.testing import expectation_failures, run_replay  # noqa: E402

PORT = "node1/vxlan"


def write_input() -> None:
    recorded = open_capture(HERE / "capture.pcap")
    frames = [recorded.frame(i) for i in range(len(recorded))]
    times = [ticks / per_second for ticks, per_second in (recorded.time_ticks(i) for i in range(len(recorded)))]
    buffer = io.BytesIO()
    writer = PcapNgWriter(buffer, application="tests/replay/kernel-vxlan/make_case.py")
    writer.write_frames([writer.interface_id(PORT)] * len(frames), frames, times)
    (HERE / "input.pcapng").write_bytes(buffer.getvalue())


def main() -> int:
    write_input()
    case = yaml.safe_load((HERE / "case.yml").read_text())
    output, result = run_replay(HERE / case["stack"], HERE / "input.pcapng", seed=case["seed"])
    failures = expectation_failures(output, result, case["expect"])
    if failures:
        print("expected.pcapng not written:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    (HERE / "expected.pcapng").write_bytes(output)
    print(f"wrote input.pcapng and expected.pcapng ({len(open_capture(HERE / 'expected.pcapng'))} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
