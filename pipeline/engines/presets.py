"""Training presets shipped inside the package (``pipeline/configs/*.json``), found by name."""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "find_preset", "preset_names"]

#: The preset a stage trains with unless told otherwise: the CPU-sized ``cpu`` preset.
DEFAULT_CONFIG = "cpu"


def _preset_folder() -> Traversable:
    """The packaged presets: package data of ``pipeline``, wherever the package is installed."""
    return resources.files("pipeline") / "configs"


def preset_names() -> list[str]:
    """The names of the packaged presets (``cpu``, ``paper``, ``horse_cpu``, ...), sorted."""
    return sorted(entry.name.removesuffix(".json") for entry in _preset_folder().iterdir()
                  if entry.name.endswith(".json"))


def find_preset(preset: str | os.PathLike) -> Path | Traversable:
    """The file a preset setting names: an existing file as given, else a packaged preset.

    Args:
        preset: a JSON file's path, or a packaged preset's name with or without ``.json``
            (``cpu``, ``horse_cpu.json``); a file of that name takes precedence.

    Returns:
        The file to read (a path, or a package resource with ``read_text``).

    Raises:
        ValueError: neither an existing file nor a preset's name (the names are listed).
    """
    path = Path(preset)
    if path.is_file():
        return path
    name = str(preset).removesuffix(".json")
    if name in preset_names():
        return _preset_folder() / f"{name}.json"
    raise ValueError(f"{preset}: cannot read training config (no such file, and no preset of "
                     f"that name: {', '.join(preset_names())})")
