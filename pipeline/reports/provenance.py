"""Provenance of a report: configuration, git commit, manifest hash, versions, machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

__all__ = ["PROVENANCE_PACKAGES", "collect_provenance", "flatten_provenance"]

#: Distributions whose versions are recorded.
PROVENANCE_PACKAGES: tuple[str, ...] = (
    "torch", "monai", "pytorch-ignite", "numpy", "scipy", "cvxpy", "PyMaxflow", "nibabel",
)
_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_provenance(config: Mapping | None = None,
                       manifest: str | os.PathLike | None = None) -> dict[str, object]:
    """Gather what is needed to reproduce a report.

    Args:
        config: the run's configuration (any JSON-serialisable mapping), stored as given.
        manifest: the data manifest used; its path and SHA-256 are recorded.

    Returns:
        A dict with ``git_commit`` (``"unknown"`` outside a git checkout or without git),
        ``git_dirty`` (uncommitted changes, or ``"unknown"``), ``python``, ``platform``,
        ``machine``, ``cpu_count``, ``packages`` (``{name: version or "not installed"}``),
        ``manifest``/``manifest_sha256`` when given and ``config`` when given.

    Raises:
        FileNotFoundError: ``manifest`` does not exist.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, object] = {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine() or "unknown",
        "cpu_count": os.cpu_count() or 0,
        "packages": {name: _version(name) for name in PROVENANCE_PACKAGES},
    }
    if manifest is not None:
        from pipeline.data.manifests import manifest_hash  # one hashing rule for manifests

        info["manifest"] = str(Path(manifest))
        info["manifest_sha256"] = manifest_hash(manifest)
    if config is not None:
        info["config"] = json.loads(json.dumps(dict(config), default=str))
    return info


def flatten_provenance(provenance: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """Nested provenance as (dotted key, text value) rows for a two-column table.

    Args:
        provenance: e.g. from :func:`collect_provenance`, possibly with nested mappings.
        prefix: key prefix (used in the recursion).

    Returns:
        Rows in insertion order; lists are written as JSON.
    """
    rows: list[tuple[str, str]] = []
    for key, value in provenance.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += flatten_provenance(value, f"{name}.")
        elif isinstance(value, list | tuple | Mapping):
            rows.append((name, json.dumps(value, default=str)))
        else:
            rows.append((name, str(value)))
    return rows
