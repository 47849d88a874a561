"""MONAI Deploy application: DICOM CT series in, the CTA bundle (CRF included), DICOM SEG out.

Needs the optional ``deploy`` extra (``pip install -e ".[deploy]"``: MONAI Deploy App SDK 4,
which brings Holoscan); nothing here is imported by the rest of the package.
"""

from __future__ import annotations

__all__: list[str] = []
