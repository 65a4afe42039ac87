"""Benchmark tapnet.nat.Conntrack: insert and lookup cost, and memory per entry.

For each table size N it fills a table of capacity N with N UDP connections
and measures:

- insert, batch: `create_many` of all N connections into an empty table;
- insert, single: `create` of the last K connections, one Python call each,
  into a table already holding N - K;
- lookup, batch: `lookup_many` over random existing tuples (both directions),
  in calls of 256 tuples (a datapath batch) and as one call over all queries;
- lookup, single: `lookup`, one Python call per tuple;
- bytes per entry: `Conntrack.nbytes / capacity`.

Each figure is the best of `--repeat` runs. It prints ratios against the
goals: lookup at 1,000,000 entries within 1.5x of the cost at 1,000, and
under 300 bytes per entry. Not run by CI. Nothing here touches the network.

    PYTHONPATH=. python perf/bench_conntrack.py [--sizes 1000 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tapnet import nat

LOOKUP_GOAL_RATIO = 1.5  # lookup cost at the largest size / cost at the smallest
BYTES_PER_ENTRY_GOAL = 300
DATAPATH_BATCH = 256  # tuples per lookup_many call, as in a batch of frames
SINGLE_OPERATIONS = 100_000  # Python calls timed for the single-call figures
QUERIES = 1_000_000  # lookups per batch measurement, whatever the table size
VIP = 0x0AFF0003  # 10.255.0.3
BACKEND = 0x0A000105  # 10.0.1.5


def flows(n: int, rng: np.random.Generator):
    """Return n distinct UDP flows to one VIP, DNATed to one backend, as (orig, reply) column tuples."""
    # Distinct 31-bit keys give distinct (client address, client port) pairs,
    # with client addresses in 10.128.0.0/17.
    keys = rng.choice(1 << 31, size=n, replace=False)
    clients = (0x0A800000 + (keys >> 16)).astype(np.int64)
    ports = (keys & 0xFFFF).astype(np.int64)
    orig = (clients, ports, np.full(n, VIP, dtype=np.int64), np.full(n, 53, dtype=np.int64))
    reply = (np.full(n, BACKEND, dtype=np.int64), np.full(n, 5353, dtype=np.int64), clients, ports)
    return orig, reply


def best_of(repeat: int, run) -> float:
    return min(run() for _ in range(repeat))


def measure_size(n: int, repeat: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    orig, reply = flows(n, rng)
    protos = np.full(n, nat.IPPROTO_UDP, dtype=np.int64)
    results: dict[str, float] = {}

    def batch_insert() -> float:
        ct = nat.Conntrack(max_entries=n)
        start = time.perf_counter()
        ids = ct.create_many(protos, orig, reply, now=0.0)
        elapsed = time.perf_counter() - start
        assert (ids >= 0).all(), "a benchmark flow was rejected"
        return elapsed / n * 1e9

    results["insert_batch_ns"] = best_of(repeat, batch_insert)

    singles = min(SINGLE_OPERATIONS, n)
    prefill = n - singles
    # One row per single insert: the orig columns, then the reply columns, as Python ints.
    single_rows = list(zip(*(column[prefill:].tolist() for column in (*orig, *reply))))

    def single_insert() -> float:
        ct = nat.Conntrack(max_entries=n)
        ct.create_many(protos[:prefill], [c[:prefill] for c in orig], [c[:prefill] for c in reply], now=0.0)
        start = time.perf_counter()
        for o_src, o_sport, o_dst, o_dport, r_src, r_sport, r_dst, r_dport in single_rows:
            ct.create(17, (o_src, o_sport, o_dst, o_dport), (r_src, r_sport, r_dst, r_dport), now=0.0)
        return (time.perf_counter() - start) / singles * 1e9

    results["insert_single_ns"] = best_of(repeat, single_insert)

    ct = nat.Conntrack(max_entries=n)
    ct.create_many(protos, orig, reply, now=0.0)
    results["bytes_per_entry"] = ct.nbytes / ct.capacity

    # Queries: random existing entries, half in the original and half in the reply direction.
    pick = rng.integers(0, n, size=QUERIES)
    as_reply = rng.random(QUERIES) < 0.5
    q_src = np.where(as_reply, reply[0][pick], orig[0][pick])
    q_sport = np.where(as_reply, reply[1][pick], orig[1][pick])
    q_dst = np.where(as_reply, reply[2][pick], orig[2][pick])
    q_dport = np.where(as_reply, reply[3][pick], orig[3][pick])
    q_proto = np.full(QUERIES, nat.IPPROTO_UDP, dtype=np.int64)
    ids, directions = ct.lookup_many(q_proto, q_src, q_sport, q_dst, q_dport, now=1.0)
    assert (ids >= 0).all(), "lookup missed an existing entry"
    assert (directions == as_reply).all(), "lookup returned the wrong direction"

    def batch_lookup_chunks() -> float:
        start = time.perf_counter()
        for lo in range(0, QUERIES, DATAPATH_BATCH):
            hi = lo + DATAPATH_BATCH
            ct.lookup_many(q_proto[lo:hi], q_src[lo:hi], q_sport[lo:hi], q_dst[lo:hi], q_dport[lo:hi], now=1.0)
        return (time.perf_counter() - start) / QUERIES * 1e9

    def batch_lookup_one_call() -> float:
        out_ids = np.empty(QUERIES, dtype=np.int64)
        out_dirs = np.empty(QUERIES, dtype=np.int64)
        start = time.perf_counter()
        nat._lookup_many(ct.slots, ct.table, ct.meta, q_proto, q_src, q_sport, q_dst, q_dport, 1.0, out_ids, out_dirs)
        return (time.perf_counter() - start) / QUERIES * 1e9

    single_queries = list(zip(*(column[:SINGLE_OPERATIONS].tolist() for column in (q_src, q_sport, q_dst, q_dport))))

    def single_lookup() -> float:
        lookup = ct.lookup
        start = time.perf_counter()
        for src, sport, dst, dport in single_queries:
            lookup(17, src, sport, dst, dport, 1.0)
        return (time.perf_counter() - start) / len(single_queries) * 1e9

    results["lookup_batch256_ns"] = best_of(repeat, batch_lookup_chunks)
    results["lookup_batch_all_ns"] = best_of(repeat, batch_lookup_one_call)
    results["lookup_single_ns"] = best_of(repeat, single_lookup)
    return results


def warm_up() -> None:
    """Compile (or load from numba's cache) every jitted function the benchmark calls."""
    ct = nat.Conntrack(max_entries=16)
    orig, reply = flows(8, np.random.default_rng(0))
    ct.create_many(np.full(8, 17), orig, reply, now=0.0)
    ct.create(17, (1, 1, 2, 2), (3, 3, 1, 1), now=0.0)
    ct.lookup(17, 1, 1, 2, 2, 0.0)
    ct.lookup_many(np.full(8, 17), *orig, now=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000], help="table sizes in entries")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, of which the best is reported")
    parser.add_argument("--seed", type=int, default=1, help="seed of the flows and queries")
    args = parser.parse_args()

    warm_up()
    table = {n: measure_size(n, args.repeat, args.seed) for n in args.sizes}

    columns = [
        ("insert_batch_ns", "insert, batch (ns)"),
        ("insert_single_ns", "insert, single (ns)"),
        ("lookup_batch256_ns", "lookup, batch of 256 (ns)"),
        ("lookup_batch_all_ns", "lookup, one call (ns)"),
        ("lookup_single_ns", "lookup, single (ns)"),
        ("bytes_per_entry", "bytes per entry"),
    ]
    print(f"{'entries':>10} " + " ".join(f"{title:>26}" for _, title in columns))
    for n, results in table.items():
        print(f"{n:>10} " + " ".join(f"{results[key]:>26.1f}" for key, _ in columns))

    smallest, largest = min(table), max(table)
    print()
    for key in ("lookup_batch256_ns", "lookup_batch_all_ns", "lookup_single_ns"):
        ratio = table[largest][key] / table[smallest][key]
        verdict = "meets" if ratio <= LOOKUP_GOAL_RATIO else "misses"
        print(f"{key}: {largest} / {smallest} entries = {ratio:.2f}x ({verdict} the goal of {LOOKUP_GOAL_RATIO}x)")
    per_entry = table[largest]["bytes_per_entry"]
    verdict = "meets" if per_entry < BYTES_PER_ENTRY_GOAL else "misses"
    print(f"bytes per entry at {largest}: {per_entry:.1f} ({verdict} the goal of < {BYTES_PER_ENTRY_GOAL})")


if __name__ == "__main__":
    main()
