"""Benchmark: does item -> audience find an item's real next buyers better than "most active users"?

Protocol (leave-one-out, as the S3Rec papers evaluate Beauty): every user's last step is hidden.
User vectors are computed from the remaining history; for each item that is some users' hidden
last step ("its real next buyers"), ``find_audience`` picks N users, excluding users who already
interacted with it. The score is the fraction of the item's real next buyers that the audience
contains (recall@N), averaged over items (macro) and pooled over buyers (micro), against two
baselines at the same N, with the same exclusions:

* **RFM-style**: the N most active users (most steps in their history), the list a campaign
  without a model would use;
* **random**: N eligible users drawn uniformly (its expected recall, N / eligible users);
* the heuristics a marketer would use (``marketing.audience_baselines``): **affinity** (users who
  recently touched the item's category or brand; attribute tokens weighted by idf) and
  **co-visitation** (users whose recent items co-occur with the item, cosine-normalised).

"audience" is what ``find_audience`` serves: with the bundle's learned scorer
(``audience_scorer.json``, ``marketing/audience_scorer.py``; ``--fit-scorer`` fits it on the
validation step first, as ``towerline audience-scorer`` does) the model's ``log p(item | user)``
combined with co-visitation and category/brand evidence, called once per size N as the product
would be; "audience_model" is the model alone (``scoring="probability"``).

Targets: audience >= 3x the RFM-style baseline, and >= 1.5x the best heuristic. Usage::

    python bench/audience.py --model runs/beauty/bundle --fit-scorer   # a trained Beauty bundle
    python bench/audience.py --budget-s 300                            # train one with configs/beauty.yaml first

Writes ``bench/results/audience.json`` with the command line, the model and every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.audience")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="bundle directory or runs:/ / models:/ URI trained on the data")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "beauty.yaml", help="config to train with when no --model")
    p.add_argument("--budget-s", type=float, default=300.0, help="training time budget when no --model (seconds)")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench_audience", help="where the training run goes")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="audience sizes N")
    p.add_argument("--max-items", type=int, default=2000, help="items evaluated (sampled with --seed); 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch/FAISS threads (the box is shared)")
    p.add_argument("--recent", type=int, default=20, help="heuristics: a user's last N items count")
    p.add_argument("--half-life", type=float, default=10.0, help="heuristics: recency half-life in steps")
    p.add_argument("--covisit-window", type=int, default=3, help="co-visitation: pairs within this many steps")
    p.add_argument("--fit-scorer", action="store_true",
                   help="fit the learned audience scorer on the validation step and write it into the bundle first")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "audience.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from towerline.training.bundle import load_bundle

    t0 = time.perf_counter()
    model, train_info = args.model, None
    if model is None:
        model, train_info = _train(args)
    bundle = load_bundle(model)
    scorer_info = None
    if args.fit_scorer:
        from towerline.marketing.audience_scorer import fit_scorer, save_scorer, scorer_path

        t = time.perf_counter()
        path = save_scorer(fit_scorer(bundle, seed=args.seed), scorer_path(bundle))
        scorer_info = {"path": str(path), "seconds": round(time.perf_counter() - t, 1)}
        bundle = load_bundle(model)
    result = evaluate(bundle, args.sizes, args.max_items, args.seed,
                      heuristics={"recent": args.recent, "half_life": args.half_life, "window": args.covisit_window})
    result.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        model=str(model),
        training=train_info,
        scorer_fit=scorer_info,
        seconds_total=round(time.perf_counter() - t0, 1),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for n in args.sizes:
        r = result["sizes"][str(n)]
        print(f"N={n:>5}: audience {r['audience']['macro']:.4f} (micro {r['audience']['micro']:.4f}; model alone "
              f"{r['audience_model']['macro']:.4f}, dot {r['audience_dot']['macro']:.4f})  "
              f"RFM {r['rfm']['macro']:.4f}  random {r['random']['macro']:.4f}  "
              f"audience/RFM {_x(r['audience_over_rfm_macro'])} (micro {_x(r['audience_over_rfm_micro'])})  "
              f"affinity {r['affinity']['macro']:.4f}  co-visitation {r['covisit']['macro']:.4f}  "
              f"audience/best heuristic {_x(r['audience_over_best_heuristic_macro'])} "
              f"(micro {_x(r['audience_over_best_heuristic_micro'])}; target 1.5x)")
    report = (result.get("scorer") or {}).get("fitted", {}).get("validation_recall")
    if report:  # what the fit chose by: held-out items of the validation step
        print("scorer on held-out validation items: " + "; ".join(
            f"N={n} {report[str(n)]['audience']['macro']:.4f} ({report[str(n)]['audience_over_best_heuristic_macro']}x "
            f"the best heuristic)" for n in args.sizes if str(n) in report))
    print(f"written {args.out}")
    return 0


def _train(args: argparse.Namespace) -> tuple[str, dict]:
    from towerline.config import load_config
    from towerline.training.train import train

    overrides = [f"trainer.max_time_s={args.budget_s}", f"tracking.tracking_uri=sqlite:///{args.run_dir / 'mlflow.db'}",
                 "tracking.register=false"]
    args.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, overrides)
    start = time.perf_counter()
    res = train(cfg, args.run_dir, progress=False)
    info = {"config": str(args.config), "overrides": overrides, "seconds": round(time.perf_counter() - start, 1),
            "epochs": res.metrics.get("train/epochs"), "test_ndcg_10": res.metrics.get("test/ndcg_10"),
            "test_hr_10": res.metrics.get("test/hr_10")}
    return str(res.bundle_dir), info


def evaluate(bundle, sizes: list[int], max_items: int, seed: int, heuristics: dict | None = None) -> dict:
    """Recall@N of the model's audiences and of the baselines, on the leave-one-out test step."""
    from towerline.features.splits import split_leave_one_out
    from towerline.marketing import audience_baselines as ab
    from towerline.marketing.audience import find_audience, log_partition, user_vectors
    from towerline.marketing.audience_scorer import Evidence, HeuristicParams, item_attribute_lists, load_scorer
    full = bundle.histories
    split = split_leave_one_out(full, bundle.config.data.min_user_events)
    test = split.test
    # every user keeps their history up to (not including) their hidden test step
    lengths = full.lengths.copy()
    lengths[test.rows] = test.history_end - full.offsets[:-1][test.rows]
    past = full.truncate(lengths)
    view = dataclasses.replace(bundle, histories=past)

    t = time.perf_counter()
    ids, vectors = user_vectors(view)
    log_z = log_partition(view, vectors)
    vec_s = time.perf_counter() - t

    buyers = pd.DataFrame({"user": view.vocabs.users.decode(full.user_idx[test.rows]), "item": test.targets})
    by_item = buyers.groupby("item")["user"].agg(set)
    items = by_item.index.to_numpy()
    rng = np.random.default_rng(seed)
    if max_items and len(items) > max_items:
        items = np.sort(rng.choice(items, max_items, replace=False))

    # RFM-style baseline: users by history length, most active first (ties broken at random, seeded)
    activity = pd.Series(past.lengths, index=view.vocabs.users.decode(past.user_idx))
    tiebreak = rng.random(len(activity))
    active_order = activity.index.to_numpy()[np.lexsort((tiebreak, -activity.to_numpy()))]
    row_of_step = np.repeat(np.arange(len(past)), past.lengths)
    past_ids = view.vocabs.users.decode(past.user_idx)

    # marketer heuristics over the same past histories (the matrices the learned scorer reads too)
    hp = heuristics or {"recent": 20, "half_life": 10.0, "window": 3}
    t = time.perf_counter()
    attrs = item_attribute_lists(view)
    ev = Evidence.from_histories(past, past_ids, attrs, HeuristicParams(**hp))
    W, A, UT, C = ev.W, ev.A, ev.UT, ev.C
    heuristics_s = time.perf_counter() - t
    scorer = load_scorer(view)
    scorer_ev = None
    if scorer is not None:  # the product's evidence: the scorer's own heuristic settings
        scorer_ev = ev if scorer.heuristics == HeuristicParams(**hp) else Evidence.from_histories(past, past_ids, attrs, scorer.heuristics)

    n_max = max(sizes)
    hits = {k: {n: [] for n in sizes} for k in ("audience", "audience_model", "audience_dot", "rfm", "random", "affinity", "covisit")}
    n_buyers = []
    t = time.perf_counter()
    for i, item_idx in enumerate(items):
        item_id = str(view.vocabs.items.decode([item_idx])[0])
        truth = by_item[item_idx]
        n_buyers.append(len(truth))
        seen = set(past_ids[row_of_step[past.item_idx == item_idx]])
        eligible = len(ids) - len(seen)
        model = find_audience(view, vectors, ids, item_id=item_id, size=n_max, scoring="probability", log_z=log_z,
                              exclude="interacted")["user_id"].to_numpy()
        dot = find_audience(view, vectors, ids, item_id=item_id, size=n_max, scoring="dot", exclude="interacted")["user_id"].to_numpy()
        # what the product serves at each size (the learned scorer's candidate pool grows with the size)
        served = {n: model for n in sizes} if scorer is None else {
            n: find_audience(view, vectors, ids, item_id=item_id, size=n, scoring="learned", log_z=log_z,
                             exclude="interacted", evidence=scorer_ev)["user_id"].to_numpy() for n in sizes}
        rfm = [u for u in active_order[: n_max + len(seen)] if u not in seen][:n_max]
        excluded = np.zeros(len(past), bool)
        excluded[row_of_step[past.item_idx == item_idx]] = True
        aff = past_ids[ab.top_users(ab.affinity_scores(W, A, int(item_idx), UT), n_max, excluded, past.lengths, seed)].tolist()
        cov = past_ids[ab.top_users(ab.covisitation_scores(W, C, int(item_idx)), n_max, excluded, past.lengths, seed)].tolist()
        for n in sizes:
            hits["audience"][n].append(len(truth & set(served[n][:n])))
            hits["audience_model"][n].append(len(truth & set(model[:n])))
            hits["audience_dot"][n].append(len(truth & set(dot[:n])))
            hits["rfm"][n].append(len(truth & set(rfm[:n])))
            hits["affinity"][n].append(len(truth & set(aff[:n])))
            hits["covisit"][n].append(len(truth & set(cov[:n])))
            hits["random"][n].append(len(truth) * min(n, eligible) / max(eligible, 1))  # expectation
        if (i + 1) % 250 == 0:
            log.info("%d / %d items", i + 1, len(items))
    search_s = time.perf_counter() - t

    nb = np.asarray(n_buyers, dtype=np.float64)
    out = {"sizes": {}}
    for n in sizes:
        row = {}
        for k in hits:
            h = np.asarray(hits[k][n], dtype=np.float64)
            row[k] = {"macro": float(np.mean(h / nb)), "micro": float(h.sum() / nb.sum())}
        row["audience_over_model_macro"] = _ratio(row["audience"]["macro"], row["audience_model"]["macro"])
        row["audience_over_rfm_macro"] = _ratio(row["audience"]["macro"], row["rfm"]["macro"])
        row["audience_over_rfm_micro"] = _ratio(row["audience"]["micro"], row["rfm"]["micro"])
        row["audience_over_random_macro"] = _ratio(row["audience"]["macro"], row["random"]["macro"])
        best = max(("affinity", "covisit"), key=lambda k: row[k]["macro"])
        row["best_heuristic"] = best
        row["audience_over_best_heuristic_macro"] = _ratio(row["audience"]["macro"], row[best]["macro"])
        row["audience_over_best_heuristic_micro"] = _ratio(row["audience"]["micro"], max(row["affinity"]["micro"], row["covisit"]["micro"]))
        out["sizes"][str(n)] = row
    out.update(
        dataset=bundle.config.data.name,
        users=int(len(ids)),
        test_users=int(len(test)),
        items_with_test_buyers=int(len(by_item)),
        items_evaluated=int(len(items)),
        buyers_evaluated=int(nb.sum()),
        model_metrics={k: bundle.metrics.get(k) for k in ("test/ndcg_10", "test/hr_10", "train/epochs")},
        audience_scoring="learned (audience_scorer.json)" if scorer is not None else "probability (no audience_scorer.json)",
        scorer=scorer.model_dump() if scorer is not None else None,
        seconds_user_vectors=round(vec_s, 1),
        seconds_heuristic_matrices=round(heuristics_s, 1),
        heuristics=hp,
        seconds_per_item=round(search_s / max(len(items), 1), 4),
        protocol="leave-one-out; hidden last step = the item's next buyers; users who interacted with the item "
                 "before are excluded from every method; recall@N averaged over items (macro) and pooled (micro)",
    )
    return out


def _x(r: float | None) -> str:
    return "n/a (RFM found none)" if r is None else f"{r:.1f}x"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


if __name__ == "__main__":
    sys.exit(main())
