"""Cold-start benchmark: items never seen in training, served from their attributes alone.

    python bench/cold_start.py --max-time-s 1500 --id-dropout 0.3 --model-dir /tmp/cold --grid
    python bench/cold_start.py --id-dropout 0.3 --model-dir /tmp/cold --grid   # reuses that model: no training

10% of Beauty's items (seeded) are held out of training entirely: their interactions are removed
from the sequences and they are left out of the training catalogue, but their attributes are kept.
After training, they enter the served model the way a new product does (``recommender.add_items``,
i.e. ``POST /admin/items`` and catalogue reloads: ``inference.cold_item_vectors``, with the bundle's
fitted cold-item mapper, ``training/cold_items.py``, appended to the exact index). The test users
are those whose last interaction (the leave-one-out test target) is a held-out item; each history is
everything before that target (held-out items in it get their cold vectors too), scored through the
serving retrieval path (``recommender.retrieve``, history masked) over *all* items, warm and cold.
The validation users are those whose second-to-last item is held out (history: what came before);
mapper settings are chosen on them.

What the cold vectors cost everyone else: HR@50 of 2,000 (seeded) users whose test item is warm, with
the cold items in the catalogue, and the share of their top 50 that is cold items (10% of the catalogue).

Variants, all on one trained model (``--model-dir`` keeps it; a later call reuses it): the item
tower's attribute path (id part zeroed; the pre-mapper cold path), the mapper with the config's
defaults (what the export writes, ``model_hr_50``), and with ``--grid`` ridge penalties x weightings.

Baselines over the same users and the same item set, history masked the same way:
- attribute popularity (the issue's "category popularity"): an item's score is how often its
  attribute tokens occur in the user's history (S3Rec's attribute ids do not say which token is
  the category, so every token counts), ties broken by training popularity, then at random;
- attribute match: the same score, ties at random (ignores popularity, which cold items lack);
- random: the expected HR@50 of a random ranking, 50 / (items left after masking).

One model per ``--id-dropout`` value (DropoutNet, Volkovs et al., NeurIPS 2017).
Writes bench/results/cold_start.json (``--out``) after every model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from towerline.features.vocab import N_RESERVED

REPO = Path(__file__).resolve().parents[1]
BEAUTY = Path("/work/shared/data/s3rec/Beauty.txt")
K = 50
WARM_USERS = 2000  # users whose test item is warm, sampled: what the cold vectors cost everyone else

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


def train_or_reuse(id_dropout: float, data_txt: Path, max_time_s: float, work: Path, seed: int,
                   max_epochs: int | None = None) -> dict:
    """Train the cold-split model of one ``--id-dropout`` into ``work`` (or reuse the one there)."""
    from towerline.config import load_config
    from towerline.training.train import train

    run_dir = work / f"run-drop{id_dropout}"
    saved = run_dir / "train.json"
    if saved.is_file():  # --model-dir: a model trained by an earlier call, reused as it is
        log.info("reusing the model of %s", saved)
        return json.loads(saved.read_text())
    cfg = load_config(REPO / "configs" / "beauty.yaml", [
        f"data.path={data_txt}", f"model.id_dropout={id_dropout}", f"trainer.max_time_s={max_time_s}",
        f"trainer.seed={seed}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.register=false",
        *([f"trainer.max_epochs={max_epochs}"] if max_epochs else []),
    ])
    t0 = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    info = {"bundle_dir": str(result.bundle_dir), "metrics": result.metrics, "train_s": time.perf_counter() - t0}
    saved.write_text(json.dumps(info, default=float))
    return info


def cold_targets(full, vocab, cold: set[str], position: int) -> tuple[list[np.ndarray], list[int]]:
    """(histories, targets) of the users whose item at ``position`` (-1: the test item, -2: the
    validation item) is held out; each history is everything before it."""
    ev = full.events.sort_values(["user_id", "timestamp"], kind="stable")
    histories, targets = [], []
    for _user, g in ev.groupby("user_id", sort=False, observed=True):
        seq = g["item_id"].astype(str).to_numpy(dtype=object)
        if len(seq) < 1 - position or seq[position] not in cold:
            continue
        idx = vocab.encode(seq[: len(seq) + position + 1])
        histories.append(idx[:-1])
        targets.append(int(idx[-1]))
    return histories, targets


def model_hits(state, histories: list[np.ndarray], targets: list[int], first_cold: int) -> tuple[float, float]:
    """(HR@K, share of the top K that are cold items) of the served retrieval path
    (``recommender.retrieve``, history masked) over all items; cold items are rows >= ``first_cold``."""
    from towerline.serving import recommender as rec
    from towerline.serving.settings import ServeSettings

    settings = ServeSettings(n_candidates=K)
    etype = state.bundle.vocabs.event_types.encode_one("interaction")
    hits, cold = 0, 0
    for lo in range(0, len(histories), 256):
        batch = [rec.UserHistory(h, np.full(len(h), etype, dtype=np.int64), np.arange(len(h), dtype=np.int64))
                 for h in histories[lo : lo + 256]]
        for (cand, _), target in zip(rec.retrieve(state, settings, batch), targets[lo : lo + 256]):
            hits += int(target in set(cand.tolist()))
            cold += int((cand >= first_cold).sum())
    n = max(len(targets), 1)
    return hits / n, cold / (n * K)


def mapper_variants(bundle, grid: bool) -> list[tuple[str, object]]:
    """(name, mapper) pairs to compare: the tower's attribute path (None), the bundle's own mapper
    when it has one, the default fit (what export writes) and, with ``grid``, ridge penalties x weightings."""
    from towerline.training import cold_items

    net, emb, pop = bundle.net, bundle.item_embeddings, np.asarray(bundle.item_popularity)
    out: list[tuple[str, object]] = [("tower attribute path", None)]
    if bundle.cold_items is not None:
        out.append(("bundle mapper", bundle.cold_items))
    out.append(("fitted (defaults)", cold_items.fit_from_net(net, emb, pop)))
    if grid:  # a first grid (uniform/log/popularity x l2 0.1..100) is in bench/results/cold_start_1epoch_grid_a.json
        for weighting, l2 in (("uniform", 1.0), ("log", 0.1), ("sqrt", 0.1), ("sqrt", 1.0), ("popularity", 0.01),
                              ("popularity", 0.03), ("popularity", 0.1), ("popularity", 0.3), ("popularity", 1.0)):
            out.append((f"fitted l2={l2:g} {weighting}", cold_items.fit_from_net(net, emb, pop, l2=l2, weighting=weighting)))
        out.append(("fitted l2=0.1 popularity, no rescale",
                    cold_items.fit_from_net(net, emb, pop, l2=0.1, weighting="popularity", rescale=False)))
    return out


def run(id_dropout: float, data_txt: Path, cold: set[str], max_time_s: float, work: Path, seed: int, grid: bool,
        max_epochs: int | None = None) -> dict:
    import dataclasses

    from towerline.features.readers import read_s3rec
    from towerline.serving import recommender as rec

    info = train_or_reuse(id_dropout, data_txt, max_time_s, work, seed, max_epochs)
    metrics = info["metrics"]
    full = read_s3rec(BEAUTY)  # the original data: held-out items, their attributes, the real histories
    items = full.items.set_index("item_id")
    trained = rec.load_model(info["bundle_dir"])
    cold_rows = [{"item_id": i, "attributes": list(items.loc[i, "attributes"])} for i in sorted(cold, key=int)]
    state, added = rec.add_items(trained, cold_rows)  # the vocabulary every variant shares (same rows, same order)
    vocab = state.bundle.vocabs.items
    splits = {name: cold_targets(full, vocab, cold, pos) for name, pos in (("valid", -2), ("test", -1))}
    warm = cold_targets(full, vocab, set(vocab.ids[: trained.n_items - N_RESERVED].tolist()), -1)  # warm test items
    pick = np.random.default_rng(seed).permutation(len(warm[1]))[:WARM_USERS]
    warm = ([warm[0][i] for i in pick], [warm[1][i] for i in pick])

    tokens = [list(items.loc[str(i), "attributes"]) if str(i) in items.index else [] for i in vocab.decode(np.arange(state.n_items))]
    pop = np.asarray(state.facts.popularity, dtype=np.float64)
    base = {name: baseline_hits(h, t, tokens, pop, state.n_items, np.random.default_rng(seed)) for name, (h, t) in splits.items()}

    variants = []
    for name, mapper in mapper_variants(trained.bundle, grid):
        t1 = time.perf_counter()
        served = dataclasses.replace(trained, bundle=dataclasses.replace(trained.bundle, cold_items=mapper))
        v_state, _ = rec.add_items(served, cold_rows)  # the served path: POST /admin/items, catalogue reload
        hr = {split: model_hits(v_state, h, t, trained.n_items)[0] for split, (h, t) in splits.items()}
        warm_hr, cold_share = model_hits(v_state, *warm, trained.n_items)
        row = {"variant": name, "mapper": None if mapper is None else {**mapper.meta, "scale": mapper.scale},
               f"valid_hr_{K}": hr["valid"], f"test_hr_{K}": hr["test"],
               f"warm_test_hr_{K}": warm_hr, f"cold_share_of_warm_users_top_{K}": cold_share,
               "eval_s": round(time.perf_counter() - t1, 1)}
        log.info("%s", json.dumps(row))
        variants.append(row)
    best = max(variants, key=lambda r: r[f"valid_hr_{K}"])  # chosen on validation, reported on test
    default = next(r for r in variants if r["variant"] == "fitted (defaults)")
    test_base = base["test"]
    return {
        "id_dropout": id_dropout,
        "train_s": round(info["train_s"], 1),
        "cold_items": len(added.added),
        "cold_items_without_attributes": len(added.without_attributes),
        "test_users": len(splits["test"][1]),
        "valid_users": len(splits["valid"][1]),
        "warm_test_users": len(warm[1]),
        "cold_share_of_catalogue": len(added.added) / (state.n_items - N_RESERVED),
        f"model_hr_{K}": default[f"test_hr_{K}"],
        f"baselines_hr_{K}": test_base,
        f"valid_baselines_hr_{K}": base["valid"],
        "ratio_to_attribute_popularity": default[f"test_hr_{K}"] / test_base["attribute_popularity"] if test_base["attribute_popularity"] else None,
        "ratio_to_best_baseline": default[f"test_hr_{K}"] / max(test_base["attribute_popularity"], test_base["attribute_match"]),
        "best_on_valid": best["variant"],
        "variants": variants,
        "warm_test_ndcg_10": metrics.get("test/ndcg_10"),
        "warm_valid_best_ndcg_10": metrics.get("valid/best_ndcg_10"),
        "epochs": metrics.get("train/epochs"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-time-s", type=float, default=240.0, help="training budget per model (seconds)")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch budget per model (the config's when not given)")
    p.add_argument("--id-dropout", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--share", type=float, default=0.1, help="share of items held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="keep the split and the trained models here; a model already there is reused, not retrained")
    p.add_argument("--grid", action="store_true", help="also compare mapper penalties and weightings (on one model)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cold_start.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="towerline-cold-") as tmp:
        work = args.model_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cold, txt = split_items(BEAUTY, BEAUTY.with_name("Beauty_item2attributes.json"), work / "data", args.share, args.seed)
        log.info("%d items held out of training", len(cold))
        for p_drop in args.id_dropout:
            r = run(p_drop, txt, cold, args.max_time_s, work, args.seed, args.grid, args.max_epochs)
            log.info("id_dropout=%s: %s", p_drop, json.dumps(r))
            results.append(r)
            out = {"command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:] if argv is None else argv),
                   "dataset": "beauty", "k": K, "held_out_share": args.share, "seed": args.seed,
                   "train_budget_s": args.max_time_s, "target": "model HR@50 >= 2x the category-popularity baseline (attribute_popularity); ratio to the best baseline also given", "results": results}
            args.out.write_text(json.dumps(out, indent=2))  # after every model: a stopped run keeps what it measured
            log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
