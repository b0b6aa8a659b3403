"""Benchmark: churn warning, LTV and uplift targeting on the simulated shop, checked against the truth.

One simulated shop (``marketing/simulator.py`` over the synthetic generator) and three questions:

* **Churn** (no order in the next 30 days, customers only): back-test on the last 30 days of the
  log; ROC-AUC and precision among the top 10 % by score, for the model, recency alone (days since
  the last order) and the RFM score (minus R + F + M). Target: the model beats both on AUC.
* **LTV** (revenue in the next 30 days): the same split; Spearman and MAE of the regressor, of the
  buy-till-you-die reference (BG/NBD + Gamma-Gamma, pymc-marketing, with ``--btyd``) and of
  "next period = last period". Target: the regressor beats last period on both.
* **Uplift** (randomised campaigns, e-mail + 10 % discount, half held out; figures are means over
  ``--campaigns`` of them): meta-learners fitted on 70 % of the users; on the other 30 %, the Qini
  coefficient of each score (Radcliffe 2007) from the observed outcomes and from the true effects, and
  the *true* incremental conversions (the sum of the simulator's per-user effects) of spending a
  budget of 10 % of those users on the highest predicted uplift, on the highest predicted
  conversion (a response model on the treated), and at random (its expectation). Targets: uplift
  >= 1.3x response targeting and >= 2x random.

Usage::

    python bench/campaigns.py                       # 20,000 users, about a minute or two on 2 cores
    python bench/campaigns.py --users 40000 --btyd  # also the BG/NBD reference (pip install -e '.[btyd]')

Writes ``bench/results/campaigns.json`` with the command line, every figure, each target and
whether it was met; prints the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.campaigns")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20_000, help="users in the simulated shop")
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="shop seed (the campaign and splits use fixed seeds too)")
    p.add_argument("--horizon-days", type=float, default=30.0, help="churn and LTV horizon")
    p.add_argument("--budget-share", type=float, default=0.1, help="offers as a share of the held-out users")
    p.add_argument("--campaigns", type=int, default=3, help="randomised campaigns the uplift figures are averaged over")
    p.add_argument("--btyd", action="store_true", help="also fit the BG/NBD + Gamma-Gamma reference (slow, needs pymc-marketing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "campaigns.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from towerline.marketing.churn import ChurnConfig, evaluate_churn
    from towerline.marketing.ltv import LtvConfig, evaluate_ltv
    from towerline.marketing.simulator import simulate_shop

    start = time.perf_counter()
    shop = simulate_shop(args.users, args.items, args.seed)
    timings = {"shop_s": round(time.perf_counter() - start, 1)}

    t = time.perf_counter()
    churn = evaluate_churn(shop.dataset, ChurnConfig(horizon_days=args.horizon_days))
    timings["churn_s"] = round(time.perf_counter() - t, 1)
    auc, p10 = churn["auc"], churn["precision_at_10"]
    churn["target"] = "model ROC-AUC above recency alone and above the RFM score"
    churn["met"] = bool(auc["model"] > auc["recency"] and auc["model"] > auc["rfm"])

    t = time.perf_counter()
    ltv = evaluate_ltv(shop.dataset, LtvConfig(horizon_days=args.horizon_days), btyd=args.btyd)
    timings["ltv_s"] = round(time.perf_counter() - t, 1)
    ltv["target"] = "regressor Spearman above and MAE below 'next period = last period'"
    ltv["met"] = bool(ltv["model"]["spearman"] > ltv["last_period"]["spearman"] and ltv["model"]["mae"] < ltv["last_period"]["mae"])

    t = time.perf_counter()
    uplift = evaluate_uplift(shop, args.budget_share, args.campaigns)
    timings["uplift_s"] = round(time.perf_counter() - t, 1)

    result = {
        "command": "python bench/campaigns.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shop": {"users": args.users, "items": args.items, "seed": args.seed, "events": int(len(shop.dataset.events))},
        "churn": churn, "ltv": ltv, "uplift": uplift, "timings": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"churn ({churn['customers']} customers, churn rate {churn['churn_rate']:.3f}): ROC-AUC model {auc['model']:.3f} "
          f"recency {auc['recency']:.3f} RFM {auc['rfm']:.3f}; precision@10% model {p10['model']:.3f} "
          f"recency {p10['recency']:.3f} RFM {p10['rfm']:.3f}  [{_met(churn['met'])}]")
    line = (f"LTV ({ltv['customers']} customers, mean next-period revenue {ltv['mean_revenue']:.2f}): "
            f"Spearman/MAE regressor {ltv['model']['spearman']:.3f}/{ltv['model']['mae']:.2f} "
            f"last period {ltv['last_period']['spearman']:.3f}/{ltv['last_period']['mae']:.2f}")
    if "btyd" in ltv:
        line += f" BG/NBD+GG {ltv['btyd']['spearman']:.3f}/{ltv['btyd']['mae']:.2f}"
    print(line + f"  [{_met(ltv['met'])}]")
    for name, r in uplift["learners"].items():
        print(f"uplift {name}-learner, mean of {uplift['campaigns']} campaigns: Qini observed {r['qini']:.5f} "
              f"(response model {uplift['qini_response']:.5f}, true effects as scores {uplift['qini_oracle']:.5f}), "
              f"Qini with true effects {r['qini_true']:.5f} (response model {uplift['qini_true_response']:.5f}); "
              f"budget {uplift['budget']}: +{r['incremental']:.1f} conversions "
              f"vs response {uplift['incremental_response']:.1f} ({_x(r['over_response'])}) and random "
              f"{uplift['incremental_random']:.1f} ({_x(r['over_random'])}) [{_met(r['met'])}]")
    print(f"timings {timings}; written {args.out}")
    return 0


def evaluate_uplift(shop: Any, budget_share: float, campaigns: int = 3) -> dict[str, Any]:
    """Averages of ``uplift_campaign`` over ``campaigns`` independently randomised campaigns on the shop."""
    runs = [uplift_campaign(shop, budget_share, seed) for seed in range(1, campaigns + 1)]

    def mean(key: str, learner: str | None = None) -> float:
        return float(np.mean([(r["learners"][learner] if learner else r)[key] for r in runs]))

    out: dict[str, Any] = {
        "campaign": runs[0]["campaign"], "campaigns": campaigns, "train_users": runs[0]["train_users"],
        "test_users": runs[0]["test_users"], "budget": runs[0]["budget"],
        "target": "incremental conversions at the budget >= 1.3x response targeting and >= 2x random (means over campaigns)",
        **{k: mean(k) for k in ("true_mean_effect", "qini_response", "qini_true_response", "qini_oracle",
                                "incremental_response", "incremental_random")},
        "learners": {}, "per_campaign": runs,
    }
    for learner in runs[0]["learners"]:
        r = {k: mean(k, learner) for k in ("qini", "qini_true", "incremental", "sign_agreement", "fit_s")}
        r["over_response"] = r["incremental"] / out["incremental_response"] if out["incremental_response"] > 0 else None
        r["over_random"] = r["incremental"] / out["incremental_random"] if out["incremental_random"] > 0 else None
        r["met"] = bool((r["over_response"] is None or r["over_response"] >= 1.3) and r["incremental"] > 0
                        and (r["over_random"] is None or r["over_random"] >= 2.0))
        out["learners"][learner] = r
    out["met"] = out["learners"]["x"]["met"]
    return out


def uplift_campaign(shop: Any, budget_share: float, seed: int) -> dict[str, Any]:
    """Learn from one randomised campaign; score its held-out users by Qini and by true incremental conversions.

    ``qini`` uses the observed outcomes of the held-out users (what a real campaign can measure;
    noisy at a few thousand users), ``qini_true`` the same area with the simulator's true effects
    in place of the observed difference (what the ranking is really worth).
    """
    from towerline.marketing.model_inputs import feature_frame
    from towerline.marketing.simulator import incremental_conversions, run_campaign
    from towerline.marketing.uplift import UpliftConfig, arm_outcomes, fit_response, fit_uplift, qini_coefficient, select_by_uplift

    channel, offer = "email", "discount_10"
    c, treated, y = arm_outcomes(run_campaign(shop, arms=[(channel, offer)], holdout=0.5, seed=seed), channel, offer)
    X = feature_frame(shop.profiles, shop.dataset.users).loc[c["user_id"]]
    test = np.random.default_rng(seed).random(len(c)) < 0.3
    ids = c["user_id"].to_numpy()[test]
    truth = shop.effect_of(channel, offer)["effect"].reindex(ids).to_numpy()
    budget = int(budget_share * test.sum())

    response = fit_response(X[~test & treated], y[~test & treated]).predict_proba(X[test].to_numpy())[:, 1]
    by_response = ids[np.argsort(-response, kind="stable")[:budget]]
    out: dict[str, Any] = {
        "campaign": f"{channel} + {offer}, holdout 0.5", "seed": seed, "train_users": int((~test).sum()),
        "test_users": int(test.sum()), "budget": budget, "true_mean_effect": float(truth.mean()),
        "qini_response": qini_coefficient(y[test], treated[test], response),
        "qini_true_response": _true_qini(truth, response),
        "qini_oracle": qini_coefficient(y[test], treated[test], truth),
        "incremental_response": incremental_conversions(shop, by_response, channel, offer),
        "incremental_random": float(truth.mean() * budget), "learners": {},
    }
    for learner in ("x", "t"):
        t = time.perf_counter()
        model = fit_uplift(X[~test], treated[~test], y[~test], UpliftConfig(learner=learner))
        fit_s = time.perf_counter() - t
        score = model.predict(X[test])
        chosen = select_by_uplift(pd.Series(score, index=ids), budget)
        out["learners"][learner] = {
            "qini": qini_coefficient(y[test], treated[test], score), "qini_true": _true_qini(truth, score),
            "sent": int(len(chosen)), "incremental": incremental_conversions(shop, chosen, channel, offer),
            "sign_agreement": float(np.mean(np.sign(score) == np.sign(truth))), "fit_s": round(fit_s, 1),
        }
    return out


def _true_qini(effect: np.ndarray, score: np.ndarray) -> float:
    """Qini area with true per-user effects: cumulative true gain of the top k, minus the diagonal, per user."""
    n = len(effect)
    gain = np.concatenate([[0.0], np.cumsum(effect[np.argsort(-score, kind="stable")])]) / n
    return float(np.sum(gain[1:] + gain[:-1]) / (2 * n) - gain[-1] / 2)


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    raise SystemExit(main())
