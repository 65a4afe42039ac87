"""Helpers for tests that replay captures through the datapath.

`assert_replay_matches` is the replay regression check: it runs a capture
through a fresh datapath exactly as `tapnet replay` does and raises
AssertionError with `tapnet replay --expect`'s report when the output
differs from the expected capture.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from tapnet.compare import Comparison, compare_captures
from tapnet.model import Cluster
from tapnet.pcapio import capture_from_bytes, open_capture
from tapnet.replay import DEFAULT_BATCH, DEFAULT_SEED, ReplayResult, load_cluster, replay

StackSource = Cluster | str | os.PathLike | None  # a compiled cluster, a stack file, or None for the demo


def run_replay(
    stack: StackSource,
    capture: str | os.PathLike,
    *,
    port: str | None = None,
    seed: int = DEFAULT_SEED,
    comments: bool = True,
    frames_per_batch: int = DEFAULT_BATCH,
) -> tuple[bytes, ReplayResult]:
    """Replay `capture` and return the output pcapng bytes with the replay's counters."""
    cluster = stack if isinstance(stack, Cluster) else load_cluster(stack)
    buffer = io.BytesIO()
    result = replay(
        cluster,
        open_capture(capture),
        buffer,
        port=port,
        seed=seed,
        comments=comments,
        frames_per_batch=frames_per_batch,
    )
    return buffer.getvalue(), result


def compare_replay(
    stack: StackSource,
    capture: str | os.PathLike,
    expected: str | os.PathLike,
    ignore: Iterable[str] = (),
    seed: int = DEFAULT_SEED,
    port: str | None = None,
) -> Comparison:
    output, _result = run_replay(stack, capture, port=port, seed=seed)
    return compare_captures(open_capture(expected), capture_from_bytes(output, "<replay output>"), tuple(ignore))


def assert_replay_matches(
    stack: StackSource,
    capture: str | os.PathLike,
    expected: str | os.PathLike,
    ignore: Iterable[str] = (),
    seed: int = DEFAULT_SEED,
    port: str | None = None,
) -> None:
    """Raise AssertionError, with the first differing frame and per-port counts, unless the replay matches."""
    comparison = compare_replay(stack, capture, expected, ignore, seed, port)
    if not comparison.matches:
        raise AssertionError(f"replay of {os.fspath(capture)} differs from {os.fspath(expected)}\n{comparison.format()}")


def expectation_failures(output: bytes, result: ReplayResult, expect: dict) -> list[str]:
    """Check a replay against hand-written expectations; return one line per failed check.

    `expect` may hold:
      drops:  {reason: count} for every reason dropped (any other reason must count 0);
      frames: {port: count} for every port that emits (any other port must emit nothing);
      checks: a list of {port, index, fields: {tshark name: value}, comment: substring of the story}.
    A payload field such as data.data may be given as text, compared as its UTF-8 bytes.
    """
    from tapnet.compare import flatten_frame

    failures = []
    if "drops" in expect:
        wanted = {reason: n for reason, n in expect["drops"].items() if n}
        if result.drops != wanted:
            failures.append(f"drops by reason: expected {wanted}, got {result.drops}")

    capture = capture_from_bytes(output, "<replay output>")
    by_port: dict[str, list[int]] = {}
    for i in range(len(capture)):
        by_port.setdefault(capture.interface_name(i) or "", []).append(i)
    if "frames" in expect:
        wanted = {port: n for port, n in expect["frames"].items() if n}
        got = {port: len(indices) for port, indices in by_port.items()}
        if got != wanted:
            failures.append(f"frames per port: expected {wanted}, got {got}")

    for check in expect.get("checks", []):
        port, index = check["port"], check["index"]
        where = f"port {port} frame {index}"
        indices = by_port.get(port, [])
        if index >= len(indices):
            failures.append(f"{where}: missing ({len(indices)} frames on that port)")
            continue
        frame_index = indices[index]
        fields = flatten_frame(capture.frame(frame_index))
        for name, value in check.get("fields", {}).items():
            if name not in fields:
                failures.append(f"{where}: field {name} absent")
            elif not _field_equals(fields[name][0], value):
                failures.append(f"{where}: {name} expected {value!r}, got {fields[name][1]}")
        story = capture.comment(frame_index) or ""
        if "comment" in check and check["comment"] not in story:
            failures.append(f"{where}: story lacks {check['comment']!r}: {story!r}")
    return failures


def _field_equals(actual: object, expected: object) -> bool:
    """Compare a dissected value with a YAML one: numbers as numbers, payload bytes with text as UTF-8."""
    if isinstance(actual, bytes) and isinstance(expected, str):
        return actual == expected.encode()
    return actual == expected or str(actual) == str(expected)
