"""How the benchmark scripts print their measures and targets (one format for all)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def print_measures(out: Mapping[str, object], width: int = 40) -> None:
    """One line per scalar measure (nested dicts are skipped: they go to the JSON line)."""
    print(f"{'measure':{width}s} {'value':>14s}")
    for key, value in out.items():
        if isinstance(value, dict):
            continue
        shown = f"{value:14.4g}" if isinstance(value, float) else f"{value!s:>14}"
        print(f"{key:{width}s} {shown}")
    print()


def print_targets(out: Mapping[str, float], targets: Sequence[tuple[str, str, float]]) -> None:
    """``target KEY OP BOUND: met|MISSED (value)`` for each (key, ``<=``/``>=``, bound)."""
    for key, op, bound in targets:
        ok = out[key] <= bound if op == "<=" else out[key] >= bound
        print(f"target {key} {op} {bound}: {'met' if ok else 'MISSED'} ({out[key]:.4g})")
