"""``split.json``: split name → list of image or case names, read and validated once for all."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["SPLIT_FILE", "read_split", "split_members"]

SPLIT_FILE = "split.json"


def read_split(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Reads and validates ``split.json``: a JSON object of split name → list of names (images
    of a 2-D set, case folders of a cohort), no name in two splits.

    Args:
        root: the folder holding ``split.json``.

    Returns:
        Split name → names, in file order (e.g. ``"training"`` and ``"validation"``).

    Raises:
        FileNotFoundError: no ``split.json``.
        ValueError: ``split.json`` cannot be read, is not valid JSON, not an object of
            non-empty lists of unique names (not empty, ``.`` or ``..``, without path
            separators), or a name is in two splits.
    """
    path = Path(root) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no split file {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path} must be a non-empty JSON object of split name -> list of names")
    seen: dict[str, str] = {}
    for split, names in raw.items():
        if not isinstance(names, list) or not names:
            raise ValueError(f"{path}: split {split!r} must be a non-empty list of names")
        for item in names:
            if (not isinstance(item, str) or item in ("", ".", "..") or "/" in item
                    or "\\" in item):
                raise ValueError(f"{path}: split {split!r} has an invalid name {item!r}")
            if item in seen:
                where = "twice" if seen[item] == split else f"also in {seen[item]!r}"
                raise ValueError(f"{path}: {item!r} is listed in {split!r} {where}")
            seen[item] = split
    return {split: list(names) for split, names in raw.items()}


def split_members(root: str | os.PathLike[str], split: str) -> list[str]:
    """The names listed under one split of ``root/split.json`` (see :func:`read_split`).

    Raises:
        FileNotFoundError: no ``split.json``.
        ValueError: a malformed file, or no such split (the message lists the splits it has).
    """
    splits = read_split(root)
    if split not in splits:
        raise ValueError(f"{Path(root) / SPLIT_FILE}: no split {split!r} (has {sorted(splits)})")
    return splits[split]
