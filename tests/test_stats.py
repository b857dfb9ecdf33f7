"""The study's statistics: t quantiles against scipy, intervals by hand, verdict rules."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats  # present: scikit-learn, a dependency, needs it

from sparse_adv_fast.pipeline import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 29, 200])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(df: int, p: float) -> None:
    want = float(scipy_stats.t.ppf(p, df))
    assert stats.t_quantile(p, df) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 5, 30])
@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 1.1, 6.0])
def test_t_cdf_matches_scipy(df: int, t: float) -> None:
    assert stats.t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-12)


def test_t_quantile_table_values() -> None:
    # The printed two-sided 95 % critical values (any t table).
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706204736, rel=1e-9)
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.302652730, rel=1e-9)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776445105, rel=1e-9)


def test_interval_by_hand() -> None:
    xs = [0.80, 0.82, 0.86]
    mean = 0.8266666666666667
    sd = math.sqrt(((0.80 - mean) ** 2 + (0.82 - mean) ** 2 + (0.86 - mean) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)
    got = stats.interval(xs)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(mean, abs=1e-15)
    assert got["sd"] == pytest.approx(sd, rel=1e-12)
    assert got["half"] == pytest.approx(half, rel=1e-9)
    assert (got["lo"], got["hi"]) == pytest.approx((mean - half, mean + half), rel=1e-9)


def test_interval_one_value_has_no_width() -> None:
    got = stats.interval([0.5])
    assert got["mean"] == 0.5 and got["half"] is None and got["lo"] is None
    assert stats.interval([])["mean"] is None


def test_interval_rejects_nan_and_bad_level() -> None:
    with pytest.raises(ValueError, match="finite"):
        stats.interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="level"):
        stats.interval([0.1, 0.2], level=1.0)


def test_paired_uses_shared_seeds_only() -> None:
    a = {0: 0.9, 1: 0.8, 2: 0.7, 5: 0.1}
    b = {0: 0.85, 1: 0.8, 2: 0.6}
    got = stats.paired(a, b)
    assert got["seeds"] == [0, 1, 2]
    diffs = [0.05, 0.0, 0.1]
    ref = stats.interval(diffs)
    assert got["mean"] == pytest.approx(ref["mean"]) and got["half"] == pytest.approx(ref["half"])
    # Same mean as unpaired, but the shared seed effect is gone: narrower than the rows'.
    assert got["half"] < stats.interval(list(b.values()))["half"]


@pytest.mark.parametrize(("lo", "hi", "want"), [
    (0.01, 0.2, stats.HELD), (-0.3, -0.001, stats.NOT_HELD), (-0.1, 0.1, stats.INCONCLUSIVE),
    (0.0, 0.1, stats.INCONCLUSIVE), (None, None, stats.INCONCLUSIVE),
])
def test_verdict_rules(lo, hi, want) -> None:
    assert stats.verdict({"lo": lo, "hi": hi}) == want


def test_combine_rules() -> None:
    h, n, i = stats.HELD, stats.NOT_HELD, stats.INCONCLUSIVE
    assert stats.combine([h, h]) == h
    assert stats.combine([h, i]) == i
    assert stats.combine([h, n, i]) == n
    assert stats.combine([]) == i
    with pytest.raises(ValueError, match="unknown verdict"):
        stats.combine(["maybe"])
