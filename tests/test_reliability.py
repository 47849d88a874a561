"""Reliability: a battery of bad and hostile inputs against the real ``mmcrf`` commands.

Every kind of bad input must get a non-zero per-case status or exit code and a message that
names the file and the problem (never a bare traceback), the good cases of the same batch
must still be right, and no file with a final name may be half-written. ``docs/RELIABILITY.md``
tabulates the kinds and what each gets.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from pipeline.cli import main
from pipeline.data import write_cta_phantom, write_nifti
from pipeline.data.readers import read_volume
from pipeline.data.writers import write_dicom_series
from pipeline.models import load_checkpoint, save_checkpoint
from tests._tiny_models import tiny_horse_bundle
from tests.test_data_horse import _make_horse

SHAPE = (40, 36, 24)
_EXE = Path(sys.executable).parent / "mmcrf"


def _mmcrf(*args: str, timeout: int = 300, env: dict | None = None, process: bool = False
           ) -> subprocess.CompletedProcess:
    """Runs ``mmcrf``: in a real process with ``process`` (where a crash must show as a
    traceback on stderr), else through :func:`pipeline.cli.main` in this one (an exception
    escaping it fails the test just the same, and saves a process start)."""
    if process:
        return subprocess.run([str(_EXE), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def _summary(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in json.loads((out / "summary.json").read_text())}


def _scans(tmp_path: Path, good: dict[str, Path], *names: str) -> Path:
    """``<tmp_path>/in`` holding a copy of the good scan under each name."""
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        shutil.copy(good["image"], src / name)
    return src


@pytest.fixture(scope="module")
def model(cta_model_three_views) -> Path:
    return cta_model_three_views


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_horse_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    return write_cta_phantom(tmp_path_factory.mktemp("good"), "patient", rng=5, shape=SHAPE)


@pytest.fixture(scope="module")
def reference_mask(model, good, tmp_path_factory) -> np.ndarray:
    """The good case segmented alone: what it must also get inside a hostile batch."""
    src = tmp_path_factory.mktemp("alone")
    shutil.copy(good["image"], src / "good.nii.gz")
    out = src.parent / (src.name + "_out")
    proc = _mmcrf("infer", "--input", src, "--output", out, "--model", model, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    mask = np.asarray(nib.load(out / "good_mask.nii.gz").dataobj)
    assert mask.sum() > 100  # the model finds the heart
    return mask


def _huge_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI of a few bytes whose header declares ``shape`` int16 voxels (NIfTI-2 where a
    side exceeds NIfTI-1's 32767)."""
    header = nib.Nifti2Header() if max(shape) > 32767 else nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    raw = header.binaryblock + b"\0" * 4  # the header and its extension flag, no voxels
    path.write_bytes(gzip.compress(raw))
    return path


def _dicom_slices(folder: Path, good: dict[str, Path], **kwargs) -> Path:
    img = nib.load(good["image"])
    data = np.asarray(img.dataobj, dtype=np.float64)[:, :, :8]
    return write_dicom_series(data, img.affine, folder, **kwargs)


def _hostile_folder(root: Path, good: dict[str, Path]) -> dict[str, str]:
    """Writes one folder holding a good case and every kind of bad volume input; returns
    case name → a fragment its error must hold."""
    src = root / "in"
    src.mkdir()
    shutil.copy(good["image"], src / "good.nii.gz")
    expect: dict[str, str] = {}
    (src / "empty.nii.gz").write_bytes(b"")
    expect["empty"] = "empty.nii.gz: unreadable volume"
    data = good["image"].read_bytes()
    (src / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    expect["truncated"] = "truncated.nii.gz: unreadable volume"
    (src / "text.nii.gz").write_text("this is not an image\n")
    expect["text"] = "text.nii.gz: unreadable volume"
    _huge_header(src / "huge.nii.gz", (32767, 16384, 2))
    expect["huge"] = "huge.nii.gz: the header declares 32767x16384x2"
    img = nib.load(good["image"])
    nan = np.asarray(img.dataobj, dtype=np.float32).copy()
    nan[3, 4, 5] = np.nan
    write_nifti(nan, img.affine, src / "nan.nii.gz")
    expect["nan"] = "nan.nii.gz: volume contains NaN"
    write_nifti(np.zeros((30, 30), np.float32), np.eye(4), src / "flat.nii.gz")
    expect["flat"] = "flat.nii.gz: a 3-D volume is needed"
    write_nifti(np.zeros((10, 10, 10, 3), np.float32), np.eye(4), src / "fourd.nii.gz")
    expect["fourd"] = "fourd.nii.gz: a 3-D volume is needed"
    shutil.copy(good["label"], src / "heart.nii.gz")  # a label map beside the CT
    expect["heart"] = "heart.nii.gz: a label map"
    # DICOM: a slice cut off inside its pixel data
    cut = _dicom_slices(src / "dicom_truncated", good)
    victim = sorted(cut.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-500])
    expect["dicom_truncated"] = "truncated"
    # DICOM: two anonymised scans (no SeriesInstanceUID) mixed in one folder
    mixed = src / "dicom_mixed"
    for k, shift in enumerate((0.0, 0.75)):
        part = _dicom_slices(root / f"scan{k}", good)
        for f in sorted(part.iterdir()):
            ds = pydicom.dcmread(f)
            del ds.SeriesInstanceUID
            ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]),
                                       float(ds.ImagePositionPatient[1]),
                                       float(ds.ImagePositionPatient[2]) + shift]
            mixed.mkdir(exist_ok=True)
            ds.save_as(mixed / f"{k}_{f.name}")
    expect["dicom_mixed"] = "two scans"
    # DICOM: a missing slice
    gap = _dicom_slices(src / "dicom_gap", good)
    sorted(gap.iterdir())[4].unlink()
    expect["dicom_gap"] = "a missing slice"
    # DICOM: pixel data of the wrong length
    bad_pixels = _dicom_slices(src / "dicom_pixels", good)
    f = sorted(bad_pixels.iterdir())[2]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(f)
    expect["dicom_pixels"] = "pixel data"
    return expect


def test_a_hostile_batch_reports_each_bad_input_and_keeps_the_good_case_right(
        model, good, reference_mask, tmp_path):
    expect = _hostile_folder(tmp_path, good)
    out = tmp_path / "out"
    proc = _mmcrf("infer", "--input", tmp_path / "in", "--output", out, "--model", model,
                  "--no-progress", env={"MMCRF_MAX_VOXELS": str(64 ** 3 * 8)}, process=True)
    _no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _summary(out)
    assert set(rows) == {"good", *expect}, sorted(rows)
    assert rows["good"]["status"] == "ok"
    np.testing.assert_array_equal(np.asarray(nib.load(out / "good_mask.nii.gz").dataobj),
                                  reference_mask)
    for name, fragment in expect.items():
        row = rows[name]
        assert row["status"] in ("failed", "excluded"), (name, row)
        assert fragment in row["error"], (name, row["error"])
        assert Path(row["input"]).name in row["error"] or name.startswith("dicom"), row
        assert not (out / f"{name}_mask.nii.gz").exists(), name
    assert rows["heart"]["status"] == "excluded"
    assert "EXCLUDED heart" in proc.stderr and "FAILED huge" in proc.stderr
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_header_declaring_a_huge_volume_is_refused_before_any_allocation(tmp_path):
    path = _huge_header(tmp_path / "bomb.nii.gz", (100000, 100000, 1))
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"bomb\.nii\.gz: the header declares 100000x100000x1 "
                                         r"voxels .* limit"):
        read_volume(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB
    with pytest.raises(ValueError, match="limit of 1,000 voxels"):
        read_volume(_huge_header(tmp_path / "small.nii.gz", (20, 20, 20)), max_voxels=1000)


def test_outputs_never_become_inputs(model, good, tmp_path):
    src = _scans(tmp_path, good, "x.nii.gz")
    proc = _mmcrf("infer", "--input", src, "--output", src, "--model", model, "--no-progress")
    _no_traceback(proc)
    assert proc.returncode == 2 and "the output folder is the input folder" in proc.stderr
    for _ in range(2):  # an output folder inside the input tree, run twice
        proc = _mmcrf("infer", "--input", src, "--output", src / "masks", "--model", model,
                      "--no-progress")
        assert proc.returncode == 0, proc.stderr
        assert set(_summary(src / "masks")) == {"x"}
    # an older output folder elsewhere in the tree is recognised by its marker
    proc = _mmcrf("infer", "--input", src, "--output", tmp_path / "elsewhere", "--model", model,
                  "--no-progress")
    assert set(_summary(tmp_path / "elsewhere")) == {"x"}
    assert not list((src / "masks").rglob("*_mask_mask*"))


def test_output_names_are_unique_and_stable_whatever_is_added(model, good, tmp_path):
    src = _scans(tmp_path, good, "c.nii.gz")
    out = tmp_path / "out"
    assert _mmcrf("infer", "--input", src, "--output", out, "--model", model,
                  "--no-progress").returncode == 0
    first = (out / "c_mask.nii.gz").read_bytes()
    img = nib.load(good["image"])
    flipped = np.roll(np.asarray(img.dataobj), 6, axis=0)  # another image, so another mask
    nib.save(nib.Nifti1Image(flipped, img.affine), src / "c.nii")
    shutil.copy(good["image"], src / "a_1.nii.gz")
    nib.save(nib.Nifti1Image(flipped, img.affine), src / "a.nii")
    shutil.copy(good["image"], src / "a.nii.gz")
    proc = _mmcrf("infer", "--input", src, "--output", out, "--model", model, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "c": "skipped", "c.nii": "ok", "a": "ok", "a.nii": "ok", "a_1": "ok"}
    assert len({r["output"] for r in rows.values()}) == 5
    assert (out / "c_mask.nii.gz").read_bytes() == first
    assert not np.array_equal(np.asarray(nib.load(out / "c.nii_mask.nii.gz").dataobj),
                              np.asarray(nib.load(out / "c_mask.nii.gz").dataobj))
    # a DICOM folder beside a NIfTI of the same name: both reported, neither over the other
    _dicom_slices(src / "ct", good)
    shutil.copy(good["image"], src / "ct.nii.gz")
    proc = _mmcrf("infer", "--input", src, "--output", out, "--model", model, "--no-progress")
    _no_traceback(proc)
    rows = _summary(out)
    assert proc.returncode == 1
    assert [rows[n]["status"] for n in ("ct",)] == ["failed"]
    assert "output name 'ct' is shared with" in rows["ct"]["error"]


def test_symbolic_links_are_followed_once_and_loops_end(model, good, tmp_path):
    data = tmp_path / "D"
    (data / "sub").mkdir(parents=True)
    shutil.copy(good["image"], data / "top.nii.gz")
    (data / "sub" / "up").symlink_to("..")  # a loop
    cohort = tmp_path / "cohort" / "p1"
    cohort.mkdir(parents=True)
    shutil.copy(good["image"], cohort / "ct.nii.gz")
    (data / "linked").symlink_to("../cohort")
    (data / "alias.nii.gz").symlink_to("top.nii.gz")  # the same real file twice
    proc = _mmcrf("infer", "--input", data, "--output", tmp_path / "out", "--model", model,
                  "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert set(_summary(tmp_path / "out")) == {"top", "linked/p1/ct"}


def _malicious(path: Path, protocol: int) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(path.parent / "pwned"),))

    with path.open("wb") as f:
        pickle.dump({"format": "mmcrf-checkpoint-1", "x": Evil()}, f, protocol=protocol)
    return path


def test_malformed_and_hostile_checkpoints_get_a_clear_message(model, good, tmp_path):
    src = _scans(tmp_path, good, "x.nii.gz")
    bare = tmp_path / "bare.pt"
    torch.save({"format": "mmcrf-checkpoint-1"}, bare)
    payload = load_checkpoint(model)
    edited = save_checkpoint({**{k: v for k, v in payload.items() if k != "format"},
                              "network": {**payload["network"], "in_channels": 2}},
                             tmp_path / "edited.pt")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    text = tmp_path / "text.pt"  # a real checkpoint cut off
    text.write_bytes(model.read_bytes()[:5000])
    cases = {bare: "bare.pt: not a complete mmcrf checkpoint (no 'network')",
             edited: "edited.pt: its network spec does not fit its weights",
             noise: "noise.pt: not a trusted mmcrf checkpoint",
             text: "text.pt: cannot load checkpoint",
             _malicious(tmp_path / "evil.pt", 2): "evil.pt: not a trusted mmcrf checkpoint",
             _malicious(tmp_path / "evil4.pt", 4): "evil4.pt: not a trusted mmcrf checkpoint"}
    for k, (path, message) in enumerate(cases.items()):
        for args in (["infer", "--input", src, "--output", tmp_path / "o", "--model", path,
                      "--no-progress"], ["export-model", path, tmp_path / "exported.pt"]):
            proc = _mmcrf(*args, process=k == len(cases) - 1)  # the last in a real process
            _no_traceback(proc)
            assert proc.returncode == 2, proc.stderr
            assert message in proc.stderr, proc.stderr
            assert "weights_only=False" not in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_manifest_with_a_non_string_path_is_refused_with_its_entry(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"training": [{"image": 5}]}))
    for args in (["manifest", "check", manifest, "--root", tmp_path],
                 ["train", "--data", "cta", "--manifest", manifest, "--root", tmp_path,
                  "--out", tmp_path / "run"]):
        proc = _mmcrf(*args, process=args[0] == "train")
        _no_traceback(proc)
        assert proc.returncode == 2, proc.stderr
        assert "m.json: training[0] 'image' must be a path (a string), got 5" in proc.stderr
    manifest.write_text("{not json")
    proc = _mmcrf("manifest", "check", manifest, "--root", tmp_path)
    assert proc.returncode == 2 and "m.json: not valid JSON" in proc.stderr


def test_unwritable_output_is_refused_before_any_work(model, good, tmp_path):
    src = _scans(tmp_path, good, "x.nii.gz")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    proc = _mmcrf("infer", "--input", src, "--output", tmp_path / "blocker" / "out",
                  "--model", model, "--no-progress")
    _no_traceback(proc)
    assert proc.returncode == 2 and "blocker/out: output folder is not writable" in proc.stderr


def test_a_killed_batch_resumes_to_the_same_outputs(model, good, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = nib.load(good["image"])
    base = np.asarray(img.dataobj)
    for k in range(6):
        nib.save(nib.Nifti1Image(np.roll(base, 2 * k, axis=0), img.affine),
                 src / f"case{k}.nii.gz")
    full = tmp_path / "full"
    assert _mmcrf("infer", "--input", src, "--output", full, "--model", model,
                  "--no-progress").returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(_EXE), "infer", "--input", str(src), "--output", str(out),
                             "--model", str(model), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_mask.nii.gz"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("*_mask.nii.gz"))
    assert 2 <= len(done) < 6, done
    for mask in done:  # every final name complete
        assert mask.read_bytes() == (full / mask.name).read_bytes()
    (out / ".case5_mask.nii.gz.4194999.tmp.nii.gz").write_bytes(b"half")  # an old leftover
    rerun = _mmcrf("infer", "--input", src, "--output", out, "--model", model, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} skipped" in rerun.stdout
    for k in range(6):
        name = f"case{k}_mask.nii.gz"
        assert (out / name).read_bytes() == (full / name).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_masks_of_another_model_are_never_kept_as_done(model, good, tmp_path):
    src = _scans(tmp_path, good, "x.nii.gz")
    out = tmp_path / "out"
    assert _mmcrf("infer", "--input", src, "--output", out, "--model", model,
                  "--no-progress").returncode == 0
    sidecar = json.loads((out / "x_mask.json").read_text())
    assert sidecar["models"]["axial"]["sha256"] == _summary(out)["x"]["model_sha256"][6:]
    assert sidecar["input"] == str((src / "x.nii.gz").resolve())
    payload = load_checkpoint(model)
    other = save_checkpoint({**{k: v for k, v in payload.items() if k != "format"},
                             "crf": [2 * float(v) for v in payload["crf"]]}, tmp_path / "other.pt")
    proc = _mmcrf("infer", "--input", src, "--output", out, "--model", other, "--no-progress")
    assert proc.returncode == 1
    row = _summary(out)["x"]
    assert row["status"] == "failed" and "made by another model" in row["error"]
    assert "--overwrite" in row["error"]
    proc = _mmcrf("infer", "--input", src, "--output", out, "--model", other, "--overwrite",
                  "--no-progress")
    assert proc.returncode == 0
    assert json.loads((out / "x_mask.json").read_text())["models"]["axial"]["checkpoint"] \
        == str(other)


def test_evaluate_gives_an_image_without_mask_a_row_and_takes_gray_images(bundle, tmp_path):
    images = tmp_path / "unseen"
    for seed, name in enumerate(["a1", "b2"], start=40):
        _make_horse(images, name, seed)
    (images / "figure_ground" / "b2.jpg").unlink()  # an image without its mask
    for colour in ("rgb", "gray"):
        out = tmp_path / colour
        proc = _mmcrf("evaluate", "--model", bundle, "--images", images, "--out", out,
                      "--colour", colour)
        _no_traceback(proc)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = {(r["image"], r["method"]): r
                for r in csv.DictReader((out / "per_image.csv").open())}
        assert set(rows) == {(n, m) for n in ("a1", "b2") for m in ("cnn", "joint")}
        assert {rows["a1", m]["status"] for m in ("cnn", "joint")} == {"ok"}
        for m in ("cnn", "joint"):
            assert rows["b2", m]["status"] == "unscored"
            assert "no mask figure_ground/b2.jpg" in rows["b2", m]["error"]
            assert (out / m / "b2.png").is_file()


def test_an_unexpected_error_in_one_case_fails_only_that_case(model, good, tmp_path, monkeypatch):
    """Whatever a strange input makes the code raise, the batch reports that case and goes on
    (here a TypeError forced from the reader for one file)."""
    import pipeline.inference.batch as batch

    src = _scans(tmp_path, good, "good.nii.gz", "odd.nii.gz")
    real = batch.read_volume

    def reader(path, **kwargs):
        if Path(path).name == "odd.nii.gz":
            raise TypeError("an input nobody foresaw")
        return real(path, **kwargs)

    monkeypatch.setattr(batch, "read_volume", reader)
    proc = _mmcrf("infer", "--input", src, "--output", tmp_path / "out", "--model", model,
                  "--no-progress")
    assert proc.returncode == 1
    rows = _summary(tmp_path / "out")
    assert rows["good"]["status"] == "ok"
    assert rows["odd"]["status"] == "failed"
    assert "odd.nii.gz: unexpected TypeError (an input nobody foresaw)" in rows["odd"]["error"]


def test_random_bytes_are_never_taken_for_a_checkpoint(tmp_path):
    """Whatever torch's unpickler trips over in random bytes (UnpicklingError, IndexError,
    EOFError, ...), the message is the same: not a trusted mmcrf checkpoint."""
    rng = np.random.default_rng(0)
    for k in range(40):
        path = tmp_path / f"noise{k}.pt"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(ValueError, match=f"noise{k}.pt: not a trusted mmcrf checkpoint"):
            load_checkpoint(path)
