"""Quality benchmark: train the shared configs on the public S3Rec data sets, full-ranking metrics.

    python bench/quality.py                          # Beauty and LastFM with their configs
    python bench/quality.py --datasets lastfm --seeds 42 43 44   # spread over seeds
    python bench/quality.py --datasets beauty --refit           # + the test model refit on train+valid
    python bench/quality.py --datasets beauty --work W --resume --set trainer.max_epochs=N  # finish a cut run
    python bench/quality.py --datasets beauty --merge A.json B.json C.json --out S.json  # one seed per file -> spread

Writes bench/results/quality.json: per data set the test metrics (masked and unmasked), time per
epoch, the validation NDCG@10 curve against wall time, the targets and whether each was met. With
several seeds, each seed's run is kept and ``summary`` gives mean, standard deviation, min and max
of the headline metrics. ``--refit`` trains a second model per seed with ``trainer.refit=true`` for
the epoch count validation chose (the best epoch of the first run), and reports its test metrics
beside the first run's: the validation step then trains too, so no validation figure exists for it.
Runs in a temporary MLflow store unless --tracking-uri is given. ``--merge`` trains nothing: it
gathers the runs of result files written by separate processes (one seed each, run side by side on
one core apiece) and writes their per-seed headline figures and the same ``summary``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Published full-ranking, leave-one-out, history-masked figures and this project's targets.
TARGETS = {  # issue #15
    "beauty": {"test/ndcg_10": 0.0672, "test/hr_10": 0.111},
    "lastfm": {"test/ndcg_10": 0.050},
}
PUBLISHED = {
    "beauty": {"SASRec": (0.0318, 0.0605), "S3-Rec": (0.0327, 0.0647), "BSARec (AAAI 2024)": (0.0611, 0.1008)},
    "lastfm": {"S3-Rec": (0.0427, 0.0743)},
}
HEADLINE = ("test/ndcg_10", "test/hr_10", "test_unmasked/ndcg_10", "test_unmasked/hr_10", "valid/best_ndcg_10")


def run(dataset: str, overrides: list[str], tracking_uri: str, out: Path, resume: bool = False) -> dict:
    from towerline.config import load_config, to_dict
    from towerline.training.train import train

    cfg = load_config(REPO / "configs" / f"{dataset}.yaml", overrides + [f"tracking.tracking_uri={tracking_uri}"])
    t0 = time.perf_counter()
    result = train(cfg, out / dataset, resume=resume, progress=False)
    wall = time.perf_counter() - t0
    curve = result.curve
    per_epoch = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + curve[:-1], curve)]
    targets = TARGETS.get(dataset, {})
    met = {}
    for key, goal in targets.items():
        value = result.metrics.get(key)
        met[key] = {"target": goal, "value": value, "met": value is not None and value >= goal}
    return {
        "config": to_dict(cfg),
        "run_id": result.run_id,
        "wall_s": wall,
        # epochs fitted (the curve below is the best checkpoint's copy, which ends at the best epoch)
        "epochs": int(result.metrics.get("train/epochs", len(curve))),
        "seconds_per_epoch": sum(per_epoch) / max(len(per_epoch), 1),
        "metrics": result.metrics,
        "valid_ndcg_10_curve": [(round(p["elapsed_s"], 1), p.get("valid/ndcg_10")) for p in curve],
        "targets": met,
        "published": PUBLISHED.get(dataset, {}),
    }


def show(name: str, seed: int, r: dict) -> None:
    m = r["metrics"]
    print(f"{name} seed {seed}: test NDCG@10 {m['test/ndcg_10']:.4f}  HR@10 {m['test/hr_10']:.4f}  "
          f"NDCG@20 {m['test/ndcg_20']:.4f}  MRR {m['test/mrr']:.4f}  (unmasked NDCG@10 "
          f"{m['test_unmasked/ndcg_10']:.4f}); valid best {m.get('valid/best_ndcg_10', float('nan')):.4f}; "
          f"{r['epochs']} epochs, {r['seconds_per_epoch']:.1f} s/epoch")
    if "refit" in r:
        f = r["refit"]["metrics"]
        print(f"   refit on train+valid ({r['refit']['epochs']} epochs): test NDCG@10 {f['test/ndcg_10']:.4f}  "
              f"HR@10 {f['test/hr_10']:.4f}  (unmasked NDCG@10 {f['test_unmasked/ndcg_10']:.4f})")
    for key, t in r["targets"].items():
        print(f"   {key}: {t['value']} vs target {t['target']} -> {'met' if t['met'] else 'NOT met'}")


def summary(runs: list[dict], targets: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max over seeds of the headline metrics (and the refit's)."""
    import statistics

    out = {}
    series = {k: [r["metrics"][k] for r in runs if k in r["metrics"]] for k in HEADLINE}
    if all("refit" in r for r in runs):
        series.update({f"refit/{k}": [r["refit"]["metrics"][k] for r in runs] for k in HEADLINE[:4]})
    for key, xs in series.items():
        if xs:
            out[key] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                        "min": min(xs), "max": max(xs), "n": len(xs)}
            if key in targets:
                out[key]["target"] = targets[key]
                out[key]["mean_met"] = out[key]["mean"] >= targets[key]
    return out


# config keys that may differ between runs merged into one spread: the seed, and where each run logged
MERGE_FREE = ("trainer.seed", "tracking.tracking_uri")


def merge(paths: list[Path], dataset: str) -> dict:
    """``dataset``'s runs from result files of separate ``quality.py`` processes, as one spread.

    Runs are only comparable when they are the same protocol, so every run's config must equal the
    first's but for ``MERGE_FREE``, each seed may appear once, and a file cut short (``partial``) is
    refused: a spread that silently mixes epoch counts or drops a seed would read as a measurement.
    """
    runs, sources = [], []
    for path in paths:
        report = json.loads(Path(path).read_text())
        result = report.get("results", {}).get(dataset)
        if result is None:
            raise ValueError(f"{path}: no {dataset!r} result")
        if result.get("partial"):
            raise ValueError(f"{path}: the {dataset} runs were cut short (partial); finish them with --resume")
        for r in result.get("runs", [result]):
            runs.append(r)
            sources.append({"file": str(path), "command": report.get("command"), "seed": r["config"]["trainer"]["seed"]})
    if not runs:
        raise ValueError("--merge needs at least one result file")
    seeds = [s["seed"] for s in sources]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice in the merged runs: {seeds}")
    reference = _flat(runs[0]["config"])
    for r, src in zip(runs[1:], sources[1:]):
        diff = sorted(k for k in set(reference) | set(_flat(r["config"]))
                      if k not in MERGE_FREE and reference.get(k) != _flat(r["config"]).get(k))
        if diff:
            raise ValueError(f"{src['file']} (seed {src['seed']}) is not the same protocol as seed {seeds[0]}: {diff}")
    per_seed = [{"seed": s["seed"], "epochs": r["epochs"], "wall_s": r["wall_s"], "seconds_per_epoch": r["seconds_per_epoch"],
                 **{k: r["metrics"][k] for k in HEADLINE if k in r["metrics"]}} for r, s in zip(runs, sources)]
    return {"seeds": seeds, "sources": sources, "per_seed": per_seed, "summary": summary(runs, TARGETS.get(dataset, {}))}


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, the dotted keys ``--set`` takes."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["beauty", "lastfm"], choices=["beauty", "lastfm"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="trainer.seed of each run")
    parser.add_argument("--refit", action="store_true", help="also train the refit test model (trainer.refit)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--work", type=Path, default=None, help="runs, data and MLflow store here (default: a new temp folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --work from their last checkpoints, e.g. with a smaller "
                             "--set trainer.max_epochs to stop a cut run where it is and test its best epoch")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RESULT_JSON",
                        help="train nothing: merge these result files' runs into one spread per data set")
    parser.add_argument("--note", default=None, help="with --merge: a line on the protocol, kept in the output")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    args = parser.parse_args(argv)
    command = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    if args.merge:
        report = {"command": command, "results": {name: merge(args.merge, name) for name in args.datasets}}
        if args.note:
            report["note"] = args.note
        for name, result in report["results"].items():
            for key, st in result["summary"].items():
                print(f"{name} {key}: mean {st['mean']:.4f} sd {st['sd']:.4f} [{st['min']:.4f}, {st['max']:.4f}] n={st['n']}")
        write(args.out.resolve(), report)
        print(f"wrote {args.out}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="towerline-quality-"))
    if args.resume and not args.work:
        parser.error("--resume needs --work: the folder of the run to continue")
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)

    args.out = args.out.resolve()  # paths given on the command line are relative to where it ran
    os.chdir(work)  # MLflow puts run artifacts under ./mlruns: keep them out of the checkout
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    report = {"command": command, "results": {}}
    for name in args.datasets:
        runs = []
        for seed in args.seeds:
            sets = args.overrides + [f"trainer.seed={seed}"]
            r = run(name, sets, uri, work / f"seed{seed}", resume=args.resume)
            if args.refit:
                epochs = int(r["metrics"].get("best/epoch", r["epochs"] - 1)) + 1
                r["refit"] = run(name, sets + ["trainer.refit=true", f"trainer.max_epochs={epochs}"], uri,
                                 work / f"seed{seed}-refit")
            runs.append(r)
            show(name, seed, r)
            report["results"][name] = {"seeds": args.seeds[: len(runs)], "runs": runs, "partial": True}
            write(args.out, report)  # each finished run is on disk, should a later one be cut short
        report["results"][name] = runs[0] if len(runs) == 1 else {"seeds": args.seeds, "runs": runs,
                                                                    "summary": summary(runs, TARGETS.get(name, {}))}
        if len(runs) > 1:
            for key, st in report["results"][name]["summary"].items():
                print(f"{name} {key}: mean {st['mean']:.4f} sd {st['sd']:.4f} [{st['min']:.4f}, {st['max']:.4f}]")
    write(args.out, report)
    print(f"wrote {args.out}")
    return 0


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
