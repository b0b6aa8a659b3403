"""Intervals for A/B metrics: Wilson for proportions, the delta method for ratios, normal means, Poisson bootstrap,
differences of two groups (Newcombe, Welch), and the sample-ratio-mismatch test."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson, JASA 1927)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n successes a bound is exactly 0 or 1; rounding would leave it 3e-18 off, and a lower
    # bound above zero reads as "the rate excludes zero" in the reports
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (float(lo), float(hi))


def ratio_interval(numer: np.ndarray, denom: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(ratio of sums, lo, hi): delta-method interval of ``sum(numer)/sum(denom)`` over units.

    Var(R) ~ (s_x^2 - 2 R s_xy + R^2 s_y^2) / (n mean_y^2) for per-unit x = numer, y = denom
    (Deng, Knoblich & Lu, KDD 2018).
    """
    x, y = np.asarray(numer, np.float64), np.asarray(denom, np.float64)
    n = len(x)
    if n == 0 or y.sum() == 0:
        return (float("nan"), float("nan"), float("nan"))
    r = x.sum() / y.sum()
    if n < 2:
        return (float(r), float("nan"), float("nan"))
    cov = np.cov(np.vstack([x, y]), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * y.mean() ** 2)
    half = z * np.sqrt(max(var, 0.0))
    return (float(r), float(r - half), float(r + half))


def mean_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi) by the normal approximation, mean +- z s / sqrt(n)."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"), float("nan"))
    m = float(v.mean())
    if len(v) < 2:
        return (m, float("nan"), float("nan"))
    half = z * float(v.std(ddof=1)) / np.sqrt(len(v))
    return (m, m - half, m + half)


def proportion_difference_interval(
    x1: int, n1: int, x2: int, n2: int, z: float = Z95
) -> tuple[float, float, float]:
    """(p1 - p2, lo, hi): Newcombe's hybrid score interval from the two Wilson intervals.

    Newcombe, "Interval estimation for the difference between independent proportions", Statistics
    in Medicine 1998 (method 10): keeps its coverage near 95% at small counts and rates near 0,
    where the Wald interval ``d +- z sqrt(p1 q1/n1 + p2 q2/n2)`` is too narrow.
    """
    if n1 <= 0 or n2 <= 0:
        return (float("nan"), float("nan"), float("nan"))
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    lo = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return (float(d), float(lo), float(hi))


def mean_difference_interval(a: np.ndarray, b: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi) with Welch's unpooled standard error (normal quantile: large groups)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        d = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
        return (d, float("nan"), float("nan"))
    d = float(a.mean() - b.mean())
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    return (d, d - z * se, d + z * se)


def sample_ratio_test(observed: np.ndarray, shares: np.ndarray) -> tuple[float, float]:
    """(chi-square statistic, p-value) of observed arm sizes against the configured traffic shares.

    A sample-ratio mismatch (SRM) means assignment or logging lost users unevenly, and every
    metric of the experiment is then suspect (Fabijan et al., "Diagnosing Sample Ratio Mismatch in
    Online Controlled Experiments", KDD 2019). Pearson's goodness-of-fit test with k - 1 degrees
    of freedom; flag at p < 0.001, as that paper recommends, since it runs on every report.
    """
    from scipy.stats import chi2

    obs = np.asarray(observed, np.float64)
    expected = obs.sum() * np.asarray(shares, np.float64) / np.sum(shares)
    if obs.sum() <= 0 or len(obs) < 2:
        return (float("nan"), float("nan"))
    stat = float(np.sum((obs - expected) ** 2 / np.where(expected > 0, expected, np.nan)))
    return (stat, float(chi2.sf(stat, len(obs) - 1)))


def _poisson1_table(bits: int = 16) -> np.ndarray:
    """Poisson(1) quantile function tabulated at the midpoints of 2**bits equal slices of [0, 1)."""
    k = np.arange(20)
    pmf = np.exp(-1.0) / np.cumprod(np.concatenate([[1.0], k[1:].astype(np.float64)]))
    u = (np.arange(2**bits) + 0.5) / 2**bits
    return np.searchsorted(np.cumsum(pmf), u).astype(np.float64)


_POISSON1 = _poisson1_table()


def poisson1_weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Poisson(1) bootstrap weights by table lookup on 16-bit uniforms: about 4x faster than
    ``rng.poisson``; each probability is off by at most 2**-17, far below the bootstrap's own noise."""
    return _POISSON1[rng.integers(0, 2**16, size=shape, dtype=np.uint16)]


def bootstrap_metrics(frame: pd.DataFrame, n_boot: int, rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """(n_boot, 3) replicates of (ctr, conversion, revenue per user) under a Poisson bootstrap."""
    x = np.column_stack([
        frame["impressions"].to_numpy(np.float64), frame["clicks"].to_numpy(np.float64),
        (frame["purchases"].to_numpy() > 0).astype(np.float64), frame["revenue"].to_numpy(np.float64),
        np.ones(len(frame)),
    ])  # (n, 5)
    out = np.empty((n_boot, 3))
    for lo in range(0, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        w = poisson1_weights(rng, (b, len(frame)))  # (b, n)
        s = w @ x  # (b, 5) weighted sums
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + b] = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 4], s[:, 3] / s[:, 4]])
    return out


# ----------------------------------------------------------------------------------------------
