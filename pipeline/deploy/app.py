"""A MONAI Deploy application around the CTA bundle: DICOM study folder -> CT series
selection -> volume -> the bundle through MONAI Deploy's ``MonaiBundleInferenceOperator``
(its ``preprocessing``, ``inferer`` and ``postprocessing``: the CRF included) -> DICOM SEG
referencing the input instances.

    python -m pipeline.deploy.app --input DICOM_DIR --output OUT [--bundle BUNDLE] [--model TS]

``--model`` is the bundle's TorchScript export (``ckpt_export``, which embeds the bundle's
configs); without it the app exports ``models/model.pt`` to a temporary file first. The
bundle folder must be at hand (its ``models/`` hold the CRF weights and the training size).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["STACK_BYTES", "export_model", "run_app", "stack_shortfall"]

#: The series the app segments: the first CT series of the study.
SERIES_RULES = '{"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]}'
_DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "cta_pericardium_crf"
#: The stack size Holoscan asks for (its threads recurse deeply; below it, it may crash).
STACK_BYTES = 32 * 1024 * 1024
#: Set in the environment of the process :func:`_entry` re-executes with the larger stack.
_RAISED = "MMCRF_DEPLOY_STACK_RAISED"


def export_model(bundle: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The bundle's ``models/model.pt`` as TorchScript with its configs embedded (what
    MONAI Deploy loads), by MONAI's ``ckpt_export``."""
    from monai.bundle import ckpt_export

    root = Path(bundle).resolve()
    ckpt_export(net_id="network_def", filepath=str(path),
                ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(root / "configs" / "metadata.json"),
                config_file=str(root / "configs" / "inference.json"), bundle_root=str(root))
    return Path(path)


def stack_shortfall() -> str | None:
    """Why this process's stack size limit is below Holoscan's :data:`STACK_BYTES`, or None.

    The limit sizes the stacks of the threads Holoscan starts, and the C library reads it
    once, at process start: raising it later (``resource.setrlimit``) does not help this
    process, only the ones it starts (see :func:`_raise_stack_limit`).
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= STACK_BYTES:
        return None
    return (f"the stack size limit is {soft / 2**20:.0f} MB, below the {STACK_BYTES // 2**20} "
            f"MB Holoscan asks for; run 'ulimit -s {STACK_BYTES // 1024}' first (or start "
            f"the app with 'python -m pipeline.deploy.app', which raises it where it can)")


def _raise_stack_limit() -> bool:
    """Raises the soft stack size limit to :data:`STACK_BYTES` where it is below and the
    hard limit allows it; True when it did (the caller then re-executes itself)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= STACK_BYTES:
        return False
    if hard != resource.RLIM_INFINITY and hard < STACK_BYTES:
        return False
    resource.setrlimit(resource.RLIMIT_STACK, (STACK_BYTES, hard))
    return True


def _application():
    """The app, built on first use (the SDK is an optional dependency); it reads its input,
    output and model paths from ``sys.argv``, as MONAI Deploy applications do."""
    from holoscan.conditions import CountCondition
    from monai.deploy.core import Application, Image, IOType
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_seg_writer_operator import (
        DICOMSegmentationWriterOperator,
        SegmentDescription,
    )
    from monai.deploy.operators.dicom_series_selector_operator import (
        DICOMSeriesSelectorOperator,
    )
    from monai.deploy.operators.dicom_series_to_volume_operator import (
        DICOMSeriesToVolumeOperator,
    )
    from monai.deploy.operators.dicom_utils import ModelInfo
    from monai.deploy.operators.monai_bundle_inference_operator import (
        BundleConfigNames,
        IOMapping,
        MonaiBundleInferenceOperator,
    )
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    class CTAPericardiumApp(Application):
        """DICOM CT in, pericardium DICOM SEG out, through the bundle operator."""

        def compose(self):
            context = Application.init_app_context(self.argv)
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1),
                                             input_folder=Path(context.input_path),
                                             name="dicom_loader")
            selector = DICOMSeriesSelectorOperator(self, rules=SERIES_RULES,
                                                   name="series_selector")
            volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            bundle = MonaiBundleInferenceOperator(
                self, input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
                app_context=context, bundle_path=Path(context.model_path),
                bundle_config_names=BundleConfigNames(config_names=["inference"]),
                name="cta_bundle")
            segment = SegmentDescription(
                segment_label="pericardium",
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Pericardium,
                algorithm_name="mmcrf FCN-8s + graph-cut CRF",
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version=__version__)
            writer = DICOMSegmentationWriterOperator(
                self, segment_descriptions=[segment], output_folder=Path(context.output_path),
                # the contributing equipment (Type 1 Manufacturer) the SEG names
                model_info=ModelInfo(creator="mmcrf", name="cta_pericardium_crf",
                                     version=__version__),
                custom_tags={"Manufacturer": "mmcrf",
                             "SeriesDescription": "pericardium (mmcrf, not for clinical use)"},
                name="dicom_seg_writer")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, volume, {("study_selected_series_list",
                                              "study_selected_series_list")})
            self.add_flow(volume, bundle, {("image", "image")})
            self.add_flow(bundle, writer, {("pred", "seg_image")})
            self.add_flow(selector, writer, {("study_selected_series_list",
                                              "study_selected_series_list")})

    return CTAPericardiumApp()


def run_app(dicom_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
            bundle: str | os.PathLike = _DEFAULT_BUNDLE,
            model: str | os.PathLike | None = None) -> list[Path]:
    """Runs the application once over a DICOM folder.

    Args:
        dicom_dir: the study folder (DICOM files, any depth).
        output_dir: where the DICOM SEG goes.
        bundle: the CTA bundle folder (its configs' relative paths are resolved from it).
        model: the bundle's TorchScript export; None exports ``models/model.pt`` first.

    Returns:
        The DICOM SEG files written.
    """
    import warnings

    shortfall = stack_shortfall()
    if shortfall is not None:
        warnings.warn(f"MONAI Deploy app: {shortfall}", RuntimeWarning, stacklevel=2)
    dicom_dir, output_dir = Path(dicom_dir).resolve(), Path(output_dir).resolve()
    bundle = Path(bundle).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ts = Path(model).resolve() if model is not None else export_model(
            bundle, Path(tmp) / "model.ts")
        here, argv = Path.cwd(), sys.argv
        os.chdir(bundle)  # the embedded configs name the bundle's files relative to it
        sys.argv = [argv[0], "--input", str(dicom_dir), "--output", str(output_dir),
                    "--model", str(ts)]
        try:
            _application().run()
        finally:
            os.chdir(here)
            sys.argv = argv
    return sorted(output_dir.glob("*.dcm"))


def _entry() -> None:
    if os.environ.get(_RAISED) is None and _raise_stack_limit():
        # the new limit sizes thread stacks only in a new process: start this one again
        os.environ[_RAISED] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "pipeline.deploy.app", *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", "-i", required=True, help="DICOM study folder")
    parser.add_argument("--output", "-o", required=True, help="output folder (DICOM SEG)")
    parser.add_argument("--bundle", default=str(_DEFAULT_BUNDLE), help="the CTA bundle folder")
    parser.add_argument("--model", "-m", default=None,
                        help="the bundle's TorchScript export (default: exported now)")
    args = parser.parse_args()
    for path in run_app(args.input, args.output, bundle=args.bundle, model=args.model):
        print(path)


if __name__ == "__main__":
    _entry()
