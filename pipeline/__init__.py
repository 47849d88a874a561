"""mmcrf: FCN-8s + graph-cut CRF segmentation trained jointly by max-margin learning."""

from __future__ import annotations

__version__ = "0.1.0"
