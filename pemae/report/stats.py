"""The verdict rule's statistics (docs/protocol.md): Student-t quantiles, the paired 95% confidence
interval, the minimum detectable effect at 80% power, the seeds a half-width needs, and the verdict
words holds / reversed / inconclusive."""

from __future__ import annotations

import functools
import math
import statistics


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------
CONFIDENCE = 0.95     # two-sided: the interval every verdict is read from
POWER = 0.80          # of the minimum detectable effect
STOP_HALF_WIDTH = 0.5  # points: the stopping rule for adding seeds (CLS linear and fine-tune) ...
STOP_SEEDS = 10        # ... or this many seeds, whichever comes first
HOLDS, REVERSED, INCONCLUSIVE, NO_VERDICT, NOT_RUN = (
    "holds", "reversed", "inconclusive", "too few seeds", "not run")
DECIDED = (HOLDS, REVERSED)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (scipy.stats when installed;
    scikit-learn, in the `pipeline` extra, brings it)."""
    try:
        from scipy import stats
    except ImportError:  # the core install has no scipy
        return _t_quantile_fallback(p, df)
    return float(stats.t.ppf(p, df))


def _t_pdf(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0: one half plus Simpson's rule on the density over [0, x]."""
    h = x / intervals
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


def _t_quantile_fallback(p: float, df: int) -> float:
    """Without scipy: bisection on the integrated density (df <= 30), the Cornish-Fisher
    expansion around the normal quantile above (error < 1e-4 there)."""
    if p < 0.5:
        return -_t_quantile_fallback(1 - p, df)
    if df > 30:
        z = statistics.NormalDist().inv_cdf(p)
        return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def judge(mean: float, sd: float | None, n: int) -> dict:
    """The verdict rule, from the mean, sample sd and number n of the paired differences a − b
    (the paper: a beats b). Returns mean, sd, n and

    ci_low, ci_high: mean ∓ t(0.975, n − 1)·sd/√n, the 95% confidence interval;
    half_width:      t(0.975, n − 1)·sd/√n;
    mde:             (t(0.975, n − 1) + t(0.80, n − 1))·sd/√n, the smallest true difference these
                     seeds detect with 80% power at two-sided 5%;
    verdict:         "holds" (ci_low > 0), "reversed" (ci_high < 0), "inconclusive" (the interval
                     contains zero) or "too few seeds" (n < 2: no spread, no interval; the others
                     are then None).
    """
    if n < 2 or sd is None:
        return {"mean": mean, "sd": None, "n": n, "ci_low": None, "ci_high": None,
                "half_width": None, "mde": None, "verdict": NO_VERDICT}
    se = sd / math.sqrt(n)
    t_ci = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1)
    half = t_ci * se
    low, high = mean - half, mean + half
    verdict = HOLDS if low > 0 else REVERSED if high < 0 else INCONCLUSIVE
    return {"mean": mean, "sd": sd, "n": n, "ci_low": low, "ci_high": high, "half_width": half,
            "mde": (t_ci + t_quantile(POWER, n - 1)) * se, "verdict": verdict}


def judge_differences(differences: list[float]) -> dict:
    """`judge` on paired differences a − b (one per seed)."""
    n = len(differences)
    return judge(statistics.fmean(differences), statistics.stdev(differences) if n > 1 else None, n)


def ci_half_width(sd: float, n: int) -> float | None:
    """Half the 95% t interval of a mean over n seeds (None for a single seed)."""
    return t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n) if n > 1 else None


def seeds_needed(sd: float | None, half_width: float = STOP_HALF_WIDTH, most: int = 1000) -> int | None:
    """The smallest n with t(0.975, n − 1)·sd/√n <= half_width, estimated from the current sd
    (None without one; `most` + 1 when even `most` seeds are not enough)."""
    if sd is None:
        return None
    return next((n for n in range(2, most + 1) if ci_half_width(sd, n) <= half_width), most + 1)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (ddof 1; 0.0 for a single value), count, and the half-width
    of the mean's 95% t interval (ci95; None for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values),
            "ci95": ci_half_width(std, len(values))}


def signed(value: float) -> str:
    return f"{value:+.2f}"


def ci_text(cell: dict) -> str:
    return f"[{signed(cell['ci_low'])}, {signed(cell['ci_high'])}]"
