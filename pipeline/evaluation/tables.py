"""Per-image evaluation table: schema, scoring into rows, validated CSV I/O, picks."""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.writers import atomic_write_text
from pipeline.metrics import (
    EMPTY_POLICIES,
    compute_dice,
    compute_hd95,
    compute_jaccard,
    compute_precision,
    compute_recall,
)
from pipeline.models.modes import METHODS

__all__ = [
    "EVAL_COLUMNS",
    "KNOWN_METHODS",
    "KNOWN_VIEWS",
    "OPTIONAL_COLUMNS",
    "EvalTable",
    "concat_tables",
    "evaluation_rows",
    "load_tables",
    "ordered_methods",
    "ordered_views",
    "read_eval_table",
    "read_table_provenance",
    "select_cases",
    "write_eval_table",
    "write_table_provenance",
]

#: Required columns of the per-image evaluation CSV, in this order when written.
#: ``case`` (patient/volume or image id), ``view`` (axial, coronal, sagittal, ultrasound, horse
#: or any name), ``slice`` (index of the 2-D image in its case; empty for a whole-volume row),
#: ``method`` (cnn, piecewise, joint or any name), ``jaccard`` and ``dice`` in [0, 1] (empty or
#: NaN when the empty policy excludes the image), ``truth_empty`` and ``pred_empty`` as 0/1.
EVAL_COLUMNS: tuple[str, ...] = (
    "case", "view", "slice", "method", "jaccard", "dice", "truth_empty", "pred_empty",
)
#: Optional columns understood by the reports (others are kept as text): the image path or id,
#: precision, recall and the 95th-percentile Hausdorff distance in mm (empty when undefined),
#: and the pixel counts of the overlap, the prediction and the truth (per-volume 3-D Dice).
OPTIONAL_COLUMNS: tuple[str, ...] = ("image", "precision", "recall", "hd95_mm", "overlap_px",
                                     "pred_px", "truth_px")
#: Method and view names in report order; other names are allowed and sorted after these.
KNOWN_METHODS: tuple[str, ...] = METHODS  # a bundle's model files' names
KNOWN_VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal", "ultrasound", "horse")

_KEY = ("case", "view", "slice", "method")
_TEXT = ("case", "view", "slice", "method", "image")
_COUNTS = ("overlap_px", "pred_px", "truth_px")
_FLOATS = ("jaccard", "dice", "precision", "recall", "hd95_mm", *_COUNTS)
_FRACTIONS = ("jaccard", "dice", "precision", "recall")
_FLAGS = ("truth_empty", "pred_empty")
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


@dataclass
class EvalTable:
    """A validated per-image evaluation table, stored column-wise as numpy arrays.

    Text columns are ``str`` object arrays, :data:`EVAL_COLUMNS` scores and known optional
    scores are float64 (NaN = excluded/undefined), ``truth_empty``/``pred_empty`` are bool.
    Build one with :meth:`from_rows`, :func:`read_eval_table` or :func:`concat_tables`.
    """

    columns: dict[str, np.ndarray]
    source: str = "<rows>"
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.columns["case"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def names(self) -> list[str]:
        """Column names, required ones first."""
        return list(self.columns)

    def where(self, mask: np.ndarray) -> EvalTable:
        """The rows where ``mask`` is true, as a new table."""
        return EvalTable({k: v[mask] for k, v in self.columns.items()}, self.source,
                         list(self.sources))

    def rows(self) -> list[dict]:
        """The table as a list of dicts (one per image, Python scalars)."""
        out = []
        for i in range(len(self)):
            out.append({k: v[i].item() if isinstance(v[i], np.generic) else v[i]
                        for k, v in self.columns.items()})
        return out

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping], *, source: str = "<rows>",
                  header: Sequence[str] | None = None, first_line: int | None = None) -> EvalTable:
        """Validate rows (dicts, values as text or numbers) into a table.

        Args:
            rows: one mapping per image with at least :data:`EVAL_COLUMNS`.
            source: name used in error messages (the file path when read from disk).
            header: the column names (taken from the first row when omitted).
            first_line: line number of the first row in ``source`` (for messages), if a file.

        Returns:
            The table.

        Raises:
            ValueError: a required column is missing, a value does not parse, a Jaccard is
                excluded although the truth is not empty, or a (case, view, slice, method)
                appears twice. The message names ``source``, the row and the column.
        """
        rows = list(rows)
        names = list(header) if header is not None else (list(rows[0]) if rows else [])
        if not rows and header is None:
            names = list(EVAL_COLUMNS)
        missing = [c for c in EVAL_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(map(repr, missing))} "
                             f"(the evaluation table needs {', '.join(EVAL_COLUMNS)})")
        order = list(EVAL_COLUMNS) + [c for c in names if c not in EVAL_COLUMNS]
        values: dict[str, list] = {c: [] for c in order}
        seen: dict[tuple, str] = {}
        for i, row in enumerate(rows):
            where = f"line {first_line + i}" if first_line is not None else f"row {i}"
            parsed = {c: _parse(c, row.get(c, ""), source, where) for c in order}
            for c in ("case", "view", "method"):
                if not parsed[c]:
                    raise ValueError(f"{source}, {where}: column {c!r} is empty")
            if math.isnan(parsed["jaccard"]) and not parsed["truth_empty"]:
                raise ValueError(f"{source}, {where}: column 'jaccard' is empty/NaN but "
                                 f"truth_empty is 0; only an empty ground truth can be excluded")
            key = tuple(parsed[c] for c in _KEY)
            if key in seen:
                raise ValueError(f"{source}, {where}: (case, view, slice, method) = {key} "
                                 f"already appears at {seen[key]}")
            seen[key] = where
            for c in order:
                values[c].append(parsed[c])
        return cls({c: _column(c, v) for c, v in values.items()}, source, [source])


def _column(name: str, values: list) -> np.ndarray:
    if name in _FLAGS:
        return np.asarray(values, dtype=bool)
    if name in _FLOATS:
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values, dtype=object)


def _parse(column: str, value, source: str, where: str):
    text = "" if value is None else str(value).strip()
    if column in _FLAGS:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{source}, {where}: column {column!r} must be 0 or 1, got {text!r}")
    if column in _FLOATS:
        if text == "" or text.lower() == "nan":
            return math.nan
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{source}, {where}: column {column!r} must be a number or "
                             f"empty, got {text!r}") from None
        if column in _FRACTIONS and not 0.0 <= number <= 1.0:
            raise ValueError(f"{source}, {where}: column {column!r} must lie in [0, 1] "
                             f"(a fraction, not a percentage), got {number}")
        if column in ("hd95_mm", *_COUNTS) and not number >= 0.0:
            raise ValueError(f"{source}, {where}: column {column!r} must be >= 0, got {number}")
        return number
    if column == "slice" and text:
        try:
            return str(int(float(text))) if float(text).is_integer() else text
        except ValueError:
            return text
    return text


def concat_tables(tables: Sequence[EvalTable]) -> EvalTable:
    """Stack tables row-wise (columns missing from some tables are filled with empty/NaN).

    Raises:
        ValueError: a (case, view, slice, method) key appears in more than one table.
    """
    if not tables:
        return EvalTable.from_rows([], source="<no tables>")
    names = list(EVAL_COLUMNS)
    for t in tables:
        names += [c for c in t.names if c not in names]
    columns = {}
    for c in names:
        parts = []
        for t in tables:
            if c in t.columns:
                parts.append(t.columns[c])
            else:
                parts.append(np.full(len(t), np.nan) if c in _FLOATS
                             else np.full(len(t), "", dtype=object))
        columns[c] = np.concatenate(parts) if parts else np.empty(0)
    sources = [s for t in tables for s in t.sources]
    merged = EvalTable(columns, " + ".join(sources), sources)
    counts = Counter(zip(*(merged[c] for c in _KEY), strict=True))
    dup = next((k for k, n in counts.items() if n > 1), None)
    if dup is not None:
        raise ValueError(f"{merged.source}: (case, view, slice, method) = {dup} appears in more "
                         f"than one table")
    return merged


def read_eval_table(path: str | os.PathLike) -> EvalTable:
    """Read and validate a per-image evaluation CSV (schema :data:`EVAL_COLUMNS`).

    Args:
        path: the CSV file.

    Returns:
        The table; its ``source`` is the path.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: see :meth:`EvalTable.from_rows`; messages name the file and the column.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise ValueError(f"{path}: empty file, expected a header with "
                             f"{', '.join(EVAL_COLUMNS)}")
        reader.fieldnames = header
        rows = list(reader)
    return EvalTable.from_rows(rows, source=str(path), header=header, first_line=2)


def load_tables(tables: Sequence | str | os.PathLike | EvalTable) -> EvalTable:
    """Accept paths, :class:`EvalTable` objects or lists of row dicts, and concatenate them.

    Args:
        tables: one table or a sequence of tables, each a CSV path, an :class:`EvalTable` or a
            list of row mappings.

    Returns:
        One validated table.
    """
    if isinstance(tables, str | os.PathLike | EvalTable):
        tables = [tables]
    loaded = []
    for i, t in enumerate(tables):
        if isinstance(t, EvalTable):
            loaded.append(t)
        elif isinstance(t, str | os.PathLike):
            loaded.append(read_eval_table(t))
        else:
            loaded.append(EvalTable.from_rows(t, source=f"<rows {i}>"))
    return concat_tables(loaded)


def _format(column: str, value) -> str:
    if column in _FLAGS:
        return "1" if value else "0"
    if column in _COUNTS:
        return "" if math.isnan(float(value)) else str(int(value))
    if column in _FLOATS:
        v = float(value)
        return "" if math.isnan(v) else repr(v)
    return "" if value is None else str(value)


def write_eval_table(table: EvalTable | Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Validate and write a per-image evaluation CSV atomically.

    Args:
        table: an :class:`EvalTable` or row mappings (e.g. from :func:`evaluation_rows`).
        path: destination CSV.

    Returns:
        The path written.

    Raises:
        ValueError: the rows do not satisfy the schema.
    """
    if not isinstance(table, EvalTable):
        table = EvalTable.from_rows(table, source=str(path))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.names)
    for i in range(len(table)):
        writer.writerow([_format(c, table[c][i]) for c in table.names])
    return atomic_write_text(path, buffer.getvalue())


def evaluation_rows(y_pred, y, *, case: str | Sequence[str], view: str | Sequence[str],
                    method: str, slices: Sequence | None = None,
                    images: Sequence[str] | None = None, spacing=None,
                    empty: str = "exclude_empty_truth", surface: bool = True) -> list[dict]:
    """Score a batch of binary masks into rows of the evaluation table.

    Args:
        y_pred: binary predictions, batch-first (B×H×W, B×1×H×W or B×1×H×W×D).
        y: binary ground truth of the same shape.
        case: the case id, one for the batch or one per item.
        view: the view name, one for the batch or one per item.
        method: the method name (``cnn``, ``piecewise``, ``joint``, ...).
        slices: slice index per item (default 0..B-1; ``""`` for whole volumes).
        images: optional image path or id per item (column ``image``).
        spacing: voxel size in mm for ``hd95_mm`` (see :func:`pipeline.metrics.compute_hd95`).
        empty: the Jaccard/Dice empty policy, one of :data:`pipeline.metrics.EMPTY_POLICIES`.
        surface: also compute ``precision``, ``recall`` and ``hd95_mm``.

    Returns:
        One dict per item with :data:`EVAL_COLUMNS`, the pixel counts ``overlap_px``,
        ``pred_px``, ``truth_px`` (+ ``image`` and the surface columns).
    """
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    jac = compute_jaccard(y_pred, y, empty=empty)
    dice = compute_dice(y_pred, y, empty=empty)
    # score_empty gives 1/0 when the truth is empty; the flags come from the raw overlap counts
    raw = compute_recall(y_pred, y)
    prec = compute_precision(y_pred, y)
    n = len(jac)
    truth_empty = np.isnan(raw)
    pred_empty = np.isnan(prec)
    cases = [case] * n if isinstance(case, str) else list(case)
    views = [view] * n if isinstance(view, str) else list(view)
    slices = list(range(n)) if slices is None else list(slices)
    if not len(cases) == len(views) == len(slices) == n or (images is not None
                                                            and len(images) != n):
        raise ValueError(f"case/view/slices/images must have one entry per item ({n})")
    hd = compute_hd95(y_pred, y, spacing=spacing) if surface else None
    pred_flat = np.asarray(y_pred).reshape(n, -1).astype(bool)
    truth_flat = np.asarray(y).reshape(n, -1).astype(bool)
    overlap = (pred_flat & truth_flat).sum(1)
    rows = []
    for i in range(n):
        row = {"case": cases[i], "view": views[i], "slice": slices[i], "method": method,
               "jaccard": float(jac[i]), "dice": float(dice[i]),
               "truth_empty": int(truth_empty[i]), "pred_empty": int(pred_empty[i]),
               "overlap_px": int(overlap[i]), "pred_px": int(pred_flat[i].sum()),
               "truth_px": int(truth_flat[i].sum())}
        if images is not None:
            row["image"] = str(images[i])
        if surface:
            row.update(precision=float(prec[i]), recall=float(raw[i]), hd95_mm=float(hd[i]))
        rows.append(row)
    return rows


def _ordered(values: Iterable[str], known: Sequence[str]) -> list[str]:
    present = set(values)
    return [v for v in known if v in present] + sorted(present - set(known))


def ordered_views(table: EvalTable) -> list[str]:
    """The table's views, known ones (:data:`KNOWN_VIEWS`) first in their order, then sorted."""
    return _ordered(table["view"], KNOWN_VIEWS)


def ordered_methods(table: EvalTable) -> list[str]:
    """The table's methods, ``cnn``, ``piecewise``, ``joint`` first, then the others sorted."""
    return _ordered(table["method"], KNOWN_METHODS)


def select_cases(table: EvalTable, method: str, *,
                 which: Sequence[str] = ("best", "median", "worst"),
                 views: Sequence[str] | None = None) -> dict[str, dict[str, dict]]:
    """Pick example images per view by one method's Jaccard, for qualitative figures.

    ``best`` is the highest Jaccard, ``worst`` the lowest, ``median`` the image at the lower
    median rank (a real image, not an average); ties are broken by (case, slice).

    Args:
        table: the evaluation table.
        method: the method whose Jaccard ranks the images.
        which: any of ``best``, ``median``, ``worst``.
        views: views to pick from (default: all of the table's views).

    Returns:
        ``{view: {pick: row dict}}``; a view with no scored image maps to ``{}``.

    Raises:
        ValueError: an unknown pick name.
    """
    bad = [w for w in which if w not in ("best", "median", "worst")]
    if bad:
        raise ValueError(f"which must be among best, median, worst; got {bad}")
    out: dict[str, dict[str, dict]] = {}
    for view in views if views is not None else ordered_views(table):
        mask = (table["view"] == view) & (table["method"] == method) & ~np.isnan(table["jaccard"])
        rows = sorted(table.where(mask).rows(),
                      key=lambda r: (r["jaccard"], str(r["case"]), str(r["slice"])))
        picks: dict[str, dict] = {}
        if rows:
            index = {"worst": 0, "median": (len(rows) - 1) // 2, "best": len(rows) - 1}
            picks = {w: rows[index[w]] for w in which}
        out[view] = picks
    return out


def _sidecar(table: str | os.PathLike) -> Path:
    path = Path(table)
    return path.with_name(path.stem + ".provenance.json")


def write_table_provenance(table: str | os.PathLike,
                           runs: Mapping[str, str | os.PathLike],
                           truth: str | None = None) -> Path:
    """Writes ``<table stem>.provenance.json`` beside an evaluation table: each method's
    checkpoint path and sha256, and what the ground truth was where that is a choice
    (``truth``), so a report made from the table names them."""
    import json

    from pipeline.data.hashing import sha256_file

    record: dict = {"checkpoints": {m: {"path": str(p), "sha256": sha256_file(p)}
                                    for m, p in runs.items()}}
    if truth is not None:
        record["truth"] = truth
    return atomic_write_text(_sidecar(table), json.dumps(record, indent=2) + "\n")


def read_table_provenance(tables: Iterable[str | os.PathLike]) -> dict:
    """The checkpoints recorded beside the given tables (see :func:`write_table_provenance`),
    ``{"checkpoints": {method: {...}}}`` merged (a method named twice with other files is
    listed once per table as ``method (table)``), with ``"truth"`` where a table recorded
    one (several joined by "; "); empty where none was recorded."""
    import json

    merged: dict[str, dict] = {}
    truths: list[str] = []
    for table in tables:
        sidecar = _sidecar(table)
        if not sidecar.is_file():
            continue
        try:
            written = json.loads(sidecar.read_text())
            found = written.get("checkpoints") or {}
        except (ValueError, AttributeError):
            continue
        if isinstance(written.get("truth"), str) and written["truth"] not in truths:
            truths.append(written["truth"])
        for method, record in found.items():
            key = method if merged.get(method, record) == record else f"{method} ({table})"
            merged[key] = record
    out: dict = {"checkpoints": merged} if merged else {}
    if truths:
        out["truth"] = "; ".join(truths)
    return out
