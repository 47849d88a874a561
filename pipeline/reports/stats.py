"""Statistics over the evaluation table: per-view summaries, paired method comparisons, picks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

from pipeline.evaluation.tables import EvalTable, ordered_methods, ordered_views

__all__ = [
    "ALL_VIEWS",
    "DEFAULT_COMPARISONS",
    "NO_LABELS_NOTE",
    "GroupSummary",
    "PairedComparison",
    "VolumeScore",
    "bootstrap_ci",
    "compare_all",
    "compare_methods",
    "comparison_pairs",
    "paired_differences",
    "summarize",
    "volume_scores",
    "wilcoxon_test",
]

#: The view label of rows pooled over all views.
ALL_VIEWS = "all"
#: Paired comparisons made by default (method A minus method B), when both are present.
DEFAULT_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("joint", "piecewise"), ("joint", "cnn"), ("piecewise", "cnn"),
    ("joint_lp", "joint"),  # joint training with the learned edge feature (issue 20)
)
#: What a summary says instead of a number when no image could be scored.
NO_LABELS_NOTE = "no image with a non-empty ground truth: mean Jaccard undefined"


@dataclass(frozen=True)
class GroupSummary:
    """Jaccard summary of one (view, method) group; Jaccard values are fractions in [0, 1].

    ``n_excluded`` counts images whose Jaccard is excluded by the empty policy (empty ground
    truth); ``n_false_positive`` counts the excluded images with a non-empty prediction, so the
    exclusion hides nothing. ``std_jaccard`` is the sample standard deviation (ddof=1) of the
    per-image Jaccard, NaN with fewer than two scored images; means are NaN when nothing is
    scored, and ``note`` then says why. Precision, recall and HD95 are means over the scored
    images where the table has them (NaN otherwise); ``mean_volume_dice`` is the mean 3-D Dice
    of the group's ``n_volumes`` volumes (see :func:`volume_scores`).
    """

    view: str
    method: str
    n_images: int
    n_scored: int
    n_excluded: int
    n_truth_empty: int
    n_false_positive: int
    mean_jaccard: float
    std_jaccard: float
    median_jaccard: float
    mean_dice: float
    note: str = ""
    mean_precision: float = math.nan
    mean_recall: float = math.nan
    mean_hd95_mm: float = math.nan
    n_volumes: int = 0
    mean_volume_dice: float = math.nan

    def to_dict(self) -> dict:
        """Field dict (NaN kept as float NaN)."""
        return asdict(self)


@dataclass(frozen=True)
class VolumeScore:
    """3-D Dice of one volume (case) in one view and method, from the per-slice pixel counts:
    2·Σ overlap / (Σ prediction + Σ truth), over all its slices (empty ones included)."""

    case: str
    view: str
    method: str
    n_slices: int
    dice: float
    truth_px: int
    pred_px: int

    def to_dict(self) -> dict:
        """Field dict."""
        return asdict(self)


def volume_scores(table: EvalTable) -> list[VolumeScore]:
    """Per-volume 3-D Dice of every (case, view, method) with more than one slice, where the
    table has the pixel counts (``overlap_px``, ``pred_px``, ``truth_px``); empty otherwise."""
    if not all(c in table.names for c in ("overlap_px", "pred_px", "truth_px")):
        return []
    groups: dict[tuple, list[int]] = {}
    for i in range(len(table)):
        if not np.isfinite(table["overlap_px"][i]):
            continue
        groups.setdefault((table["case"][i], table["view"][i], table["method"][i]),
                          []).append(i)
    out = []
    for (case, view, method), rows in groups.items():
        if len(rows) < 2:
            continue  # a 2-D image: its Dice is already the image's
        overlap = float(np.sum(table["overlap_px"][rows]))
        pred = float(np.sum(table["pred_px"][rows]))
        truth = float(np.sum(table["truth_px"][rows]))
        dice = 2 * overlap / (pred + truth) if truth > 0 else math.nan
        out.append(VolumeScore(case, view, method, len(rows), dice, int(truth), int(pred)))
    order = {m: k for k, m in enumerate(ordered_methods(table))}
    views = {v: k for k, v in enumerate(ordered_views(table))}
    return sorted(out, key=lambda v: (views.get(v.view, 99), v.case, order.get(v.method, 99)))


def _column_mean(rows: EvalTable, column: str, scored: np.ndarray) -> float:
    if column not in rows.names:
        return math.nan
    values = np.asarray(rows[column], dtype=np.float64)[scored]
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _summary(view: str, method: str, rows: EvalTable) -> GroupSummary:
    jac = rows["jaccard"]
    scored = ~np.isnan(jac)
    excluded = ~scored
    n_scored = int(scored.sum())
    values = jac[scored]
    dice = rows["dice"][scored]
    volumes = volume_scores(rows)
    note = ""
    if len(rows) == 0:
        note = "no image evaluated"
    elif n_scored == 0:
        note = NO_LABELS_NOTE if rows["truth_empty"].all() else "no image scored: mean undefined"
    return GroupSummary(
        view=view, method=method, n_images=len(rows), n_scored=n_scored,
        n_excluded=int(excluded.sum()), n_truth_empty=int(rows["truth_empty"].sum()),
        n_false_positive=int((excluded & rows["truth_empty"] & ~rows["pred_empty"]).sum()),
        mean_jaccard=float(values.mean()) if n_scored else math.nan,
        std_jaccard=float(values.std(ddof=1)) if n_scored > 1 else math.nan,
        median_jaccard=float(np.median(values)) if n_scored else math.nan,
        mean_dice=float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan,
        note=note,
        mean_precision=_column_mean(rows, "precision", scored),
        mean_recall=_column_mean(rows, "recall", scored),
        mean_hd95_mm=_column_mean(rows, "hd95_mm", scored),
        n_volumes=len(volumes),
        mean_volume_dice=float(np.nanmean([v.dice for v in volumes]))
        if any(math.isfinite(v.dice) for v in volumes) else math.nan,
    )


def summarize(table: EvalTable, *, pooled: bool | None = None) -> list[GroupSummary]:
    """Per view × method Jaccard summaries (views, then methods, in report order).

    Args:
        table: the evaluation table.
        pooled: also add one row per method pooled over all views (view :data:`ALL_VIEWS`);
            by default only when the table has more than one view.

    Returns:
        One :class:`GroupSummary` per (view, method) present.
    """
    views = ordered_views(table)
    methods = ordered_methods(table)
    if pooled is None:
        pooled = len(views) > 1
    out = []
    for view in [*views, ALL_VIEWS] if pooled else views:
        in_view = np.ones(len(table), bool) if view == ALL_VIEWS and pooled \
            else table["view"] == view
        for method in methods:
            mask = in_view & (table["method"] == method)
            if mask.any():
                out.append(_summary(view, method, table.where(mask)))
    return out


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0,
                 max_block: int = 4_000_000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``scipy.stats.bootstrap``, in blocks).

    The resamples are ``scipy.stats.bootstrap``'s, drawn from ``numpy.random.default_rng(seed)``
    in blocks of at most ``max_block`` values; the interval is ``numpy.quantile`` (linear) of
    their means at (1 − confidence)/2 and (1 + confidence)/2.

    Args:
        values: the sample (e.g. paired differences).
        n_boot: number of resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the numpy generator (the interval is reproducible).
        max_block: at most this many resampled values are held at once.

    Returns:
        (low, high); NaNs for an empty sample.

    Raises:
        ValueError: ``n_boot`` < 1 or ``confidence`` outside (0, 1).
    """
    if n_boot < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:  # scipy refuses one observation; every resample of it is that value
        return float(v[0]), float(v[0])
    with warnings.catch_warnings():
        # scipy's standard error and interval (both unused) warn for n_boot = 1 or NaN values
        warnings.simplefilter("ignore", RuntimeWarning)
        result = sps.bootstrap((v,), np.mean, n_resamples=n_boot, batch=max(1, max_block // n),
                               vectorized=True, confidence_level=confidence,
                               method="percentile", rng=np.random.default_rng(seed))
    # The interval is not scipy's ``result.confidence_interval`` (measured with scipy 1.17.1,
    # issue 19): scipy draws the same indices as the hand-written loop this replaced
    # (``rng.integers(0, n, (batch, n))`` per block; the bootstrap distributions were bit-equal
    # in 188/188 cases, 62 of them the paired comparisons of the real evaluation tables), but it
    # takes the percentiles with ``scipy.stats.quantile``, whose interpolation
    # (1 − g)·y[j] + g·y[j+1] rounds differently from ``numpy.quantile``: the intervals were
    # equal in only 10 of the 62 real comparisons (e.g. a high end 0.010801246031645777 where
    # numpy gives 0.010801246031645775; at most 4.2e-17 apart). ``numpy.quantile`` keeps the
    # figures; scipy's loop is also 2× slower (0.84 vs 0.44 ms for n = 50), which is immaterial.
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(result.bootstrap_distribution, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilcoxon_test(differences: Sequence[float] | np.ndarray) -> tuple[float, float, str]:
    """Two-sided Wilcoxon signed-rank test of paired differences (``scipy.stats.wilcoxon``
    with its defaults: zero differences are dropped, ``zero_method="wilcox"``).

    Args:
        differences: paired differences (A − B).

    Returns:
        (statistic, p-value, note). No pairs: (NaN, NaN, note). All differences zero (the methods
        agree on every image): (NaN, 1.0, note) — no evidence of a difference. Warnings scipy
        raises (e.g. about ties) are returned in the note instead of being printed.
    """
    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    if d.size == 0:
        return math.nan, math.nan, "no paired images"
    if not np.any(d != 0):
        return math.nan, 1.0, "all paired differences are zero: no evidence of a difference"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    notes = [str(w.message) for w in caught]
    n_zero = int(np.sum(d == 0))
    if n_zero:
        notes.insert(0, f"{n_zero} zero difference(s) dropped")
    return float(result.statistic), float(result.pvalue), "; ".join(notes)


@dataclass(frozen=True)
class PairedComparison:
    """Method A − method B on the same images (matched by case, view, slice), Jaccard fractions.

    Only images scored by both methods enter; ``n_unmatched`` counts scored images of either
    method without a scored partner. ``wins``/``losses``/``ties``: images where A is
    better/worse/equal. The interval is a seeded percentile bootstrap of the mean difference.
    """

    view: str
    method_a: str
    method_b: str
    n_pairs: int
    mean_a: float
    mean_b: float
    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    wilcoxon_statistic: float
    p_value: float
    wins: int
    losses: int
    ties: int
    n_unmatched: int
    note: str = ""

    def to_dict(self) -> dict:
        """Field dict (NaN kept as float NaN)."""
        return asdict(self)


def _scored_by_key(table: EvalTable, method: str, view: str | None) -> dict[tuple, float]:
    mask = (table["method"] == method) & ~np.isnan(table["jaccard"])
    if view is not None and view != ALL_VIEWS:
        mask &= table["view"] == view
    sub = table.where(mask)
    return dict(zip(zip(sub["case"], sub["view"], sub["slice"], strict=True),
                    sub["jaccard"].tolist(), strict=True))


def paired_differences(table: EvalTable, method_a: str, method_b: str,
                       view: str | None = None) -> tuple[list[tuple], np.ndarray, np.ndarray, int]:
    """Jaccard of two methods on the images both scored.

    Args:
        table: the evaluation table.
        method_a: first method.
        method_b: second method.
        view: restrict to one view (``None`` or :data:`ALL_VIEWS`: all views).

    Returns:
        (keys (case, view, slice) sorted, Jaccard of A, Jaccard of B, number of unmatched
        scored images).
    """
    a = _scored_by_key(table, method_a, view)
    b = _scored_by_key(table, method_b, view)
    keys = sorted(a.keys() & b.keys())
    unmatched = len(a.keys() ^ b.keys())
    ja = np.array([a[k] for k in keys], dtype=np.float64)
    jb = np.array([b[k] for k in keys], dtype=np.float64)
    return keys, ja, jb, unmatched


def compare_methods(table: EvalTable, method_a: str, method_b: str, *, view: str | None = None,
                    n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                    tie_tolerance: float = 1e-12) -> PairedComparison:
    """Paired comparison of two methods' per-image Jaccard.

    Args:
        table: the evaluation table.
        method_a: method A (the difference is A − B).
        method_b: method B.
        view: one view, or ``None``/:data:`ALL_VIEWS` for all views pooled.
        n_boot: bootstrap resamples.
        confidence: interval coverage.
        seed: bootstrap seed.
        tie_tolerance: |A − B| at most this counts as a tie.

    Returns:
        The :class:`PairedComparison`.
    """
    _, ja, jb, unmatched = paired_differences(table, method_a, method_b, view)
    d = ja - jb
    n = d.size
    stat, p, note = wilcoxon_test(d)
    low, high = bootstrap_ci(d, n_boot=n_boot, confidence=confidence, seed=seed)
    notes = [note] if note else []
    if unmatched:
        notes.append(f"{unmatched} scored image(s) without a scored partner left out")
    return PairedComparison(
        view=view or ALL_VIEWS, method_a=method_a, method_b=method_b, n_pairs=n,
        mean_a=float(ja.mean()) if n else math.nan, mean_b=float(jb.mean()) if n else math.nan,
        mean_difference=float(d.mean()) if n else math.nan, ci_low=low, ci_high=high,
        confidence=confidence, n_boot=n_boot, wilcoxon_statistic=stat, p_value=p,
        wins=int(np.sum(d > tie_tolerance)), losses=int(np.sum(d < -tie_tolerance)),
        ties=int(np.sum(np.abs(d) <= tie_tolerance)), n_unmatched=unmatched,
        note="; ".join(notes),
    )


def compare_all(table: EvalTable, pairs: Sequence[tuple[str, str]] = DEFAULT_COMPARISONS, *,
                n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                pooled: bool | None = None) -> list[PairedComparison]:
    """:func:`compare_methods` for each pair whose two methods are in the table, per view.

    Args:
        table: the evaluation table.
        pairs: (A, B) method pairs.
        n_boot: bootstrap resamples.
        confidence: interval coverage.
        seed: bootstrap seed.
        pooled: also compare over all views pooled (default: when there are several views).

    Returns:
        Comparisons ordered by pair, then view.
    """
    methods = set(table["method"])
    views = ordered_views(table)
    if pooled is None:
        pooled = len(views) > 1
    out = []
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        for view in [*views, ALL_VIEWS] if pooled else views:
            out.append(compare_methods(table, a, b, view=view, n_boot=n_boot,
                                       confidence=confidence, seed=seed))
    return out




def comparison_pairs(table: EvalTable, baseline: str | None = None) -> list[tuple[str, str]]:
    """The (A, B) pairs a report compares: with ``baseline``, every other method against it;
    else :data:`DEFAULT_COMPARISONS` where both methods are present, and where none is, every
    pair of the table's methods (a later method minus an earlier one, in report order).

    Raises:
        ValueError: ``baseline`` is not a method of the table.
    """
    methods = ordered_methods(table)
    if baseline is not None:
        if baseline not in methods:
            raise ValueError(f"--baseline {baseline!r} is not a method of the tables "
                             f"({', '.join(methods) or 'none'})")
        return [(m, baseline) for m in methods if m != baseline]
    present = [(a, b) for a, b in DEFAULT_COMPARISONS if a in methods and b in methods]
    if present:
        return present
    return [(methods[j], methods[i]) for i in range(len(methods))
            for j in range(i + 1, len(methods))]
