"""Who gets the credit for a conversion: four attribution models over users' touch paths.

A *touch* is a message of a campaign that reached a user on a channel (sent, opened or clicked);
a *path* is the ordered channels of one user's touches up to a conversion (or, for users who did
not convert, up to the end of the data: a "null" path). Every model below spreads each
conversion's one unit of credit (and its revenue) over the channels of its path:

* **last touch**: all of it to the last channel touched, the convention of most ad platforms;
* **linear**: equal shares to every touch of the path;
* **position-based** (the "U-shaped" 40/20/40 rule): 40% to the first touch, 40% to the last,
  the remaining 20% spread evenly over the touches between; a two-touch path splits 50/50 and a
  one-touch path gives that touch everything;
* **Markov removal effect** (data-driven; Anderl, Becker, von Wangenheim & Schumann, "Mapping the
  customer journey: Lessons learned from graph-based online attribution modeling", IJRM 2016): a
  first-order Markov chain over ``start -> channel -> ... -> conversion | null`` is estimated from
  *all* paths, converting and not; the removal effect of channel ``c`` is the relative drop in the
  probability of reaching ``conversion`` from ``start`` when ``c`` is removed (every transition into
  ``c`` goes to ``null``). Conversions are credited in proportion to the removal effects. Unlike
  the three rules it learns from the paths that did *not* convert: a channel that appears as often
  in non-converting journeys earns less.

Each model returns the same table (one row per channel: ``conversions``, ``revenue``), so they
can be shown side by side and each column sums to the total conversions (and revenue).
A path set of only one-touch paths gives every model the same answer (the tests check it).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd

from towerline.errors import DataValidationError

log = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("last_touch", "linear", "position_based", "markov")
MODEL_LABELS: dict[str, str] = {
    "last_touch": "Last touch",
    "linear": "Linear",
    "position_based": "Position-based (40/20/40)",
    "markov": "Data-driven (Markov removal effect)",
}
DEFAULT_LOOKBACK_S = 30 * 86_400  # touches older than this before a conversion earn no credit


# paths


def build_paths(
    touches: pd.DataFrame,
    conversions: pd.DataFrame,
    lookback_s: int = DEFAULT_LOOKBACK_S,
) -> pd.DataFrame:
    """Touches and conversions -> one row per journey: ``user_id, path, converted, value``.

    A user's touches (``user_id, channel, timestamp``) are cut at each of their conversions
    (``user_id, timestamp, value``): the touches after the previous conversion, at most
    ``lookback_s`` seconds before this one, make that conversion's path; older ones make a null
    path (they did not lead to a conversion in time). Touches after a user's last conversion (or
    of a user who never converted) make one null path. A conversion without
    any touch in its window is not a journey of these channels and is left out (its count is
    logged): no model can credit a channel for it.

    Returns:
        DataFrame with ``path`` a tuple of channel names in time order, ``converted`` bool and
        ``value`` (revenue of the conversion, 0 for null paths).
    """
    for name, frame, cols in (("touches", touches, ("user_id", "channel", "timestamp")),
                              ("conversions", conversions, ("user_id", "timestamp"))):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataValidationError(f"attribution {name}: missing column(s) {missing}; expected {list(cols)}")
    t = touches[["user_id", "channel", "timestamp"]].copy()
    t["user_id"] = t["user_id"].astype(str)
    t["channel"] = t["channel"].astype(str)
    t = t.sort_values(["user_id", "timestamp"], kind="stable")
    c = conversions[["user_id", "timestamp"]].copy()
    c["user_id"] = c["user_id"].astype(str)
    c["value"] = conversions["value"].fillna(0.0).to_numpy(np.float64) if "value" in conversions else 0.0
    c = c.sort_values(["user_id", "timestamp"], kind="stable")

    rows: list[tuple[str, tuple[str, ...], bool, float]] = []
    untouched = 0
    conv_by_user = {u: g for u, g in c.groupby("user_id", sort=False)}
    for user, g in t.groupby("user_id", sort=False):
        ts = g["timestamp"].to_numpy(np.int64)
        ch = g["channel"].to_numpy()
        start = 0  # first touch not yet used by an earlier conversion
        conv = conv_by_user.pop(user, None)
        if conv is not None:
            for cts, value in zip(conv["timestamp"].to_numpy(np.int64), conv["value"].to_numpy(np.float64)):
                end = int(np.searchsorted(ts, cts, side="right"))  # touches at or before the conversion
                expired = [i for i in range(start, end) if ts[i] < cts - lookback_s]
                window = [i for i in range(start, end) if ts[i] >= cts - lookback_s]
                if expired:  # touches too old to earn credit: a journey that did not convert
                    rows.append((user, tuple(ch[expired]), False, 0.0))
                if window:
                    rows.append((user, tuple(ch[window]), True, float(value)))
                else:
                    untouched += 1
                start = max(start, end)
        if start < len(ts):
            rows.append((user, tuple(ch[start:]), False, 0.0))
    untouched += sum(len(g) for g in conv_by_user.values())
    if untouched:
        log.info("attribution: %d conversions had no touch in their %d-day window and are not attributed",
                 untouched, lookback_s // 86_400)
    return pd.DataFrame(rows, columns=["user_id", "path", "converted", "value"])


# rule-based models


def _rule_credit(paths: pd.DataFrame, weights: Callable[[int], np.ndarray]) -> pd.DataFrame:
    conv: dict[str, float] = {}
    rev: dict[str, float] = {}
    for path, value in zip(paths.loc[paths["converted"], "path"], paths.loc[paths["converted"], "value"]):
        w = weights(len(path))
        for ch, share in zip(path, w):
            conv[ch] = conv.get(ch, 0.0) + float(share)
            rev[ch] = rev.get(ch, 0.0) + float(share) * float(value)
    return _table(conv, rev, _channels(paths))


def last_touch(paths: pd.DataFrame) -> pd.DataFrame:
    """All of each conversion's credit to the last channel of its path."""
    return _rule_credit(paths, lambda n: np.eye(n)[-1])


def linear(paths: pd.DataFrame) -> pd.DataFrame:
    """Each conversion's credit split equally over the touches of its path."""
    return _rule_credit(paths, lambda n: np.full(n, 1.0 / n))


def position_weights(n: int, first: float = 0.4, last: float = 0.4) -> np.ndarray:
    """The U-shaped weights of an ``n``-touch path: ``first``/``last`` at the ends, the rest evenly between.

    One touch gets 1; two touches split the whole credit in proportion to ``first : last`` (50/50).
    """
    if n == 1:
        return np.ones(1)
    if n == 2:
        return np.array([first, last]) / (first + last)
    w = np.full(n, (1.0 - first - last) / (n - 2))
    w[0], w[-1] = first, last
    return w


def position_based(paths: pd.DataFrame, first: float = 0.4, last: float = 0.4) -> pd.DataFrame:
    """40% of each conversion to the first touch, 40% to the last, 20% evenly over those between."""
    return _rule_credit(paths, lambda n: position_weights(n, first, last))


# data-driven model


def transition_matrix(paths: pd.DataFrame, weights: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """First-order transition probabilities over ``start, channels..., conversion, null``.

    ``weights`` (one per path, default 1) weight each path's transitions in the counts.
    Returns (state names, P) with P of shape (S, S), rows of transient states summing to 1 and the
    two absorbing states (``conversion``, ``null``) mapping to themselves.
    """
    channels = _channels(paths)
    states = ["(start)", *channels, "(conversion)", "(null)"]
    idx = {s: i for i, s in enumerate(states)}
    S = len(states)
    counts = np.zeros((S, S))
    w = np.ones(len(paths)) if weights is None else np.asarray(weights, np.float64)
    for path, converted, wi in zip(paths["path"], paths["converted"], w):
        seq = [0, *(idx[c] for c in path), S - 2 if converted else S - 1]
        np.add.at(counts, (seq[:-1], seq[1:]), wi)
    counts[S - 2, S - 2] = counts[S - 1, S - 1] = 1.0
    rows = counts.sum(axis=1, keepdims=True)
    P = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    return states, P


def conversion_probability(P: np.ndarray, removed: int | None = None) -> float:
    """P(reach ``conversion`` from ``start``) in the absorbing chain ``P``, optionally with one state removed.

    Absorption probabilities solve ``(I - Q) x = r`` over transient states, with ``Q`` the
    transient-to-transient block and ``r`` the one-step conversion probabilities (Kemeny & Snell,
    *Finite Markov Chains*, 1960). Removing a state makes it lead to ``null``: its row of ``Q``
    and its ``r`` become zero.
    """
    S = P.shape[0]
    T = S - 2  # transient states: start + channels
    Q = P[:T, :T].copy()
    r = P[:T, S - 2].copy()
    if removed is not None:
        Q[removed] = 0.0
        r[removed] = 0.0
    x = np.linalg.solve(np.eye(T) - Q, r)
    return float(x[0])


def removal_effects(paths: pd.DataFrame, weights: np.ndarray | None = None) -> pd.Series:
    """Removal effect per channel: ``1 - P(conversion without c) / P(conversion)`` (Anderl et al., 2016)."""
    states, P = transition_matrix(paths, weights)
    base = conversion_probability(P)
    channels = states[1:-2]
    if base <= 0:
        return pd.Series(0.0, index=channels)
    return pd.Series([1.0 - conversion_probability(P, i + 1) / base for i in range(len(channels))],
                     index=channels, dtype=np.float64)


def markov(paths: pd.DataFrame) -> pd.DataFrame:
    """Conversions and revenue credited in proportion to each channel's Markov removal effect.

    Conversions follow the removal effects of the chain of path counts. Revenue follows the
    removal effects of a second chain in which each converting path counts with its value over
    the mean converting value (null paths count 1), as the ChannelAttribution package does with
    ``var_value``: a channel that leads to large orders earns more of the revenue than of the
    conversions, and with one-touch paths each channel gets exactly the revenue it converted.
    """
    effects = removal_effects(paths)
    conv = paths["converted"].to_numpy(bool)
    total, revenue = float(conv.sum()), float(paths.loc[conv, "value"].sum())
    weights = np.ones(len(paths))
    if revenue > 0:
        weights[conv] = paths.loc[conv, "value"].to_numpy(np.float64) / (revenue / total)
    value_effects = removal_effects(paths, weights) if revenue > 0 else effects * 0.0

    def shares(e: pd.Series) -> pd.Series:
        return e / e.sum() if e.sum() > 0 else e * 0.0

    return _table({c: total * s for c, s in shares(effects).items()},
                  {c: revenue * s for c, s in shares(value_effects).items()}, list(effects.index))


def attribute(paths: pd.DataFrame) -> pd.DataFrame:
    """All four models side by side: one row per channel, columns ``<model>_conversions``/``<model>_revenue``."""
    out = []
    for name, fn in (("last_touch", last_touch), ("linear", linear), ("position_based", position_based),
                     ("markov", markov)):
        out.append(fn(paths).add_prefix(f"{name}_"))
    return pd.concat(out, axis=1).fillna(0.0)


def _channels(paths: pd.DataFrame) -> list[str]:
    return sorted({c for p in paths["path"] for c in p})


def _table(conv: dict[str, float], rev: dict[str, float], channels: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"conversions": [conv.get(c, 0.0) for c in channels],
                          "revenue": [rev.get(c, 0.0) for c in channels]}, index=pd.Index(channels, name="channel"))
    return frame
