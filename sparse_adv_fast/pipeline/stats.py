"""Statistics of the controlled study: Student-t intervals, paired differences, verdicts.

Dependency-free (``math`` only), so the library does not need scipy; the tests check the
t quantiles against ``scipy.stats.t``.

* :func:`t_quantile` -- the Student-t quantile, by bisection on the exact CDF (regularised
  incomplete beta function, Lentz's continued fraction).
* :func:`interval` -- mean with a two-sided t-interval (``n - 1`` degrees of freedom).
* :func:`paired` -- the interval of the per-seed differences ``a[s] - b[s]`` over the seeds
  both samples share (paired seeds cancel the seed-to-seed variation common to both arms).
* :func:`verdict` -- "held" when the interval of a difference lies above 0, "not held" when
  it lies below 0, "inconclusive" when it contains 0 (or there are too few seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``x in [0, 1]``."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and x in [0, 1], got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only for x below the mean; use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df!r}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the tails are heavy for small df
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # bisection to float resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and two-sided Student-t interval of ``values``.

    Returns ``{"n", "mean", "sd", "half", "lo", "hi", "level"}``; with fewer than two
    values ``sd``, ``half``, ``lo`` and ``hi`` are ``None`` (no interval from one seed).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval: level must be in (0, 1), got {level!r}")
    xs = [float(v) for v in values]
    if any(not math.isfinite(v) for v in xs):
        raise ValueError(f"interval: values must be finite, got {xs}")
    n = len(xs)
    out: dict[str, Any] = {"n": n, "mean": None, "sd": None, "half": None, "lo": None,
                           "hi": None, "level": level}
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, half=half, lo=mean - half, hi=mean + half)
    return out


def paired(a: Mapping[Any, float], b: Mapping[Any, float], level: float = 0.95
           ) -> dict[str, Any]:
    """Interval of the paired differences ``a[s] - b[s]`` over the keys (seeds) both hold.

    Adds ``"seeds"`` (the shared keys, sorted) to the :func:`interval` dict.
    """
    seeds = sorted(set(a) & set(b))
    out = interval([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    return out


def verdict(diff: Mapping[str, Any]) -> str:
    """``"held"`` if the interval lies above 0, ``"not held"`` below 0, else inconclusive."""
    lo, hi = diff.get("lo"), diff.get("hi")
    if lo is None or hi is None:
        return INCONCLUSIVE
    if lo > 0:
        return HELD
    if hi < 0:
        return NOT_HELD
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """One claim's verdict from its comparisons': held only if every one held; not held if
    any did not hold; otherwise inconclusive (also for no comparisons at all)."""
    for v in verdicts:
        if v not in VERDICTS:
            raise ValueError(f"combine: unknown verdict {v!r}; expected one of {VERDICTS}")
    if verdicts and all(v == HELD for v in verdicts):
        return HELD
    if NOT_HELD in verdicts:
        return NOT_HELD
    return INCONCLUSIVE


__all__ = ["HELD", "INCONCLUSIVE", "NOT_HELD", "VERDICTS", "betainc", "combine", "interval",
           "paired", "t_cdf", "t_quantile", "verdict"]
