"""Batch export speed: ``recommend_all`` (what ``towerline recommend`` runs) on a slice of users.

    python bench/batch_export.py --model /work/artifacts/beauty_run/bundle --users 2000
    python bench/batch_export.py --model runs/beauty/bundle --users 2000 --profile      # cProfile top functions
    python bench/batch_export.py --model runs/beauty/bundle --users all --out /tmp/recs.parquet

Measures the export alone (the model is loaded first and not counted): wall seconds, CPU seconds of
this process (``time.process_time``: every thread, so the figure that does not depend on how busy
the shared machine is), users per second, and the load average before and after. The whole command
with start-up is what ``/usr/bin/time -v towerline recommend ...`` reports; the README row has both.
It uses only ``recommend_all``'s long-standing arguments, so the same script runs against an older
checkout to compare CPU seconds side by side. Writes bench/results/batch_export.json (or --json).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundle directory (with ranker/ for the full pipeline)")
    p.add_argument("--users", default="2000", help="'all', or N: the model's first N users (default: 2000)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="users per model call (default: recommend_all's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--workers", type=int, default=None, help="recommend_all's worker threads (default: its own)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs; the median is reported")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions (one extra run)")
    p.add_argument("--out", default=None, help="also write the rows here (.parquet/.csv), as the CLI does")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "batch_export.json")
    p.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before/after)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from towerline.serving.batch import known_users, recommend_all
    from towerline.serving.recommender import load_model
    from towerline.serving.settings import ServeSettings

    torch.set_num_threads(args.threads)
    settings = ServeSettings(threads=args.threads)
    state = load_model(args.model, settings)
    users = known_users(state)
    if args.users != "all":
        users = users[: int(args.users)]
    kwargs = {"k": args.k, "settings": settings}
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.workers:
        kwargs["workers"] = args.workers  # newer recommend_all only
    recommend_all(state, users[:64], **kwargs)  # warm-up: lazy tables, allocator, BLAS

    load_before = os.getloadavg()
    walls, cpus, rows = [], [], 0
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = recommend_all(state, users, out=args.out, progress=False, **kwargs)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        rows = result["rows"] if isinstance(result, dict) else len(result)
    load_after = os.getloadavg()
    summary = {
        "label": args.label, "model": str(args.model), "users": len(users), "rows": int(rows), "k": args.k,
        "threads": args.threads, "workers": args.workers, "batch_size": args.batch_size, "repeats": args.repeats,
        "wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)),
        "users_per_s_wall": len(users) / float(np.median(walls)), "loadavg_before": load_before,
        "loadavg_after": load_after, "ranker": state.ranker is not None, "n_candidates": state.n_candidates,
        "source": str(Path(sys.modules["towerline.serving.batch"].__file__).resolve().parents[1]),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"{summary['label'] or 'run'}: {len(users)} users, {rows} rows: wall {summary['wall_s']:.2f} s, "
          f"CPU {summary['cpu_s']:.2f} s ({summary['users_per_s_wall']:.0f} users/s wall), "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    if args.profile:
        # cProfile sees only its own thread: drive recommend_all's chunk coroutine in this one
        import asyncio

        from towerline.serving import batch
        from towerline.serving.recommender import Recommender

        stages = batch.GatherStages(settings)
        recommender = Recommender(state, settings, batch.NoOnlineHistory(), stages)
        loop = asyncio.new_event_loop()
        size = args.batch_size or batch.DEFAULT_BATCH_SIZE
        prof = cProfile.Profile()
        prof.enable()
        for lo in range(0, len(users), size):
            chunk = users[lo : lo + size]
            batch.result_frame(chunk, loop.run_until_complete(batch._answer_chunk(recommender, stages, chunk, args.k)))
        prof.disable()
        loop.close()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    runs = previous.get("runs", []) if isinstance(previous, dict) else []
    runs.append(summary)
    args.json.write_text(json.dumps({"runs": runs[-20:]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
