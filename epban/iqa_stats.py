"""Agreement between a quality metric's predictions and subjective scores (the IQA statistics).

    SRCC   Spearman rank correlation            (monotonicity)
    KRCC   Kendall rank correlation, tau-b      (monotonicity, pairwise)
    PLCC   Pearson linear correlation           (linearity)
    RMSE   root mean squared error              (accuracy, on the score's scale)

PLCC and RMSE are also reported after the standard four-parameter logistic mapping of the
predictions to the scores (VQEG, "Final report ... validation of objective models of
video quality assessment", 2000; used by the Efficient-PBAN paper):

    Q(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2

b1, b2 are the upper and lower asymptotes, b3 the midpoint, |b4| the slope's scale.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize, stats


def _pair(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    mos = np.asarray(mos, dtype=np.float64).reshape(-1)
    if pred.shape != mos.shape:
        raise ValueError(f"pred and mos must have the same length, got {pred.size} and {mos.size}")
    if not (np.isfinite(pred).all() and np.isfinite(mos).all()):
        raise ValueError("pred and mos must be finite (no NaN or infinity)")
    return pred, mos


def _constant(x: np.ndarray) -> bool:
    return x.size < 2 or bool(np.all(x == x[0]))


def _correlation(statistic, pred, mos) -> float:
    pred, mos = _pair(pred, mos)
    if _constant(pred) or _constant(mos):
        return math.nan
    return float(statistic(pred, mos).statistic)


def srcc(pred, mos) -> float:
    """Spearman rank correlation; NaN when fewer than 2 items or either side is constant."""
    return _correlation(stats.spearmanr, pred, mos)


def krcc(pred, mos) -> float:
    """Kendall rank correlation (tau-b, which accounts for ties); NaN as for ``srcc``."""
    return _correlation(stats.kendalltau, pred, mos)


def plcc(pred, mos) -> float:
    """Pearson linear correlation; NaN as for ``srcc``."""
    return _correlation(stats.pearsonr, pred, mos)


def rmse(pred, mos) -> float:
    pred, mos = _pair(pred, mos)
    if pred.size == 0:
        return math.nan
    return float(np.sqrt(np.mean((pred - mos) ** 2)))


def logistic4(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """Q(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    return (b1 - b2) * 0.5 * (1.0 - np.tanh(0.5 * z)) + b2  # = (b1 - b2) * sigmoid(-z) + b2, overflow-free


def fit_logistic4(pred, mos, maxfev: int = 20000) -> tuple[float, float, float, float]:
    """Least-squares fit of ``logistic4`` mapping ``pred`` to ``mos``; returns (b1, b2, b3, b4 > 0).

    Starts from the VQEG initial guess (asymptotes at the score extremes, midpoint at the
    mean prediction, scale from the prediction spread), oriented by the sign of the
    Pearson correlation so that a decreasing relation is fitted as well.
    """
    pred, mos = _pair(pred, mos)
    if pred.size < 4:
        raise ValueError(f"the 4-parameter logistic needs at least 4 points, got {pred.size}")
    if _constant(pred) or _constant(mos):
        raise ValueError("cannot fit a logistic to constant predictions or scores")
    lo, hi = float(mos.min()), float(mos.max())
    scale = float(pred.std()) or 1.0
    increasing = np.corrcoef(pred, mos)[0, 1] >= 0
    p0 = [hi, lo, float(pred.mean()), scale] if increasing else [lo, hi, float(pred.mean()), scale]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        try:
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=maxfev)
        except RuntimeError:
            params = np.asarray(p0, dtype=np.float64)  # no convergence: the initial guess still maps monotonically
    b1, b2, b3, b4 = (float(v) for v in params)
    return b1, b2, b3, abs(b4)


def iqa_report(pred, mos) -> dict:
    """SRCC, KRCC, PLCC, RMSE of the raw predictions, and the same after the logistic mapping.

    Returns ``{"n", "srcc", "krcc", "plcc", "rmse", "logistic": {"srcc", "krcc", "plcc",
    "rmse", "params": [b1, b2, b3, b4]}}``; the logistic entry is ``None`` with fewer than
    4 points or constant inputs. Undefined correlations are NaN.
    """
    pred, mos = _pair(pred, mos)
    report = {"n": int(pred.size), "srcc": srcc(pred, mos), "krcc": krcc(pred, mos),
              "plcc": plcc(pred, mos), "rmse": rmse(pred, mos), "logistic": None}
    try:
        params = fit_logistic4(pred, mos)
    except ValueError:
        return report
    mapped = logistic4(pred, *params)
    report["logistic"] = {"srcc": srcc(mapped, mos), "krcc": krcc(mapped, mos), "plcc": plcc(mapped, mos),
                          "rmse": rmse(mapped, mos), "params": list(params)}
    return report
