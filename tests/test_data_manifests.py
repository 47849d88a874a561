"""Manifests: build by patient from folder conventions, check reports every problem, CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import write_cta_phantom, write_nifti
from pipeline.data.manifests import (
    SPLITS,
    build_manifest,
    check_manifest,
    load_manifest,
    manifest_entries,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    for patient in range(4):
        for visit in range(2):  # two scans per patient: they must stay in one split
            write_cta_phantom(root, f"p{patient}_v{visit}", rng=10 * patient + visit,
                              dicom=False, shape=(24, 20, 16))
    return root


def _mmcrf(*args):
    exe = Path(sys.executable).parent / "mmcrf"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_split_by_patient_keeps_all_scans_of_a_patient_together(data_root):
    for seed in range(5):
        manifest = build_manifest(data_root, fractions=(0.5, 0.25, 0.25), seed=seed,
                                  group_pattern=r"^(p\d+)_")
        where = {}
        for split in SPLITS:
            for entry in manifest[split]:
                assert where.setdefault(entry["group"], split) == split
        assert sorted(where) == ["p0", "p1", "p2", "p3"]
        assert sum(len(manifest[s]) for s in SPLITS) == 8
    assert build_manifest(data_root, seed=3) == build_manifest(data_root, seed=3)


def test_manifest_paths_are_relative_and_resolve(data_root):
    manifest = build_manifest(data_root, fractions=(1, 0, 0))
    entry = manifest["training"][0]
    assert entry["image"] == f"{entry['id']}/image.nii.gz"
    resolved = manifest_entries(manifest, data_root, ["training"])
    assert Path(resolved[0]["image"]).is_file() and Path(resolved[0]["label"]).is_file()
    assert check_manifest(manifest, data_root) == []


def test_decathlon_layout_is_recognised(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ("a", "b", "c"):
        write_nifti(np.zeros((8, 8, 8), np.int16), np.eye(4), tmp_path / "imagesTr" /
                    f"{name}.nii.gz")
        write_nifti(np.zeros((8, 8, 8), np.uint8), np.eye(4), tmp_path / "labelsTr" /
                    f"{name}.nii.gz")
    manifest = build_manifest(tmp_path, fractions=(1, 1, 1))
    assert sorted(e["id"] for s in SPLITS for e in manifest[s]) == ["a", "b", "c"]
    assert all(len(manifest[s]) == 1 for s in SPLITS)


def test_check_reports_every_problem_in_one_run(data_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(data_root, root)
    manifest = build_manifest(root, fractions=(1, 0, 0))
    entries = manifest["training"]
    (root / entries[0]["label"]).unlink()  # missing file
    (root / entries[1]["image"]).write_bytes(b"garbage")  # corrupt
    write_nifti(np.full((24, 20, 16), 2, np.uint8), np.eye(4) * [1, 1, 1, 1],
                root / entries[2]["label"])  # not binary
    write_nifti(np.zeros((24, 20), np.int16), np.eye(4), root / entries[3]["image"])  # 2-D
    manifest["test"] = [dict(entries[4])]  # the same scan in two splits
    problems = check_manifest(manifest, root)
    text = "\n".join(str(p) for p in problems)
    assert "training[0] label" in text and "no such file" in text
    assert "training[1] image" in text and "unreadable volume" in text
    assert "training[2] label" in text and "not binary" in text
    assert "training[3] image" in text and "3-D volume is needed" in text
    assert "data leak between splits" in text
    assert len({(p.split, p.index) for p in problems}) >= 5


@pytest.mark.slow
def test_manifest_cli_build_and_check(data_root, tmp_path):
    out = tmp_path / "m.json"
    proc = _mmcrf("manifest", "build", str(data_root), "--out", str(out), "--group-pattern",
                  r"^(p\d+)_")
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(out)["split_by"] == "group"
    proc = _mmcrf("manifest", "check", str(out), "--root", str(data_root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 of 8 entries ok, 0 problem(s)" in proc.stdout
    bad = json.loads(out.read_text())
    bad["training"][0]["label"] = "nowhere/label.nii.gz"
    out.write_text(json.dumps(bad))
    proc = _mmcrf("manifest", "check", str(out), "--root", str(data_root))
    assert proc.returncode == 1
    assert "PROBLEM" in proc.stdout and "nowhere/label.nii.gz: no such file" in proc.stdout


def test_load_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_manifest(bad)
    bad.write_text(json.dumps({"training": [{"label": "x"}]}))
    with pytest.raises(ValueError, match=r"training\[0\] needs an 'image' path"):
        load_manifest(bad)


def test_slices_cli_exports_each_view_with_an_index(tmp_path):
    paths = write_cta_phantom(tmp_path / "data", rng=2, shape=(30, 26, 18))
    out = tmp_path / "slices"
    proc = _mmcrf("slices", str(paths["dicom"]), "--label", str(paths["label"]), "--out",
                  str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "index.csv").open()))
    counts = {v: sum(r["view"] == v for r in rows) for v in ("axial", "coronal", "sagittal")}
    assert counts == {"axial": 18, "coronal": 26, "sagittal": 30}
    assert {"source", "view", "slice", "empty"} <= set(rows[0])
    for view, n in counts.items():
        assert len(list((out / view).glob("*_label.png"))) == n
    first = rows[0]
    image = np.asarray(Image.open(out / first["image_file"]))
    assert image.dtype == np.uint8 and image.shape == (26, 30)  # axial: rows = y, cols = x
    empty = [r for r in rows if r["empty"] == "1"]
    full = [r for r in rows if r["empty"] == "0"]
    assert empty and full
    assert not np.asarray(Image.open(out / empty[0]["label_file"])).any()
    assert np.asarray(Image.open(out / full[0]["label_file"])).max() == 255
    proc = _mmcrf("slices", str(paths["image"]), "--out", str(tmp_path / "nii"), "--format",
                  "nii", "--views", "axial")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "nii" / "axial").glob("*.nii.gz"))) == 18


def test_slices_cli_reports_bad_input(tmp_path):
    proc = _mmcrf("slices", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "missing.nii.gz: no such file" in proc.stderr


def test_committed_phantom_manifest_matches_the_generated_cohort(tmp_path):
    proc = _mmcrf("phantoms", "--out", str(tmp_path / "cohort"))
    assert proc.returncode == 0, proc.stderr
    committed = load_manifest(Path(__file__).resolve().parents[1] / "data_manifests" /
                              "cta_phantom.json")
    rebuilt = build_manifest(tmp_path / "cohort", fractions=(4, 1, 1), seed=0)
    for split in SPLITS:
        assert committed[split] == rebuilt[split]
    assert check_manifest(committed, tmp_path / "cohort") == []
