"""Writes a bundle's ``models/model.pt``: the default model's network weights as a plain state
dict, which MONAI's ``ckpt_export`` and the model zoo's checks load into ``network_def``; the
default mmcrf model file is rewritten to share those weights (``model_from``), so they are
stored once and its CRF weights and settings stay beside them.

    .venv/bin/python docs/results/write_model_pt.py bundles/echo_lv_crf joint.pt

Half-precision weights stay half precision. Running it again on a model that already shares
model.pt rewrites nothing but the same bytes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.models import export_model, export_state_dict, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("default", help="the default model's file name in models/")
    args = parser.parse_args()
    models = Path(args.bundle) / "models"
    default = models / args.default
    payload = load_checkpoint(default)
    half = next(iter(payload["model"].values())).dtype == torch.float16
    with tempfile.TemporaryDirectory(dir=models) as tmp:
        kept = Path(tmp) / default.name  # the full model, before it is rewritten to share
        export_model(default, kept, half=half)
        export_state_dict(kept, models / "model.pt", half=half)
        export_model(kept, default, half=half, share_network_with=models / "model.pt")
    print(f"{models / 'model.pt'}: {len(payload['model'])} tensors; {default.name} shares them")


if __name__ == "__main__":
    main()
