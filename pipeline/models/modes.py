"""The training modes (cnn, piecewise, joint) and the method names of a bundle's model files."""

from __future__ import annotations

__all__ = ["METHODS", "MODES", "VARIANTS"]

#: The training modes, in the order they are run (each later one starts from the one before);
#: also the method names of a bundle's ``models/`` files, in report order.
MODES: tuple[str, ...] = ("cnn", "piecewise", "joint")

#: Model files a bundle may ship beside one per mode: a mode trained with an option on, and
#: the mode it extends. ``joint_lp``: joint training with the learned pairwise term (off by
#: default, so never a bundle's default model).
VARIANTS: dict[str, str] = {"joint_lp": "joint"}

#: Every method name a bundle's ``models/`` file may carry, in report order.
METHODS: tuple[str, ...] = (*MODES, *VARIANTS)
