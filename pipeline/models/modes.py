"""The training modes (cnn, piecewise, joint): the one list the trainer and model files share."""

from __future__ import annotations

__all__ = ["MODES"]

#: The training modes, in the order they are run (each later one starts from the one before);
#: also the method names of a bundle's ``models/`` files, in report order.
MODES: tuple[str, ...] = ("cnn", "piecewise", "joint")
