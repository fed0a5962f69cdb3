"""The IQA statistics against scipy, and the 4-parameter logistic fit on known parameters."""
import math

import numpy as np
import pytest
from scipy import stats

from epban.iqa_stats import fit_logistic4, iqa_report, krcc, logistic4, plcc, rmse, srcc


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 60)
    pred = mos + rng.normal(0, 0.8, 60)
    pred[:5] = pred[5]  # ties
    return pred, mos


def test_correlations_equal_scipy(pair):
    pred, mos = pair
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert rmse(pred, mos) == pytest.approx(float(np.sqrt(np.mean((pred - mos) ** 2))), abs=1e-12)


def test_known_values():
    x = [1, 2, 3, 4, 5]
    assert srcc(x, [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert krcc(x, [1, 3, 2, 4, 5]) == pytest.approx(0.8)
    assert srcc(x, x[::-1]) == pytest.approx(-1.0)
    assert plcc(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))


def test_undefined_correlations_are_nan():
    assert math.isnan(srcc([1, 1, 1], [1, 2, 3]))
    assert math.isnan(plcc([1], [2]))


@pytest.mark.parametrize("bad", [([1, 2], [1, 2, 3]), ([1, float("nan")], [1, 2])])
def test_bad_inputs(bad):
    with pytest.raises(ValueError):
        srcc(*bad)


@pytest.mark.parametrize("params", [(80.0, 10.0, 0.5, 0.12), (4.6, 1.2, -3.0, 1.5), (10.0, 90.0, 2.0, 0.7)])
def test_logistic_fit_recovers_known_parameters(params):
    rng = np.random.default_rng(1)
    b3, b4 = params[2], params[3]
    x = rng.uniform(b3 - 5 * b4, b3 + 5 * b4, 400)
    y = logistic4(x, *params) + rng.normal(0, 1e-3 * abs(params[0] - params[1]), x.size)
    fitted = fit_logistic4(x, y)
    np.testing.assert_allclose(fitted, params, rtol=2e-2, atol=2e-2 * abs(params[0] - params[1]) * b4)


def test_logistic_formula():
    b1, b2, b3, b4 = 5.0, 1.0, 0.0, 2.0
    assert logistic4(b3, b1, b2, b3, b4) == pytest.approx((b1 + b2) / 2)
    assert logistic4(1.0, b1, b2, b3, b4) == pytest.approx((b1 - b2) / (1 + math.exp(-(1.0 - b3) / b4)) + b2)
    assert logistic4(1.0, b1, b2, b3, -b4) == pytest.approx(logistic4(1.0, b1, b2, b3, b4))  # |b4|
    assert np.isfinite(logistic4(np.array([-1e6, 1e6]), b1, b2, b3, b4)).all()


def test_report(pair):
    pred, mos = pair
    r = iqa_report(pred, mos)
    assert set(r) == {"n", "srcc", "krcc", "plcc", "rmse", "logistic"}
    assert r["n"] == 60
    lg = r["logistic"]
    assert set(lg) == {"srcc", "krcc", "plcc", "rmse", "params"}
    assert lg["srcc"] == pytest.approx(r["srcc"], abs=1e-9)  # a monotone map keeps the ranks
    assert lg["plcc"] >= r["plcc"] - 1e-6 and lg["rmse"] <= r["rmse"] + 1e-6
    assert iqa_report([1, 2, 3], [1, 2, 4])["logistic"] is None  # too few points
