"""Packet filters in tcpdump's language, run by a classic BPF interpreter in numba.

`compile_filter("host 10.0.0.5 and tcp port 6379")` runs tcpdump to compile
the expression (`tcpdump -ddd -y EN10MB`, which opens no interface) into
classic BPF, the instruction set of pcap-filter(7) and of Linux socket
filters. `FilterSet` runs one or more such programs over a whole
`FrameBatch` in one numba call and returns a match matrix, one row per
filter and one column per frame.

A frame read from a VTEP port (`<node>/vxlan`) is matched on its inner
frame: the interpreter skips the outer Ethernet, IPv4, UDP and VXLAN headers
when they are complete and the UDP destination port is 4789, so
`host 10.0.0.5` selects the overlay traffic of that endpoint and not the
underlay. A VTEP frame that is not such a datagram is matched as it is.

The interpreter follows libpcap's `bpf_filter` (libpcap 1.10): a load
outside the frame, or a division or modulo by zero in X, ends the program
with "no match", and a shift by 32 or more gives 0.

A program that arrives from outside (over the control socket) must pass
`check_program` before it runs. The check rejects what the Linux kernel's
checker rejects: unknown opcodes, jumps outside the program, scratch memory
beyond M[15], division by a zero constant and a last instruction that is
not a return. Only forward jumps exist after it, so every program ends. Packet
loads and scratch memory are bounds-checked at run time as well.

numba's on-disk cache tracks only this file, so every jitted helper of the
interpreter lives here.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
from numba import njit

from tapnet.model import VXLAN_PORT

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h), as tcpdump -ddd prints them in decimal.
LD_IMM = 0x00
LD_W_ABS = 0x20
LD_H_ABS = 0x28
LD_B_ABS = 0x30
LD_W_IND = 0x40
LD_H_IND = 0x48
LD_B_IND = 0x50
LD_MEM = 0x60
LD_W_LEN = 0x80
LDX_IMM = 0x01
LDX_MEM = 0x61
LDX_W_LEN = 0x81
LDX_B_MSH = 0xB1
ST = 0x02
STX = 0x03
ALU_ADD_K, ALU_ADD_X = 0x04, 0x0C
ALU_SUB_K, ALU_SUB_X = 0x14, 0x1C
ALU_MUL_K, ALU_MUL_X = 0x24, 0x2C
ALU_DIV_K, ALU_DIV_X = 0x34, 0x3C
ALU_OR_K, ALU_OR_X = 0x44, 0x4C
ALU_AND_K, ALU_AND_X = 0x54, 0x5C
ALU_LSH_K, ALU_LSH_X = 0x64, 0x6C
ALU_RSH_K, ALU_RSH_X = 0x74, 0x7C
ALU_NEG = 0x84
ALU_MOD_K, ALU_MOD_X = 0x94, 0x9C
ALU_XOR_K, ALU_XOR_X = 0xA4, 0xAC
JMP_JA = 0x05
JMP_JEQ_K, JMP_JEQ_X = 0x15, 0x1D
JMP_JGT_K, JMP_JGT_X = 0x25, 0x2D
JMP_JGE_K, JMP_JGE_X = 0x35, 0x3D
JMP_JSET_K, JMP_JSET_X = 0x45, 0x4D
RET_K = 0x06
RET_A = 0x16
MISC_TAX = 0x07
MISC_TXA = 0x87

OPCODES = frozenset(
    {
        LD_IMM, LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_W_IND, LD_H_IND, LD_B_IND, LD_MEM, LD_W_LEN,
        LDX_IMM, LDX_MEM, LDX_W_LEN, LDX_B_MSH, ST, STX,
        ALU_ADD_K, ALU_ADD_X, ALU_SUB_K, ALU_SUB_X, ALU_MUL_K, ALU_MUL_X, ALU_DIV_K, ALU_DIV_X,
        ALU_OR_K, ALU_OR_X, ALU_AND_K, ALU_AND_X, ALU_LSH_K, ALU_LSH_X, ALU_RSH_K, ALU_RSH_X,
        ALU_NEG, ALU_MOD_K, ALU_MOD_X, ALU_XOR_K, ALU_XOR_X,
        JMP_JA, JMP_JEQ_K, JMP_JEQ_X, JMP_JGT_K, JMP_JGT_X, JMP_JGE_K, JMP_JGE_X, JMP_JSET_K, JMP_JSET_X,
        RET_K, RET_A, MISC_TAX, MISC_TXA,
    }
)
CONDITIONAL_JUMPS = frozenset({JMP_JEQ_K, JMP_JEQ_X, JMP_JGT_K, JMP_JGT_X, JMP_JGE_K, JMP_JGE_X, JMP_JSET_K, JMP_JSET_X})
MEMORY_OPS = frozenset({LD_MEM, LDX_MEM, ST, STX})
MEMWORDS = 16  # BPF_MEMWORDS: scratch memory M[0] to M[15]
MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS in Linux
U32 = 0xFFFFFFFF

TCPDUMP_TIMEOUT = 10.0  # seconds tcpdump may take to compile one expression


class FilterError(ValueError):
    """A filter expression tcpdump rejects, or a BPF program that fails the checks."""


# ---------------------------------------------------------------------------
# The interpreter (numba)


@njit(cache=True, inline="always")
def _load(buf, base, length, pos, size):
    """Read `size` bytes big-endian at `pos` of the frame; -1 when they lie outside it."""
    if pos < 0 or pos + size > length:
        return -1
    p = base + pos
    if size == 1:
        return np.int64(buf[p])
    if size == 2:
        return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
    return (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16) | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])


@njit(cache=True)
def _run(program, start, size, buf, base, length, mem):
    """Run one program over one frame; return the accept length (0: no match)."""
    a = np.int64(0)
    x = np.int64(0)
    pc = 0
    while pc < size:
        row = start + pc
        code = program[row, 0]
        k = program[row, 3]
        pc += 1
        if code == JMP_JEQ_K:
            pc += program[row, 1] if a == k else program[row, 2]
        elif code == LD_H_ABS:
            a = _load(buf, base, length, k, 2)
            if a < 0:
                return 0
        elif code == LD_B_ABS:
            a = _load(buf, base, length, k, 1)
            if a < 0:
                return 0
        elif code == LD_W_ABS:
            a = _load(buf, base, length, k, 4)
            if a < 0:
                return 0
        elif code == RET_K:
            return k
        elif code == JMP_JSET_K:
            pc += program[row, 1] if a & k else program[row, 2]
        elif code == LDX_B_MSH:
            v = _load(buf, base, length, k, 1)
            if v < 0:
                return 0
            x = (v & 0xF) << 2
        elif code == LD_H_IND:
            a = _load(buf, base, length, x + k, 2)
            if a < 0:
                return 0
        elif code == LD_B_IND:
            a = _load(buf, base, length, x + k, 1)
            if a < 0:
                return 0
        elif code == LD_W_IND:
            a = _load(buf, base, length, x + k, 4)
            if a < 0:
                return 0
        elif code == JMP_JGT_K:
            pc += program[row, 1] if a > k else program[row, 2]
        elif code == JMP_JGE_K:
            pc += program[row, 1] if a >= k else program[row, 2]
        elif code == JMP_JEQ_X:
            pc += program[row, 1] if a == x else program[row, 2]
        elif code == JMP_JGT_X:
            pc += program[row, 1] if a > x else program[row, 2]
        elif code == JMP_JGE_X:
            pc += program[row, 1] if a >= x else program[row, 2]
        elif code == JMP_JSET_X:
            pc += program[row, 1] if a & x else program[row, 2]
        elif code == JMP_JA:
            pc += k
        elif code == RET_A:
            return a
        elif code == LD_IMM:
            a = k
        elif code == LDX_IMM:
            x = k
        elif code == LD_W_LEN:
            a = length
        elif code == LDX_W_LEN:
            x = length
        elif code == LD_MEM:
            a = mem[k & 15]  # check_program rejects k >= 16; the mask keeps unchecked programs inside mem
        elif code == LDX_MEM:
            x = mem[k & 15]
        elif code == ST:
            mem[k & 15] = a
        elif code == STX:
            mem[k & 15] = x
        elif code == MISC_TAX:
            x = a
        elif code == MISC_TXA:
            a = x
        elif code == ALU_NEG:
            a = (-a) & U32
        else:
            # Arithmetic: the operand is K or X by the opcode's source bit (0x08).
            operand = x if code & 0x08 else k
            op = code & 0xF7
            if op == ALU_ADD_K:
                a = (a + operand) & U32
            elif op == ALU_SUB_K:
                a = (a - operand) & U32
            elif op == ALU_MUL_K:
                a = (a * operand) & U32
            elif op == ALU_DIV_K:
                if operand == 0:
                    return 0
                a = a // operand
            elif op == ALU_MOD_K:
                if operand == 0:
                    return 0
                a = a % operand
            elif op == ALU_OR_K:
                a = a | operand
            elif op == ALU_AND_K:
                a = a & operand
            elif op == ALU_XOR_K:
                a = a ^ operand
            elif op == ALU_LSH_K:
                a = (a << operand) & U32 if operand < 32 else 0
            elif op == ALU_RSH_K:
                a = a >> operand if operand < 32 else 0
            else:
                return 0  # unknown opcode: check_program keeps these out
    return 0


@njit(cache=True, inline="always")
def _vxlan_inner(buf, base, length):
    """Offset of the inner Ethernet header of a VXLAN-in-IPv4 frame, or 0 when it is not one."""
    if length < 14 + 20 + 8 + 8 + 14:
        return 0
    l3 = 14
    ethertype = (np.int64(buf[base + 12]) << 8) | np.int64(buf[base + 13])
    if ethertype == 0x8100:
        l3 = 18
        ethertype = (np.int64(buf[base + 16]) << 8) | np.int64(buf[base + 17])
    if ethertype != 0x0800 or buf[base + l3] >> 4 != 4:
        return 0
    ihl = np.int64(buf[base + l3] & 0xF) * 4
    fragment = ((np.int64(buf[base + l3 + 6]) << 8) | np.int64(buf[base + l3 + 7])) & 0x3FFF
    if ihl < 20 or fragment != 0 or buf[base + l3 + 9] != 17:
        return 0
    udp = l3 + ihl
    inner = udp + 8 + 8
    if inner + 14 > length:
        return 0
    dport = (np.int64(buf[base + udp + 2]) << 8) | np.int64(buf[base + udp + 3])
    if dport != VXLAN_PORT:
        return 0
    return inner


@njit(cache=True)
def run_filters(program, starts, sizes, buf, offsets, lengths, ports, tunnel_ports, count, out):
    """Run every program over frames 0..count-1; out[f, i] = 1 when program f matches frame i.

    `tunnel_ports[port]` marks VTEP ports, whose frames are matched on their
    inner frame. Returns the number of frames that some program matches.
    """
    mem = np.zeros(MEMWORDS, dtype=np.int64)
    hits = 0
    n_ports = tunnel_ports.shape[0]
    for i in range(count):
        base = np.int64(offsets[i])
        length = np.int64(lengths[i])
        port = ports[i]
        if port >= 0 and port < n_ports and tunnel_ports[port]:
            inner = _vxlan_inner(buf, base, length)
            base += inner
            length -= inner
        selected = False
        for f in range(starts.shape[0]):
            if _run(program, starts[f], sizes[f], buf, base, length, mem) != 0:
                out[f, i] = 1
                selected = True
            else:
                out[f, i] = 0
        if selected:
            hits += 1
    return hits


# ---------------------------------------------------------------------------
# Programs: compile with tcpdump, parse, check


@dataclass(frozen=True)
class Filter:
    """A filter expression and its BPF program; an empty expression matches every frame."""

    expression: str
    program: np.ndarray | None  # (n, 4) int64 rows of code, jt, jf, k; None: match everything

    @property
    def matches_all(self) -> bool:
        return self.program is None

    def to_rows(self) -> list[list[int]] | None:
        return None if self.program is None else self.program.tolist()


MATCH_ALL = Filter("", None)


def compile_filter(expression: str, tcpdump: str | None = None) -> Filter:
    """Compile a pcap-filter expression with tcpdump; raises FilterError with tcpdump's message."""
    expression = expression.strip()
    if not expression:
        return MATCH_ALL
    tcpdump = tcpdump or shutil.which("tcpdump")
    if tcpdump is None:
        raise FilterError("tcpdump not found: filters are compiled by `tcpdump -ddd`; install tcpdump (scripts/setup.sh does)")
    try:
        completed = subprocess.run(
            [tcpdump, "-ddd", "-y", "EN10MB", "--", expression],
            capture_output=True,
            text=True,
            timeout=TCPDUMP_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise FilterError(f"compiling filter {expression!r} timed out after {TCPDUMP_TIMEOUT:g} s") from None
    if completed.returncode != 0:
        message = f"exit status {completed.returncode}"
        if completed.stderr.strip():
            message = completed.stderr.strip().splitlines()[-1]
        raise FilterError(f"invalid filter {expression!r}: {message.removeprefix('tcpdump: ')}")
    return Filter(expression, check_program(parse_program(completed.stdout)))


def parse_program(text: str) -> list[list[int]]:
    """Parse `tcpdump -ddd` output: an instruction count, then one `code jt jf k` line per instruction."""
    lines = [line.split() for line in text.strip().splitlines()]
    try:
        count = int(lines[0][0])
        rows = [[int(field) for field in line] for line in lines[1:]]
    except (IndexError, ValueError):
        raise FilterError(f"unexpected tcpdump -ddd output: {text[:200]!r}") from None
    if len(rows) != count or any(len(row) != 4 for row in rows):
        raise FilterError(f"tcpdump -ddd announced {count} instructions but printed {len(rows)} rows of 4 numbers")
    return rows


def check_program(rows) -> np.ndarray:
    """Check a BPF program (rows of code, jt, jf, k) and return it as an int64 array; raises FilterError."""
    try:
        program = np.array(rows, dtype=np.int64).reshape(-1, 4)
    except (TypeError, ValueError, OverflowError):
        raise FilterError("invalid BPF program: expected rows of four integers (code, jt, jf, k)") from None
    size = len(program)
    if not 1 <= size <= MAX_INSTRUCTIONS:
        raise FilterError(f"invalid BPF program: {size} instructions (1 to {MAX_INSTRUCTIONS} allowed)")
    for pc, (code, jt, jf, k) in enumerate(program.tolist()):
        where = f"invalid BPF program: instruction {pc} ({code} {jt} {jf} {k})"
        if code not in OPCODES:
            raise FilterError(f"{where}: unknown opcode")
        if not (0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k <= U32):
            raise FilterError(f"{where}: jt and jf must be 0-255 and k 0-{U32}")
        if code in CONDITIONAL_JUMPS and (pc + 1 + jt >= size or pc + 1 + jf >= size):
            raise FilterError(f"{where}: jump beyond the last instruction")
        if code == JMP_JA and pc + 1 + k >= size:
            raise FilterError(f"{where}: jump beyond the last instruction")
        if code in MEMORY_OPS and k >= MEMWORDS:
            raise FilterError(f"{where}: scratch memory has {MEMWORDS} words")
        if code in (ALU_DIV_K, ALU_MOD_K) and k == 0:
            raise FilterError(f"{where}: division by zero")
    if int(program[-1, 0]) not in (RET_K, RET_A):
        raise FilterError("invalid BPF program: the last instruction must return (ret)")
    return program


# ---------------------------------------------------------------------------
# Running filters over batches


class FilterSet:
    """Several filters packed into one program table, run over a batch in one call.

    `tunnel_ports` marks the port ids whose frames are matched on the inner
    VXLAN frame (the VTEP ports). Filters that match everything take a row of
    ones without running.
    """

    def __init__(self, filters: list[Filter], tunnel_ports: np.ndarray, capacity: int = 64):
        self.filters = list(filters)
        self.tunnel_ports = np.asarray(tunnel_ports, dtype=np.bool_)
        running = [f for f in self.filters if not f.matches_all]
        self._rows = [i for i, f in enumerate(self.filters) if not f.matches_all]
        self._all_rows = [i for i, f in enumerate(self.filters) if f.matches_all]
        if running:
            self.program = np.concatenate([f.program for f in running])
            self.sizes = np.array([len(f.program) for f in running], dtype=np.int64)
        else:
            self.program = np.zeros((0, 4), dtype=np.int64)
            self.sizes = np.zeros(0, dtype=np.int64)
        self.starts = np.zeros(len(running), dtype=np.int64)
        np.cumsum(self.sizes[:-1], out=self.starts[1:])
        self._out = np.zeros((len(running), capacity), dtype=np.uint8)
        self._count = 0

    def match(self, buf, offsets, lengths, ports, count: int) -> int:
        """Match these frames and return how many of them some filter selects; `matched` then has the details.

        This runs once per batch on the live path, so it does no more than
        the one numba call.
        """
        if count > self._out.shape[1]:
            self._out = np.zeros((len(self._rows), count), dtype=np.uint8)
        self._count = count
        hits = 0
        if self._rows:
            hits = run_filters(self.program, self.starts, self.sizes, buf, offsets, lengths, ports, self.tunnel_ports, count, self._out)
        return count if self._all_rows else hits

    @property
    def matched(self) -> np.ndarray:
        """(filters, frames) bool array of the last `match`: row f, column i is True when filter f selects frame i."""
        count = self._count
        matched = np.zeros((len(self.filters), count), dtype=np.bool_)
        if self._rows:
            matched[self._rows] = self._out[:, :count]
        if self._all_rows:
            matched[self._all_rows] = True
        return matched

    def match_batch(self, batch) -> int:
        return self.match(batch.buf, batch.offsets, batch.lengths, batch.ports, batch.count)

    def match_frames(self, frames: list[bytes], ports) -> np.ndarray:
        """Match a list of frames (for example emitted ones); returns a (filters, frames) bool array."""
        count = len(frames)
        lengths = np.fromiter(map(len, frames), dtype=np.int64, count=count)
        offsets = np.zeros(count, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        buf = np.frombuffer(b"".join(frames), dtype=np.uint8) if count else np.zeros(0, dtype=np.uint8)
        self.match(buf, offsets, lengths, np.asarray(ports, dtype=np.int32), count)
        return self.matched


def matches(expression_or_filter, frames: list[bytes], tunnel: list[bool] | None = None) -> list[bool]:
    """Return which frames one filter selects; `tunnel[i]` matches frame i on its inner VXLAN frame."""
    flt = expression_or_filter if isinstance(expression_or_filter, Filter) else compile_filter(expression_or_filter)
    tunnel = tunnel or [False] * len(frames)
    filters = FilterSet([flt], np.array([False, True]))
    result = filters.match_frames(frames, [1 if t else 0 for t in tunnel])
    return result[0].tolist()
