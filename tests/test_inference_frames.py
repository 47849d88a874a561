"""Batch inference on ultrasound frames and cine loops: alignment, robustness, re-runs, CLI."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.bundle import infer_frames
from pipeline.cli import main
from pipeline.data.phantoms import write_echo_cine
from pipeline.data.samples import to_samples
from pipeline.data.ultrasound import load_ultrasound, normalise_frames
from pipeline.engines import TrainConfig, train
from pipeline.inference import (
    FRAME_SUMMARY_COLUMNS,
    FramePredictor,
    find_frame_cases,
    is_frame_model,
    run_frames,
)
from pipeline.models import export_model
from tests._tiny_models import colour_checkpoint, with_config
from tests.test_engines_training import TINY_NET

T, H, W = 4, 40, 56  # non-square: a transposed frame cannot pass for the right one
SPACING = (0.3, 0.5)


def _bright_blocks(n: int, seed: int, size: int = 32) -> list[dict]:
    """Dark noisy frames in [0, 1] with bright blocks as the foreground."""
    gen = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image = 0.1 + 0.08 * gen.random((size, size))
        label = np.zeros((size, size), dtype=np.uint8)
        for _ in range(2):
            h, w = gen.integers(6, 14, size=2)
            r, c = gen.integers(0, size - h), gen.integers(0, size - w)
            label[r:r + h, c:c + w] = 1
        image = np.where(label, 0.85 + 0.1 * gen.random((size, size)), image)
        items.append({"image": image[None].astype(np.float32), "label": label[None],
                      "id": f"b{seed}_{i}"})
    return to_samples(items)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny CNN + piecewise CRF trained on 32×32 frames (bright block = foreground), with
    the data kind of an ultrasound run."""
    runs = tmp_path_factory.mktemp("runs")
    samples = _bright_blocks(48, 0)
    data = {"kind": "echo", "size": 32}
    cnn = train(TrainConfig(mode="cnn", epochs=10, batch_size=4, lr=1e-2, network=TINY_NET,
                            data=data), samples, [], runs / "cnn")
    crf = train(TrainConfig(mode="piecewise", C=10.0, network=TINY_NET, data=data),
                samples[:6], [], runs / "piecewise", init=cnn.last_checkpoint)
    return export_model(crf.last_checkpoint, runs / "echo.pt")


@pytest.fixture(scope="module")
def cine():
    """T×H×W uint8 frames with a bright block in the upper left part, moving right frame by
    frame (so flips, transposes and frame-order errors all show), and the blocks."""
    gen = np.random.default_rng(5)
    frames = (30 + 20 * gen.random((T, H, W))).astype(np.uint8)
    truth = np.zeros((T, H, W), dtype=bool)
    for t in range(T):
        truth[t, 6:20, 2 + 5 * t:14 + 5 * t] = True
    frames[truth] = 220
    return frames, truth


@pytest.fixture
def folder(tmp_path, cine):
    """A folder of ultrasound files: DICOM cine (+ a MetaImage of the same name), a NIfTI
    cine in a sub-folder, PNG frames, a DICOM frame without suffix, masks and clutter."""
    frames, truth = cine
    src = tmp_path / "src"
    write_echo_cine(frames, src / "cine.dcm", spacing=SPACING, frame_time_ms=40.0)
    write_echo_cine(frames, src / "cine.mhd", spacing=SPACING)
    write_echo_cine(frames, src / "sub" / "cine.nii.gz", spacing=SPACING, frame_time_ms=40.0)
    write_echo_cine(truth.astype(np.uint8), src / "sub" / "cine_mask.nii.gz", spacing=SPACING)
    for t in range(T):
        write_echo_cine(frames[t], src / "pngs" / f"frame_{t:03d}.png")
        write_echo_cine(truth[t].astype(np.uint8), src / "pngs" / f"frame_mask_{t:03d}.png")
    write_echo_cine(frames[2], src / "frame.dcm", spacing=SPACING)
    (src / "frame.dcm").rename(src / "IM0001")
    (src / "notes.txt").write_text("not an image")
    return src


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_find_frame_cases_names_excludes_and_skips(folder, tmp_path):
    cases = find_frame_cases(folder)
    names = {c.name: c.kind for c in cases}
    assert names == {"cine_dcm": "dicom", "cine_mhd": "metaimage", "sub/cine": "nifti",
                     "IM0001": "dicom", **{f"pngs/frame_{t:03d}": "png" for t in range(T)}}
    with_masks = {c.name for c in find_frame_cases(folder, exclude=[])}
    assert {"sub/cine_mask", "pngs/frame_mask_000"} <= with_masks
    assert {c.name for c in find_frame_cases(folder, exclude=["PNGS/*", "*_MASK*"])} == {
        "cine_dcm", "cine_mhd", "sub/cine", "IM0001"}
    assert "sub/cine" not in {c.name for c in find_frame_cases(folder, skip=[folder / "sub"])}
    assert [c.name for c in find_frame_cases(folder / "sub" / "cine_mask.nii.gz")] == [
        "cine_mask"]  # a file given by name is always a case
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported input"):
        find_frame_cases(folder / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no ultrasound files"):
        find_frame_cases(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        find_frame_cases(tmp_path / "missing")


def test_normalise_frames_by_stored_type(tmp_path, cine):
    frames, _ = cine
    for name in ("a.dcm", "a.nii.gz", "a.mhd"):
        path = write_echo_cine(frames, tmp_path / name)
        loaded = [f.image for f in load_ultrasound(path)]
        np.testing.assert_allclose(normalise_frames(path, loaded), frames / 255.0, atol=1e-6)
    png = write_echo_cine(frames[0], tmp_path / "a.png")
    np.testing.assert_allclose(normalise_frames(png, [load_ultrasound(png)[0].image]),
                               frames[:1] / 255.0, atol=1e-6)
    wide = write_echo_cine(frames.astype(np.uint16) * 100, tmp_path / "b.nii.gz")
    np.testing.assert_allclose(normalise_frames(wide, np.stack([f.image for f in
                                                                load_ultrasound(wide)])),
                               frames * 100.0 / 65535.0, atol=1e-6)
    floats = tmp_path / "c.nii"
    nib.save(nib.Nifti1Image((frames.transpose(2, 1, 0) * 0.5 + 3.0).astype(np.float32),
                             np.eye(4)), floats)
    scaled = normalise_frames(floats, [f.image for f in load_ultrasound(floats)])
    assert scaled.min() == 0.0 and scaled.max() == 1.0  # min-max over the whole file
    expected = (frames - frames.min()) / float(frames.max() - frames.min())
    np.testing.assert_allclose(scaled, expected, atol=1e-6)


def test_every_format_gives_aligned_masks_with_the_input_frames(model, folder, cine, tmp_path):
    frames, truth = cine
    predictor = FramePredictor(model, batch_size=3)  # batches that split the cine
    cases = find_frame_cases(folder)
    out = tmp_path / "out"
    rows = run_frames(cases, out, predictor, write_probability=True, write_cnn=True,
                      progress=False)
    assert {r["case"]: r["status"] for r in rows} == {c.name: "ok" for c in cases}
    # model-independent: what the predictor gives on the known arrays, read in no file
    whole = predictor.predict(frames / 255.0)
    single = [predictor.predict(frames[t:t + 1] / 255.0) for t in range(T)]
    assert np.abs(whole.probability - whole.probability[:, ::-1]).max() > 0.2
    assert np.abs(whole.probability - whole.probability[:, :, ::-1]).max() > 0.2
    expected = {"cine_dcm": (whole, range(T)), "cine_mhd": (whole, range(T)),
                "sub/cine": (whole, range(T)), "IM0001": (single[2], [2]),
                **{f"pngs/frame_{t:03d}": (single[t], [t]) for t in range(T)}}
    for row in rows:
        prediction, index = expected[row["case"]]
        mask_file = out / f"{row['case']}_mask.nii.gz"
        assert row["output"] == str(mask_file) and int(row["frames"]) == len(index)
        assert row["shape"] == f"{H}x{W}" and row["foreground_ml"] == ""
        back = load_ultrasound(mask_file)
        assert len(back) == len(index) and all(f.image.shape == (H, W) for f in back)
        mask = np.stack([f.image for f in back])
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask, prediction.mask)
        prob = np.stack([f.image for f in load_ultrasound(out / f"{row['case']}_prob.nii.gz")])
        np.testing.assert_allclose(prob, prediction.probability, atol=1e-6)
        cnn = np.stack([f.image for f in load_ultrasound(out / f"{row['case']}_cnn_mask.nii.gz")])
        np.testing.assert_array_equal(cnn, prediction.cnn)
        # the model found the blocks, where they are and in the frames' order
        for m, t in zip(mask.astype(bool), index, strict=True):
            assert _dice(m, truth[t]) > 0.6, (row["case"], t)
            assert _dice(m[::-1], truth[t]) < 0.3 and _dice(m[:, ::-1], truth[t]) < 0.3
        pixels = mask.reshape(len(index), -1).sum(axis=1).mean()
        assert float(row["foreground_px"]) == pytest.approx(pixels, abs=0.05)
        if row["case"].startswith("pngs/"):  # PNG carries no spacing
            assert row["foreground_mm2"] == "" and back[0].spacing == (1.0, 1.0)
        else:
            assert back[0].spacing == pytest.approx(SPACING)
            assert float(row["foreground_mm2"]) == pytest.approx(pixels * 0.15, abs=1e-3)
    nifti_in, nifti_out = nib.load(folder / "sub" / "cine.nii.gz"), nib.load(
        out / "sub" / "cine_mask.nii.gz")
    np.testing.assert_allclose(nifti_out.affine, nifti_in.affine)  # overlays in viewers
    assert nifti_out.shape == nifti_in.shape == (W, H, 1, T)
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert tuple(table[0]) == FRAME_SUMMARY_COLUMNS
    assert json.loads((out / "summary.json").read_text())[0]["case"] == table[0]["case"]
    assert not list(out.rglob("*.tmp"))


def test_cli_reports_bad_files_skips_done_cases_and_overwrites(model, folder, tmp_path,
                                                                capsys):
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICMgarbage")
    out = tmp_path / "out"
    argv = ["infer", "--input", str(folder), "--output", str(out), "--model", str(model),
            "--no-progress"]
    assert is_frame_model(model)
    assert main(argv) == 1  # the checkpoint's data kind (echo) picks the frame path
    captured = capsys.readouterr()
    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["broken"]["status"] == "failed"
    assert "broken.dcm" in rows["broken"]["error"] and "FAILED broken" in captured.err
    assert {r["status"] for n, r in rows.items() if n != "broken"} == {"ok"}
    assert len(rows) == 9 and "1 failed" in captured.out
    done = out / "sub" / "cine_mask.nii.gz"
    stamp = done.stat().st_mtime_ns
    # re-run: done cases are skipped, the broken one fails again
    assert main(argv) == 1
    rows = {r["case"]: r["status"] for r in csv.DictReader((out / "summary.csv").open())}
    assert rows.pop("broken") == "failed" and set(rows.values()) == {"skipped"}
    assert done.stat().st_mtime_ns == stamp
    # an interrupted case (mask missing) is redone; the rest stays skipped
    (out / "cine_dcm_mask.nii.gz").unlink()
    (folder / "broken.dcm").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    rows = {r["case"]: r["status"] for r in csv.DictReader((out / "summary.csv").open())}
    assert rows.pop("cine_dcm") == "ok" and set(rows.values()) == {"skipped"}
    assert "1 done, 7 skipped (already done), 0 failed" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0
    rows = {r["case"]: r["status"] for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows.values()) == {"ok"} and done.stat().st_mtime_ns != stamp
    # --exclude alone: masks are cases too
    assert main([*argv, "--exclude"]) == 0
    assert (out / "sub" / "cine_mask_mask.nii.gz").is_file()


def test_frame_graph_cuts_in_workers_equal_in_process(model, cine):
    frames = cine[0].astype(np.float32) / 255.0  # normalised, as the batch path does
    serial = FramePredictor(model).predict(frames)
    with FramePredictor(model, workers=2) as pooled:
        again = pooled.predict(frames)
    assert serial.crf is not None and serial.crf.any()
    np.testing.assert_array_equal(again.crf, serial.crf)


def test_frames_flag_forces_the_frame_path(model, folder, tmp_path, capsys):
    cta = with_config(model, tmp_path / "cta.pt", data={"kind": "cta"})
    assert not is_frame_model(cta)
    single = ["--input", str(folder / "cine.dcm"), "--output", str(tmp_path / "out"),
              "--model", str(cta), "--no-progress"]
    assert main(["infer", *single]) == 2  # a CTA model reads volumes: a .dcm file is none
    assert "expected a .nii/.nii.gz file" in capsys.readouterr().err
    assert main(["infer", *single, "--frames"]) == 0
    back = load_ultrasound(tmp_path / "out" / "cine_mask.nii.gz")
    assert len(back) == T and back[0].image.shape == (H, W)
    with pytest.raises(ValueError, match="3 input channels; ultrasound frames"):
        FramePredictor(colour_checkpoint(model, tmp_path / "rgb.pt"))


def test_bundle_infer_frames_names_failed_cases(model, folder, tmp_path):
    shutil.rmtree(folder / "pngs")
    rows = infer_frames(input_dir=str(folder), output_dir=str(tmp_path / "out"),
                        model_file=str(model))
    assert sorted(r["case"] for r in rows) == ["IM0001", "cine_dcm", "cine_mhd", "sub/cine"]
    (folder / "late.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(RuntimeError, match=r"1 of 5 case\(s\) failed.*late\.nii\.gz"):
        infer_frames(input_dir=str(folder), output_dir=str(tmp_path / "out"),
                     model_file=str(model))
