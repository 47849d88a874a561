"""The training modes (cnn, piecewise, joint) and the method names of a bundle's model files."""

from __future__ import annotations

__all__ = ["METHODS", "MODES"]

#: The training modes, in the order they are run (each later one starts from the one before).
MODES: tuple[str, ...] = ("cnn", "piecewise", "joint")

#: Every method name a bundle's ``models/`` file may carry, in report order: one per mode,
#: then ``joint_lp``, joint training with the learned pairwise term (off by default, so never
#: a bundle's default model).
METHODS: tuple[str, ...] = (*MODES, "joint_lp")
