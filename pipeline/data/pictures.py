"""Pictures (PNG, JPEG and the other formats Pillow reads) decoded in one place."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

__all__ = ["read_picture", "read_picture_frames"]


def read_picture(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Decodes a whole picture file, converted to ``mode`` (e.g. ``"RGB"``, ``"L"``) if given.

    The file is read completely here (not lazily), so a truncated or corrupt file fails now,
    with its name, rather than later inside a conversion. A file of several frames (an
    animated PNG, a GIF, a TIFF stack) gives its first: :func:`read_picture_frames` reads all.

    Args:
        path: the file.
        mode: a Pillow mode, or None to keep the stored one.

    Returns:
        The decoded image, detached from the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a picture Pillow can decode (also a decompression-bomb size).
    """
    return _decode(path, mode, every_frame=False)[0]


def read_picture_frames(path: str | os.PathLike) -> list[Image.Image]:
    """Decodes every frame of a picture file, each in its stored mode (one for a still PNG
    or JPEG; an animated PNG, a GIF or a TIFF stack has more), as :func:`read_picture` does.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a picture Pillow can decode (also a decompression-bomb size).
    """
    return _decode(path, None, every_frame=True)


def _decode(path: str | os.PathLike, mode: str | None, *,
            every_frame: bool) -> list[Image.Image]:
    """The first or every frame of a picture, decoded completely and detached from the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file {p}")
    try:
        with Image.open(p) as img:
            frames = []
            for i in range(getattr(img, "n_frames", 1) if every_frame else 1):
                if i:
                    img.seek(i)
                img.load()
                frames.append(img.convert(mode) if mode is not None else img.copy())
            return frames
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {p}: {exc}") from exc
