"""Scale benchmark for the features step: 10 million synthetic events -> vocabularies, sequences, splits.

Not a test (it takes a minute and most of the machine): the target it checks is the issue's, on the
2-core development machine, for the features step (vocabularies + sequences + both splits):
<= 60 s wall time and <= 4 GiB peak resident memory. Generation is timed separately because it
stands in for reading files, which the target does not cover.

Peak memory is the process high-water mark (``getrusage`` ``ru_maxrss``), so it includes
generation; ``rss_after_generate_gib`` is printed beside it to show what the features step added.
tracemalloc would be exact but slows numpy-heavy code several-fold, so it is not used.

    python bench/data_scale.py --events 10000000 --out bench/results/data_scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

TARGET_FEATURES_S = 60.0
TARGET_PEAK_GIB = 4.0


def peak_rss_gib() -> float:
    """Process high-water mark of resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_benchmark(n_events: int, n_users: int, n_items: int, seed: int = 0) -> dict:
    """Generate ``n_events`` synthetic events, then time each features step; returns the figures."""
    from towerline.features.sequences import build_sequences
    from towerline.features.splits import split_by_time, split_leave_one_out
    from towerline.features.synthetic import generate_dataset
    from towerline.features.vocab import build_vocabs

    t = time.perf_counter()
    dataset = generate_dataset(n_users, n_items, seed, n_events=n_events, progress=True)
    generate_s = time.perf_counter() - t
    rss_after_generate = current_rss_gib()
    print(f"generate        {generate_s:7.2f} s  ({len(dataset.events):,} events, "
          f"rss {rss_after_generate:.2f} GiB)", flush=True)

    steps: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        steps[name] = round(time.perf_counter() - t0, 3)
        print(f"{name:<20}{steps[name]:7.2f} s  (peak rss {peak_rss_gib():.2f} GiB)", flush=True)
        return out

    vocabs = timed("build_vocabs", build_vocabs, dataset)
    seqs = timed("build_sequences", build_sequences, dataset.events, vocabs)
    loo = timed("split_leave_one_out", split_leave_one_out, seqs)
    by_time = timed("split_by_time", split_by_time, seqs)
    features_s = sum(steps.values())
    return {
        "events": len(dataset.events),
        "users": n_users,
        "items": n_items,
        "seed": seed,
        "sequence_steps": int(seqs.n_events),
        "loo_test_users": len(loo.test),
        "time_test_users": len(by_time.test),
        "generate_s": round(generate_s, 3),
        "features_s": round(features_s, 3),
        "rss_after_generate_gib": round(rss_after_generate, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "steps": steps,
        "cpu_count": os.cpu_count(),
        "target": {"features_s": TARGET_FEATURES_S, "peak_rss_gib": TARGET_PEAK_GIB},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time the features step (vocabularies, sequences, splits) on synthetic events.",
        epilog="example:\n  python bench/data_scale.py --events 10000000 --out bench/results/data_scale.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=10_000_000, help="event rows (default 10M)")
    parser.add_argument("--users", type=int, default=None, help="users (default events / 20)")
    parser.add_argument("--items", type=int, default=50_000, help="catalogue size (default 50,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_scale.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    n_users = args.users or max(1, args.events // 20)
    result = run_benchmark(args.events, n_users, args.items, args.seed)
    result["command"] = shlex.join(["python", "bench/data_scale.py", *(argv or sys.argv[1:])])
    ok = result["features_s"] <= TARGET_FEATURES_S and result["peak_rss_gib"] <= TARGET_PEAK_GIB
    print(f"features total  {result['features_s']:7.2f} s  (target <= {TARGET_FEATURES_S:.0f} s)")
    print(f"peak rss        {result['peak_rss_gib']:7.2f} GiB (target <= {TARGET_PEAK_GIB:.0f} GiB)")
    print("within target" if ok else "OUTSIDE TARGET")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
