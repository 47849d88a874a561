"""Example images for qualitative figures: the best, median and worst image of each view with
every method's mask (paper Fig. 1–2), kept small and saved as one ``.npz``."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.evaluation.examples import QualitativeCases
from pipeline.reports.figures import ReportFigure, plot_qualitative_grid

__all__ = ["qualitative_figures"]


def qualitative_figures(cases: QualitativeCases, *, views: Sequence[str] | None = None,
                        methods: Sequence[str] | None = None, dpi: int = 100
                        ) -> list[ReportFigure]:
    """One figure per view: its best, median and worst image (rows), each with the ground
    truth and every method's outline and Jaccard (columns), like the paper's Fig. 1–2.

    Args:
        cases: the picked images (see :class:`QualitativeCases`).
        views: views to draw (default: all views of ``cases``, in report order); a view
            without picks (nothing scored) is skipped.
        methods: methods to draw, in this order (default: all kept ones).
        dpi: resolution.

    Returns:
        Figures for :func:`pipeline.reports.build_report` (``figures=``), named
        ``qualitative_<view>``.

    Raises:
        ValueError: a requested method is not kept in ``cases``.
    """
    out = []
    for view in views if views is not None else cases.views:
        picked = cases.of_view(view)
        if not picked:
            continue
        names = list(methods) if methods is not None else list(picked[0].predictions)
        for case in picked:
            missing = [m for m in names if m not in case.predictions]
            if missing:
                raise ValueError(f"no mask of method(s) {missing} kept for {case.label} "
                                 f"({view}); kept: {list(case.predictions)}")
        png = plot_qualitative_grid(
            [c.image for c in picked], [c.truth for c in picked],
            [{m: c.predictions[m] for m in names} for c in picked],
            jaccards=[c.jaccards for c in picked], row_labels=[c.label for c in picked],
            title=f"{view}: {', '.join(c.pick for c in picked)} by the Jaccard of "
                  f"{cases.method}", dpi=dpi)
        caption = (f"{view.capitalize()} view: the {', '.join(c.pick for c in picked)} image by "
                   f"the per-image Jaccard of {cases.method}. Green: ground truth; one panel "
                   f"per method ({', '.join(names)}) with its outline and its Jaccard in the "
                   f"corner, as in the paper's Fig. 1–2. Images, masks and these Jaccards "
                   f"are at {picked[0].truth.shape[0]}×{picked[0].truth.shape[1]} px, the size "
                   f"the examples were scored at (`mmcrf evaluate --run`: the model's "
                   f"training size); a table made at another size (`evaluate --images` scores "
                   f"at each image's own) can give other numbers for the same image.")
        out.append(ReportFigure(f"Qualitative results, {view} view", png, caption,
                                f"qualitative_{view}"))
    return out
