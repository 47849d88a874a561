"""MONAI transforms of the method: the CRF as postprocessing in any ``Compose``."""

from __future__ import annotations

from pipeline.transforms.crf import GraphCutCRF, GraphCutCRFd, crf_settings

__all__ = ["GraphCutCRF", "GraphCutCRFd", "crf_settings"]
