"""The facts a comparison is judged by, each defined once and used by the table, the verdict
and the plots: what a run's passes cost (``pass_cost``, ``passes_saved``), the 95% t-interval
of a mean (``interval``), a policy's per-seed gap to the baseline (``paired_gap``), the rule
that calls it better or worse (``standing``) and the rule that flags a seed's time
(``time_outliers``)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

#: What a forward pass without backward costs, in training passes (forward + backward): a
#: backward costs about two forwards, the convention of the Selective Backprop papers. rho's
#: holdout scoring and the batch-level policies' selection forwards are charged at this rate.
FORWARD_SHARE = 1.0 / 3.0

#: Two-sided 95% quantiles t(0.975, df) of Student's t for df = 1..30 (the usual table), the
#: fallback when scipy is not installed; beyond 30 the Cornish-Fisher expansion in ``t_quantile``.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
Z975 = 1.959963984540054

#: A seed's wall time is flagged when it is more than this factor above the fastest of the
#: other seeds' times for the same policy and budget (a stall only ever slows a run down),
#: and at least ``OUTLIER_MIN_S`` seconds above it (below that, a tiny run's jitter).
OUTLIER_FACTOR = 1.5
OUTLIER_MIN_S = 0.25


def t_quantile(df: int, use_scipy: bool = True) -> float:
    """t(0.975, df): scipy's ``t.ppf`` if installed, else ``T975`` (df <= 30) or the
    Cornish-Fisher expansion z + (z³+z)/(4df) + (5z⁵+16z³+3z)/(96df²) (within 0.001 beyond)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got df={df}")
    if use_scipy:
        try:
            from scipy.stats import t
            return float(t.ppf(0.975, df))
        except ImportError:
            pass
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


class Interval(NamedTuple):
    """A mean over ``n`` values with its 95% t-interval [lo, hi]; lo = hi = nan for n < 2."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def defined(self) -> bool:
        return self.n >= 2


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def interval(xs: Sequence[float]) -> Interval:
    """mean ± t(0.975, n − 1) · sd / √n: the 95% t-interval of the mean of ``xs``."""
    if not xs:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    m, sd = mean_std(xs)
    if len(xs) < 2:
        return Interval(m, float("nan"), float("nan"), len(xs))
    half = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs))
    return Interval(m, m - half, m + half, len(xs))


def paired_gap(runs: Sequence[Dict[str, Any]], policy: str, budget: str, baseline: str) -> Interval:
    """``policy``'s accuracy gap over ``baseline`` at ``budget``, in points: one gap per seed
    both ran (paired by seed, so a seed's own luck cancels), and their 95% t-interval."""
    acc = {(r["policy"], r["seed"]): 100.0 * r["accuracy"] for r in runs if r["budget"] == budget}
    seeds = sorted(s for (p, s) in acc if p == policy and (baseline, s) in acc)
    return interval([acc[(policy, s)] - acc[(baseline, s)] for s in seeds])


def one_image(runs: Sequence[Dict[str, Any]]) -> float:
    """One test image, in accuracy points: 100 / n_test (0 if unknown)."""
    n = max((r.get("test_size", 0) for r in runs), default=0)
    return 100.0 / n if n else 0.0


def standing(gap: Interval, image: float) -> str:
    """"better" only when the gap's 95% interval excludes 0 and the mean gap exceeds one test
    image; "worse" likewise below; "?" with fewer than 2 seeds; else "level"."""
    if not gap.defined:
        return "?"
    if gap.lo > 0 and gap.mean > image + 1e-9:
        return "better"
    if gap.hi < 0 and gap.mean < -image - 1e-9:
        return "worse"
    return "level"


def pass_cost(run: Dict[str, Any]) -> float:
    """A run's cost in training passes, counting every pass it ran: each backward with its
    forward as 1, each forward without a backward as ``FORWARD_SHARE``. ``forward`` counts
    every forward (rho's holdout model's training and scoring, the batch policies'
    selection forwards), ``backward`` every backward, so cost = bwd + (fwd − bwd) / 3."""
    return run["backward"] + FORWARD_SHARE * (run["forward"] - run["backward"])


def passes_saved(run: Dict[str, Any]) -> float:
    """1 − ``pass_cost`` / full training's passes (forward + backward over every sample)."""
    return 1.0 - pass_cost(run) / run["passes_full"] if run["passes_full"] else 0.0


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    h = len(ys) // 2
    return ys[h] if len(ys) % 2 else (ys[h - 1] + ys[h]) / 2


def time_outliers(runs: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str, int], float]:
    """{(policy, budget, seed): the fastest of the other seeds' wall times} for every run whose
    wall time is more than ``OUTLIER_FACTOR`` times that and at least ``OUTLIER_MIN_S`` above
    it: a stall, a busy machine, or a cold start."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    out = {}
    for (p, b), rs in groups.items():
        for r in rs:
            others = [o["wall_s"] for o in rs if o is not r and o["wall_s"] > 0]
            if others and r["wall_s"] > OUTLIER_FACTOR * min(others) and r["wall_s"] - min(others) >= OUTLIER_MIN_S:
                out[(p, b, r["seed"])] = min(others)
    return out


def speedups(runs: Sequence[Dict[str, Any]], policy: str, budget: str) -> List[float]:
    """Per seed: full training's wall time over this run's (same seed)."""
    full = {r["seed"]: r["wall_s"] for r in runs if r["policy"] == "full"}
    return [full[r["seed"]] / r["wall_s"] for r in runs
            if r["policy"] == policy and r["budget"] == budget and r["seed"] in full and r["wall_s"] > 0]


def median(xs: Sequence[float]) -> Optional[float]:
    return _median(xs) if xs else None


def signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def gap_text(gap: Interval) -> str:
    """"+0.45 [−0.12, +1.02]", or the mean alone with fewer than 2 seeds."""
    if not gap.n:
        return "-"
    if not gap.defined:
        return signed(gap.mean)
    return f"{signed(gap.mean)} [{signed(gap.lo)}, {signed(gap.hi)}]"


def outlier_notes(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per flagged seed time (``time_outliers``)."""
    wall = {(r["policy"], r["budget"], r["seed"]): r["wall_s"] for r in runs}
    return [f"! {p} at {b}, seed {s}: {wall[(p, b, s)]:.2f} s against {low:.2f} s for its fastest other seed "
            f"(more than {OUTLIER_FACTOR:g}x): a stall or a busy machine, so the speed-ups of that seed are "
            "suspect; rerun it" for (p, b, s), low in time_outliers(runs).items()]
