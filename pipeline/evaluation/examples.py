"""Example images picked for qualitative figures, with every method's mask; saved as npz."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.writers import atomic_write_bytes
from pipeline.evaluation.tables import KNOWN_VIEWS

__all__ = [
    "PICKS",
    "QualitativeCase",
    "QualitativeCases",
]


#: The picks of a view, in the order they are drawn (top to bottom).
PICKS: tuple[str, ...] = ("best", "median", "worst")


_FORMAT = "mmcrf-qualitative-cases/1"


@dataclass
class QualitativeCase:
    """One picked 2-D image with its ground truth and every method's mask.

    Attributes:
        view: the view it belongs to.
        pick: ``best``, ``median`` or ``worst`` (by the ranking method's Jaccard).
        case: the ``case`` of its evaluation-table rows.
        slice: the ``slice`` of its rows (text, as in the table).
        image: C×H×W (or H×W) image as the model saw it.
        truth: H×W uint8 {0,1} ground truth.
        predictions: ``{method: H×W uint8 mask}``.
        jaccards: ``{method: Jaccard}`` from the evaluation table (fractions, NaN = excluded).
        image_id: the row's ``image`` column (sample id), if any.
    """

    view: str
    pick: str
    case: str
    slice: str
    image: np.ndarray
    truth: np.ndarray
    predictions: dict[str, np.ndarray]
    jaccards: dict[str, float] = field(default_factory=dict)
    image_id: str = ""

    @property
    def label(self) -> str:
        """Short text naming the image: ``best: <case>, slice <n>``."""
        where = f"{self.case}, slice {self.slice}" if self.slice != "" else self.case
        return f"{self.pick}: {where}"


@dataclass
class QualitativeCases:
    """The picked images of an evaluation, ranked by one method's Jaccard.

    Build it with :func:`pipeline.engines.evaluate.evaluate_runs_with_examples` or
    :func:`pipeline.engines.evaluate.collect_examples`; draw it with
    :func:`qualitative_figures`; store it with :meth:`save` / :meth:`load`.
    """

    method: str
    cases: list[QualitativeCase] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def views(self) -> list[str]:
        """The views present, known views first (axial, coronal, sagittal, ...)."""
        present = {c.view for c in self.cases}
        return [v for v in KNOWN_VIEWS if v in present] + sorted(present - set(KNOWN_VIEWS))

    @property
    def methods(self) -> list[str]:
        """The methods whose masks are kept, in drawing order."""
        return list(self.cases[0].predictions) if self.cases else []

    def of_view(self, view: str) -> list[QualitativeCase]:
        """The picks of one view in :data:`PICKS` order."""
        rank = {p: i for i, p in enumerate(PICKS)}
        return sorted((c for c in self.cases if c.view == view),
                      key=lambda c: rank.get(c.pick, len(rank)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write everything to one compressed ``.npz`` (atomically; no pickled objects).

        Args:
            path: destination file (``.npz``).

        Returns:
            The path written.
        """
        arrays: dict[str, np.ndarray] = {}
        meta = {"format": _FORMAT, "method": self.method, "cases": []}
        for k, case in enumerate(self.cases):
            arrays[f"image_{k}"] = np.asarray(case.image, dtype=np.float32)
            arrays[f"truth_{k}"] = np.asarray(case.truth, dtype=np.uint8)
            methods = list(case.predictions)
            for j, method in enumerate(methods):
                arrays[f"pred_{k}_{j}"] = np.asarray(case.predictions[method], dtype=np.uint8)
            meta["cases"].append({
                "view": case.view, "pick": case.pick, "case": case.case, "slice": case.slice,
                "image_id": case.image_id, "methods": methods,
                "jaccards": {m: (None if math.isnan(v) else v)
                             for m, v in ((m, float(case.jaccards.get(m, math.nan)))
                                          for m in methods)},
            })
        arrays["meta"] = np.asarray(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualitativeCases:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a saved set of qualitative cases (names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file of qualitative cases")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].item())
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"unknown format {meta.get('format')!r}")
                cases = []
                for k, m in enumerate(meta["cases"]):
                    cases.append(QualitativeCase(
                        view=m["view"], pick=m["pick"], case=m["case"], slice=m["slice"],
                        image=data[f"image_{k}"], truth=data[f"truth_{k}"],
                        predictions={method: data[f"pred_{k}_{j}"]
                                     for j, method in enumerate(m["methods"])},
                        jaccards={method: (math.nan if v is None else float(v))
                                  for method, v in m["jaccards"].items()},
                        image_id=m.get("image_id", "")))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a file of qualitative cases written by "
                             f"QualitativeCases.save ({type(err).__name__}: {err})") from None
        return cls(method=meta["method"], cases=cases)
