"""Pictures (PNG, JPEG and the other formats Pillow reads) decoded in one place."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

__all__ = ["read_picture"]


def read_picture(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Decodes a whole picture file, converted to ``mode`` (e.g. ``"RGB"``, ``"L"``) if given.

    The file is read completely here (not lazily), so a truncated or corrupt file fails now,
    with its name, rather than later inside a conversion.

    Args:
        path: the file.
        mode: a Pillow mode, or None to keep the stored one.

    Returns:
        The decoded image, detached from the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a picture Pillow can decode (also a decompression-bomb size).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file {p}")
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert(mode) if mode is not None else img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {p}: {exc}") from exc
