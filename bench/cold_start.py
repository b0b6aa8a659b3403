"""Cold-start benchmark: items never seen in training, served from their attributes alone.

    python bench/cold_start.py                               # Beauty, 240 s of training per model
    python bench/cold_start.py --max-time-s 120 --id-dropout 0.1 0.0

10% of Beauty's items (seeded) are held out of training entirely: their interactions are removed
from the sequences and they are left out of the training catalogue, but their attributes are kept.
After training, they enter the served model the way a new product does (``recommender.add_items``:
the item tower's attribute path, id part zeroed, appended to the exact index). The test users are
those whose last interaction (the leave-one-out test target) is a held-out item; each history is
everything before that target (held-out items in it get their cold vectors too), scored through the
serving retrieval path (``recommender.retrieve``, history masked) over *all* items, warm and cold.

Baselines over the same users and the same item set, history masked the same way:
- attribute popularity: an item's score is how often its attribute tokens occur in the user's
  history (a category/brand-popularity heuristic; S3Rec's attribute ids do not say which token is
  the category, so every token counts), ties broken by training popularity, then at random;
- attribute match: the same score, ties at random (ignores popularity, which cold items lack);
- random: the expected HR@50 of a random ranking, 50 / (items left after masking).

One model per ``--id-dropout`` value (DropoutNet, Volkovs et al., NeurIPS 2017), so the table also
shows what id dropout buys for cold items and costs warm items (test NDCG@10 on the warm split).
Writes bench/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEAUTY = Path("/work/shared/data/s3rec/Beauty.txt")
K = 50

log = logging.getLogger("bench.cold_start")


def split_items(txt: Path, attrs: Path, out: Path, share: float, seed: int) -> tuple[set[str], Path]:
    """Write the S3Rec files without the held-out items; returns (held-out ids, new .txt path)."""
    lines = [line.split() for line in txt.read_text().splitlines() if line.strip()]
    items = sorted({i for parts in lines for i in parts[1:]}, key=int)
    rng = np.random.default_rng(seed)
    cold = set(rng.choice(items, size=int(round(share * len(items))), replace=False).tolist())
    out.mkdir(parents=True, exist_ok=True)
    kept = [" ".join([p[0]] + [i for i in p[1:] if i not in cold]) for p in lines]
    new_txt = out / "Beauty.txt"
    new_txt.write_text("\n".join(k for k in kept if len(k.split()) > 1) + "\n")
    raw = json.loads(attrs.read_text())
    (out / "Beauty_item2attributes.json").write_text(json.dumps({k: v for k, v in raw.items() if k not in cold}))
    return cold, new_txt


def baseline_hits(histories, targets, item_tokens, popularity, n_items, rng) -> dict[str, float]:
    """HR@K of the attribute-popularity and attribute-match heuristics and of random ranking."""
    # item -> its attribute tokens as indices
    tok_index: dict[str, int] = {}
    rows = []
    for toks in item_tokens:
        rows.append([tok_index.setdefault(t, len(tok_index)) for t in toks])
    n_tok = max(len(tok_index), 1)
    hits = {"attribute_popularity": 0, "attribute_match": 0}
    random_hr = []
    # sparse item x token incidence as (item, token) pairs
    it_items = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)] or [np.zeros(0)]).astype(np.int64)
    it_toks = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows] or [np.zeros(0)]).astype(np.int64)
    for hist, target in zip(histories, targets):
        counts = np.zeros(n_tok)
        for i in hist:
            for t in rows[i]:
                counts[t] += 1
        score = np.bincount(it_items, weights=counts[it_toks], minlength=n_items)  # (V,)
        score[list(set(hist))] = -np.inf
        score[:2] = -np.inf  # reserved rows
        noise = rng.random(n_items)
        for name, key in (("attribute_popularity", popularity + noise * 0.5), ("attribute_match", noise)):
            order = np.lexsort((-key, -score))  # by score, then key, best first
            top = order[:K]
            hits[name] += int(target in set(top.tolist()))
        random_hr.append(K / max(int(np.isfinite(score).sum()), 1))
    n = max(len(targets), 1)
    return {**{k: v / n for k, v in hits.items()}, "random": float(np.mean(random_hr)) if random_hr else 0.0}


def run(id_dropout: float, data_txt: Path, cold: set[str], max_time_s: float, work: Path, seed: int) -> dict:
    from towerline.config import load_config
    from towerline.features.readers import read_s3rec
    from towerline.serving import recommender as rec
    from towerline.serving.settings import ServeSettings
    from towerline.training.train import train

    cfg = load_config(REPO / "configs" / "beauty.yaml", [
        f"data.path={data_txt}", f"model.id_dropout={id_dropout}", f"trainer.max_time_s={max_time_s}",
        f"trainer.seed={seed}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.register=false",
    ])
    t0 = time.perf_counter()
    result = train(cfg, work / f"run-drop{id_dropout}", progress=False)
    train_s = time.perf_counter() - t0

    full = read_s3rec(BEAUTY)  # the original data: held-out items, their attributes, the real histories
    items = full.items.set_index("item_id")
    state = rec.load_model(result.bundle_dir)
    cold_rows = [{"item_id": i, "attributes": list(items.loc[i, "attributes"])} for i in sorted(cold, key=int)]
    state, added = rec.add_items(state, cold_rows)
    vocab = state.bundle.vocabs.items

    ev = full.events.sort_values(["user_id", "timestamp"], kind="stable")
    histories, targets, users = [], [], []
    for user, g in ev.groupby("user_id", sort=False, observed=True):
        seq = g["item_id"].astype(str).to_numpy(dtype=object)
        if len(seq) < 2 or seq[-1] not in cold:
            continue
        idx = vocab.encode(seq)
        histories.append(idx[:-1])
        targets.append(int(idx[-1]))
        users.append(user)
    settings = ServeSettings(n_candidates=K)
    etype = state.bundle.vocabs.event_types.encode_one("interaction")
    hits = 0
    t1 = time.perf_counter()
    for lo in range(0, len(histories), 256):
        batch = [rec.UserHistory(h, np.full(len(h), etype, dtype=np.int64), np.arange(len(h), dtype=np.int64))
                 for h in histories[lo : lo + 256]]
        for (cand, _), target in zip(rec.retrieve(state, settings, batch), targets[lo : lo + 256]):
            hits += int(target in set(cand.tolist()))
    eval_s = time.perf_counter() - t1
    model_hr = hits / max(len(targets), 1)

    tokens = [[]] * state.n_items
    tokens = [list(items.loc[str(i), "attributes"]) if str(i) in items.index else [] for i in vocab.decode(np.arange(state.n_items))]
    pop = np.asarray(state.facts.popularity, dtype=np.float64)
    base = baseline_hits(histories, targets, tokens, pop, state.n_items, np.random.default_rng(seed))
    best_base = max(base["attribute_popularity"], base["attribute_match"])
    return {
        "id_dropout": id_dropout,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "cold_items": len(added.added),
        "cold_items_without_attributes": len(added.without_attributes),
        "test_users": len(targets),
        f"model_hr_{K}": model_hr,
        f"baselines_hr_{K}": base,
        "ratio_to_best_baseline": model_hr / best_base if best_base else None,
        "warm_test_ndcg_10": result.metrics.get("test/ndcg_10"),
        "warm_valid_best_ndcg_10": result.metrics.get("valid/best_ndcg_10"),
        "epochs": result.metrics.get("train/epochs"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-time-s", type=float, default=240.0, help="training budget per model (seconds)")
    p.add_argument("--id-dropout", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--share", type=float, default=0.1, help="share of items held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cold_start.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="towerline-cold-") as tmp:
        work = Path(tmp)
        cold, txt = split_items(BEAUTY, BEAUTY.with_name("Beauty_item2attributes.json"), work / "data", args.share, args.seed)
        log.info("%d items held out of training", len(cold))
        for p_drop in args.id_dropout:
            r = run(p_drop, txt, cold, args.max_time_s, work, args.seed)
            log.info("id_dropout=%s: %s", p_drop, json.dumps(r))
            results.append(r)
            out = {"command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:] if argv is None else argv),
                   "dataset": "beauty", "k": K, "held_out_share": args.share, "seed": args.seed,
                   "train_budget_s": args.max_time_s, "target": "model HR@50 >= 2x the best baseline", "results": results}
            args.out.write_text(json.dumps(out, indent=2))  # after every model: a stopped run keeps what it measured
            log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
