"""Evaluation of trained runs over several views of CTA phantoms, example images for the
report's qualitative figures, and scoring of saved predictions (no model)."""

from __future__ import annotations

import io
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pipeline.crf.graphcut import map_labelling
from pipeline.data.manifests import build_manifest, manifest_entries
from pipeline.data.phantoms import write_cta_cohort
from pipeline.data.samples import cta_samples, to_samples
from pipeline.data.views import VIEWS, restack_slices
from pipeline.data.writers import write_nifti
from pipeline.engines import TrainConfig, train
from pipeline.evaluation.examples import QualitativeCases
from pipeline.evaluation.predictions import evaluate_predictions
from pipeline.evaluation.runs import (
    collect_examples,
    evaluate_runs,
    evaluate_runs_with_examples,
    load_run,
    predict_samples,
)
from pipeline.evaluation.samples import evaluation_entries, evaluation_samples, multiview_samples
from pipeline.evaluation.tables import EvalTable, select_cases, write_eval_table
from pipeline.models import predict_probabilities
from pipeline.reports import build_report, qualitative_figures, write_report
from tests.test_engines_training import TINY_NET

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (40, 36, 32)  # x, y, z: every view's images are at least 32×32 (FCN-8s' minimum)
METHODS = ("cnn", "piecewise", "joint")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """|A∩B| / |A∪B|, NaN for an empty ground truth (the paper's protocol)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not truth.any():
        return math.nan
    return float((pred & truth).sum() / (pred | truth).sum())


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Row lists equal, NaN equal to NaN."""
    def norm(row):
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return [norm(r) for r in a] == [norm(r) for r in b]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cta")
    write_cta_cohort(root, shape=SHAPE)
    spec = build_manifest(root, fractions=(4, 1, 1), seed=0)
    return (root, manifest_entries(spec, root, ["training"]),
            manifest_entries(spec, root, ["validation"]))


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory):
    """Tiny CNN-only, piecewise and joint runs trained on axial slices (32×32)."""
    _, training, validation = cohort
    train_set = cta_samples(training[:2], "axial", size=32)[4:-4:2]
    val_set = cta_samples(validation, "axial", size=32)[8:-8:4]
    out = tmp_path_factory.mktemp("runs")
    cnn = train(TrainConfig(mode="cnn", epochs=8, lr=1e-2, batch_size=2, network=TINY_NET),
                train_set, val_set, out / "cnn")
    piecewise = train(TrainConfig(mode="piecewise", epochs=1, batch_size=4, network=TINY_NET),
                      train_set, val_set, out / "piecewise", init=cnn.last_checkpoint)
    joint = train(TrainConfig(mode="joint", epochs=1, lr=1e-3, batch_size=4, network=TINY_NET),
                  train_set, val_set, out / "joint", init=piecewise.last_checkpoint)
    return {"cnn": str(cnn.best_checkpoint), "piecewise": str(piecewise.best_checkpoint),
            "joint": str(joint.best_checkpoint)}


@pytest.fixture(scope="module")
def multiview(cohort, runs):
    """The validation volume in three views at the training size, evaluated with examples."""
    samples = multiview_samples(cohort[2], VIEWS, size=32)
    return samples, evaluate_runs_with_examples(runs, samples)


def test_multiview_samples_are_the_training_slices(cohort):
    _, _, validation = cohort
    samples = multiview_samples(validation, ("axial", "coronal", "sagittal"), size=32)
    expected = [s for view in VIEWS for s in cta_samples(validation, view, size=32)]
    assert [s["id"] for s in samples] == [s["id"] for s in expected]
    for a, b in zip(samples, expected, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    counts = {view: sum(s["view"] == view for s in samples) for view in VIEWS}
    assert counts == {"axial": SHAPE[2], "coronal": SHAPE[1], "sagittal": SHAPE[0]}
    with pytest.raises(ValueError, match="view must be one of"):
        multiview_samples(validation, ("axial", "oblique"))
    with pytest.raises(ValueError, match="'test' split is empty"):
        evaluation_entries("cta", root=cohort[0], manifest=_manifest(cohort, "m.json"),
                           split="test")


def test_demo_evaluation_samples_are_the_training_validation_set(tmp_path):
    from pipeline.data.samples import training_sets

    _, validation = training_sets("demo", root=tmp_path, size=32)
    samples = evaluation_samples("demo", root=tmp_path, views=["axial"], size=32)
    assert [s["id"] for s in samples] == [s["id"] for s in validation]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, validation,
                                                                     strict=True))
    views = {s["view"] for s in evaluation_samples("demo", root=tmp_path, split="test",
                                                   views=VIEWS, size=32)}
    assert views == set(VIEWS)
    with pytest.raises(ValueError, match="volume data kind must be"):
        evaluation_entries("horse", root=tmp_path)


def _manifest(cohort, name):
    from pipeline.data.manifests import write_manifest

    root = cohort[0]
    return write_manifest(build_manifest(root, fractions=(4, 1, 0), seed=0), root / name)


def test_report_lists_three_views_and_three_methods(multiview, runs, tmp_path):
    samples, evaluation = multiview
    rows = evaluation.rows
    assert len(rows) == 3 * len(samples)
    assert [r["method"] for r in rows[:: len(samples)]] == list(METHODS)
    # the rows of evaluate_runs are the same rows
    plain = evaluate_runs({"cnn": runs["cnn"]}, samples)
    assert _same_rows(plain, rows[: len(samples)])
    # Jaccard recomputed independently: CNN masks from the network, CRF masks by graph cut
    model, _, _ = load_run(runs["cnn"])
    probs = predict_probabilities(model, torch.stack([s["image"] for s in samples])).numpy()
    for sample, prob, row in zip(samples, probs, rows[: len(samples)], strict=True):
        expected = _jaccard(prob > 0.5, sample["label"][0].numpy() > 0)
        assert row["jaccard"] == pytest.approx(expected, abs=1e-12, nan_ok=True)
        assert (row["case"], row["view"], row["slice"]) == (sample["source"], sample["view"],
                                                            sample["slice"])
    jmodel, jweights, _ = load_run(runs["joint"])
    jprobs = predict_probabilities(jmodel, torch.stack([s["image"] for s in samples])).numpy()
    joint_rows = rows[2 * len(samples):]
    for i in range(0, len(samples), 11):
        mask = map_labelling(jprobs[i], samples[i]["image"].numpy(), jweights)
        expected = _jaccard(mask, samples[i]["label"][0].numpy() > 0)
        assert joint_rows[i]["jaccard"] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert any(r["jaccard"] > 0 for r in rows if not math.isnan(r["jaccard"]))

    figures = qualitative_figures(evaluation.examples)
    report = build_report([write_eval_table(rows, tmp_path / "eval.csv")], figures=figures,
                          n_boot=200)
    assert report.views == ["axial", "coronal", "sagittal"]
    assert report.methods == list(METHODS)
    for view in VIEWS:
        for method in METHODS:
            summary = report.summary(view, method)
            assert summary.n_images == sum(s["view"] == view for s in samples)
    assert {c.view for c in report.comparisons} == {*VIEWS, "all"}
    paths = write_report(report, tmp_path / "report")
    html = paths["html"].read_text()
    markdown = paths["md"].read_text()
    for view in VIEWS:
        assert f"Qualitative results, {view} view" in html
        assert f"figures/qualitative_{view}.png" in markdown
        assert paths[f"figure:qualitative_{view}"].read_bytes().startswith(PNG_MAGIC)
    assert html.count("data:image/png;base64,") == 3


def test_examples_are_the_best_median_worst_of_each_view(multiview, tmp_path):
    samples, evaluation = multiview
    examples = evaluation.examples
    table = EvalTable.from_rows(evaluation.rows)
    assert examples.method == "joint" and examples.views == list(VIEWS)
    assert examples.methods == list(METHODS) and len(examples) == 9
    picks = select_cases(table, "joint")
    by_id = {s["id"]: s for s in samples}
    rows = {(r["case"], r["view"], str(r["slice"]), r["method"]): r for r in evaluation.rows}
    for case in examples.cases:
        chosen = picks[case.view][case.pick]
        assert (case.case, case.slice) == (chosen["case"], chosen["slice"])
        sample = by_id[case.image_id]
        np.testing.assert_array_equal(case.image, sample["image"].numpy())
        np.testing.assert_array_equal(case.truth, sample["label"][0].numpy() > 0)
        for method, mask in case.predictions.items():
            row = rows[(case.case, case.view, case.slice, method)]
            assert case.jaccards[method] == row["jaccard"]
            assert _jaccard(mask, case.truth) == pytest.approx(row["jaccard"], abs=1e-12)
    best = [c.jaccards["joint"] for c in examples.of_view("axial")]
    assert best == sorted(best, reverse=True)

    path = examples.save(tmp_path / "examples.npz")
    loaded = QualitativeCases.load(path)
    assert loaded.method == examples.method and len(loaded) == len(examples)
    for a, b in zip(loaded.cases, examples.cases, strict=True):
        assert (a.view, a.pick, a.case, a.slice, a.image_id) == \
            (b.view, b.pick, b.case, b.slice, b.image_id)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.jaccards == b.jaccards and list(a.predictions) == list(b.predictions)
        for m in a.predictions:
            np.testing.assert_array_equal(a.predictions[m], b.predictions[m])
    figures = qualitative_figures(loaded, views=["coronal"], methods=["cnn", "joint"])
    assert [f.name for f in figures] == ["qualitative_coronal"]
    picture = Image.open(io.BytesIO(figures[0].png))
    assert picture.size[0] > 300 and picture.size[1] > 600  # 3 rows × (truth + 2 methods)
    with pytest.raises(ValueError, match="no mask of method"):
        qualitative_figures(loaded, methods=["nnunet"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.npz: not a file of qualitative cases"):
        QualitativeCases.load(tmp_path / "bad.npz")

    # the same picks from predictions held in memory
    masks = {m: [c.predictions[m] for c in examples.cases] for m in ("cnn",)}
    picked = [by_id[c.image_id] for c in examples.cases]
    sub_rows = [rows[(c.case, c.view, c.slice, "cnn")] for c in examples.cases]
    again = collect_examples(sub_rows, picked, masks, method="cnn", views=["axial"])
    assert {c.pick for c in again.cases} == {"best", "median", "worst"}
    js = sorted(r["jaccard"] for r in sub_rows if r["view"] == "axial")
    assert [c.jaccards["cnn"] for c in again.of_view("axial")] == \
        [js[-1], js[(len(js) - 1) // 2], js[0]]
    with pytest.raises(ValueError, match="ranking method 'joint' has no predictions"):
        collect_examples(sub_rows, picked, masks, method="joint")


def test_ranking_method_must_be_evaluated(multiview, runs):
    samples, _ = multiview
    with pytest.raises(ValueError, match="'joint', which is not evaluated"):
        evaluate_runs_with_examples({"cnn": runs["cnn"]}, samples[:3], method="joint")
    only = evaluate_runs_with_examples({"cnn": runs["cnn"]}, samples[:SHAPE[2]])
    assert only.examples.method == "cnn" and only.examples.views == ["axial"]


def test_saved_volume_predictions_pair_with_the_model_rows(cohort, runs, tmp_path):
    """Predictions of the CNN written as volumes (RAS grid, and the image's own LPS grid) and
    scored from the files give the rows the model gives at native size."""
    _, _, validation = cohort
    samples = multiview_samples(validation, ("axial", "coronal"), size=None)
    model_rows = evaluate_runs({"cnn": runs["cnn"]}, samples)
    model, weights, _ = load_run(runs["cnn"])
    masks, _ = predict_samples(model, weights, samples)
    source = validation[0]["source"]
    name = source.removesuffix(".nii.gz")
    stored = nib.load(validation[0]["image"])
    original = stored.affine
    ras_affine = stored.as_reoriented(nib.orientations.io_orientation(original)).affine
    for view, folder in (("axial", "ras"), ("coronal", "lps")):
        index = [i for i, s in enumerate(samples) if s["view"] == view]
        volume = restack_slices(np.stack([masks[i] for i in index])[:, None], view)[0]
        affine = ras_affine
        if folder == "lps":  # back on the image's stored grid (x, y flipped)
            volume, affine = volume[::-1, ::-1, :], original
        write_nifti(volume.astype(np.uint8), affine, tmp_path / folder / f"{name}_mask.nii.gz")
        saved = evaluate_predictions(tmp_path / folder, validation, method="cnn", views=[view])
        expected = [r for r in model_rows if r["view"] == view]
        assert len(saved) == len(expected) == len(index)
        for a, b in zip(saved, expected, strict=True):
            assert (a["case"], a["view"], a["slice"], a["truth_empty"], a["pred_empty"]) == \
                (b["case"], b["view"], b["slice"], b["truth_empty"], b["pred_empty"])
            assert a["jaccard"] == pytest.approx(b["jaccard"], abs=1e-12, nan_ok=True)


def _label_array(entry) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(entry["label"])
    return np.asarray(image.dataobj).astype(np.uint8), image.affine


def test_saved_predictions_on_other_grids_and_errors(cohort, tmp_path):
    _, _, validation = cohort
    entry = validation[0]
    name = entry["source"].removesuffix(".nii.gz")
    label, affine = _label_array(entry)
    pred = ndimage.binary_erosion(label, iterations=2).astype(np.uint8)
    pred[2:6, 2:6, 10:12] = 1  # a false positive
    same = write_nifti(pred, affine, tmp_path / "same" / f"{name}.nii.gz")
    # oracle: the prediction sliced by the training pipeline, as if it were the label
    as_label = [{"image": entry["image"], "label": str(same), "source": entry["source"]}]
    expected = {}
    for view in VIEWS:
        truths = cta_samples(validation, view)
        preds = cta_samples(as_label, view)
        expected[view] = [_jaccard(p["label"][0].numpy(), t["label"][0].numpy())
                          for p, t in zip(preds, truths, strict=True)]
    rows = evaluate_predictions(tmp_path / "same", validation, method="eroded", surface=True)
    assert [r["view"] for r in rows] == [v for v in VIEWS for _ in expected[v]]
    got = {v: [r["jaccard"] for r in rows if r["view"] == v] for v in VIEWS}
    for view in VIEWS:
        np.testing.assert_allclose(got[view], expected[view], atol=1e-12)
    assert all(r["case"] == entry["source"] and r["method"] == "eroded" for r in rows)
    assert any(r["hd95_mm"] > 0 for r in rows)

    # the same prediction on a grid twice as fine (same origin) is put back exactly
    fine = np.repeat(np.repeat(np.repeat(pred, 2, 0), 2, 1), 2, 2)
    fine_affine = affine.copy()
    fine_affine[:3, :3] /= 2
    write_nifti(fine, fine_affine, tmp_path / "fine" / f"{entry['id']}_mask.nii.gz")
    resampled = evaluate_predictions(tmp_path / "fine", validation, method="eroded")
    assert [r["jaccard"] for r in resampled] == pytest.approx(
        [r["jaccard"] for r in rows], abs=1e-12, nan_ok=True)

    # a label folder (no image): matched by relative name, case = that name
    labels = tmp_path / "labels"
    write_nifti(label, affine, labels / "p1.nii.gz")
    write_nifti(pred, affine, tmp_path / "flat" / "p1_mask.nii.gz")
    write_nifti(pred, affine, tmp_path / "flat" / "p1_prob.nii.gz")  # ignored extra file
    flat = evaluate_predictions(tmp_path / "flat", labels, method="m", views=["axial"])
    assert {r["case"] for r in flat} == {"p1"} and len(flat) == SHAPE[2]
    np.testing.assert_allclose([r["jaccard"] for r in flat], expected["axial"], atol=1e-12)

    # errors name the files
    with pytest.raises(FileNotFoundError, match=r"no prediction .* for 1 of 1 label\(s\): "
                       r".*label\.nii\.gz \(looked for .*image_mask\.nii\.gz"):
        evaluate_predictions(tmp_path / "flat", validation, method="m")
    write_nifti(np.zeros_like(label), affine, tmp_path / "flat" / "p1.nii.gz")
    with pytest.raises(ValueError, match=r"several predictions match .*p1\.nii\.gz"):
        evaluate_predictions(tmp_path / "flat", labels, method="m")
    probability = write_nifti(pred * 0.7, affine, tmp_path / "prob" / f"{entry['id']}.nii.gz",
                              dtype=np.float32)
    with pytest.raises(ValueError, match=f"{probability}: prediction is not a binary mask"):
        evaluate_predictions(tmp_path / "prob", validation, method="m")
    far = affine.copy()
    far[:3, 3] += 500.0
    moved = write_nifti(pred, far, tmp_path / "far" / f"{entry['id']}.nii.gz")
    with pytest.raises(ValueError, match=f"{moved}: prediction is not on the grid of "):
        evaluate_predictions(tmp_path / "far", validation, method="m")
    with pytest.raises(FileNotFoundError, match="no such folder of predictions"):
        evaluate_predictions(tmp_path / "nope", validation, method="m")
    with pytest.raises(ValueError, match="view must be one of"):
        evaluate_predictions(tmp_path / "same", validation, method="m", views=["oblique"])


def _png(array: np.ndarray, path, fmt: str = "PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def test_saved_2d_predictions(runs, tmp_path, rng):
    truths = [np.zeros((32, 40), np.uint8) for _ in range(3)]
    truths[0][5:20, 8:30] = 1
    truths[1][10:28, 2:14] = 1  # truths[2] stays empty
    images = [(t * 0.6 + 0.4 * rng.random(t.shape)).astype(np.float32) for t in truths]
    names = ["a/img0", "a/img1", "img2"]
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    for name, truth in zip(names, truths, strict=True):
        _png(truth * 255, labels / f"{name}_label.png")
        _png((truth * 200 + 20).astype(np.uint8), labels / f"{name}.png")  # the image, skipped
    # predictions of the CNN run, saved 0/255 (and one 0/1)
    samples = to_samples([{"image": x[None], "label": t[None], "id": n}
                          for x, t, n in zip(images, truths, names, strict=True)])
    model, weights, _ = load_run(runs["cnn"])
    masks, _ = predict_samples(model, weights, samples)
    for name, mask, scale in zip(names, masks, (255, 255, 1), strict=True):
        _png((mask * scale).astype(np.uint8), preds / f"{name}.png")
    rows = evaluate_predictions(preds, labels, method="cnn", label_suffix="_label")
    assert [r["case"] for r in rows] == names
    assert all(r["view"] == "2d" and r["slice"] == "" for r in rows)
    for row, mask, truth in zip(rows, masks, truths, strict=True):
        assert row["jaccard"] == pytest.approx(_jaccard(mask, truth), abs=1e-12, nan_ok=True)
    assert rows[2]["truth_empty"] == 1
    # they pair with the rows of the model on the same images
    model_rows = evaluate_runs({"cnn": runs["cnn"]}, samples)
    for a, b in zip(rows, model_rows, strict=True):
        assert (a["case"], a["view"], a["slice"]) == (b["case"], b["view"], b["slice"])
        assert a["jaccard"] == pytest.approx(b["jaccard"], nan_ok=True)
    paired = EvalTable.from_rows([*model_rows, *[dict(r, method="saved") for r in rows]])
    assert len(paired) == 6

    # a noisy grey JPEG label is binarised at 128
    jpeg = tmp_path / "jpeg"
    _png(np.clip(truths[0] * 230 + rng.integers(0, 20, truths[0].shape), 0, 255)
         .astype(np.uint8), jpeg / "labels" / "horse1.jpg", "JPEG")
    _png(truths[0] * 255, jpeg / "preds" / "horse1.png")
    row, = evaluate_predictions(jpeg / "preds", jpeg / "labels", method="m", view="horse")
    assert row["jaccard"] > 0.95 and row["view"] == "horse" and row["case"] == "horse1"

    # errors name the files
    one = jpeg / "labels"
    _png(np.zeros((31, 40), np.uint8), tmp_path / "small" / "horse1.png")
    with pytest.raises(ValueError, match=r"small/horse1\.png: prediction is 31×40 pixels, "
                       r"its label .*horse1\.jpg is 32×40"):
        evaluate_predictions(tmp_path / "small", one, method="m")
    (preds / "a" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"for 1 of 2 label\(s\): .*img1_label\.png"):
        evaluate_predictions(preds / "a", labels / "a", method="m", label_suffix="_label")
    grey = (rng.random((32, 40)) * 255).astype(np.uint8)
    _png(grey, tmp_path / "grey" / "horse1.png")
    with pytest.raises(ValueError, match=r"grey/horse1\.png: prediction is not a binary mask"):
        evaluate_predictions(tmp_path / "grey", one, method="m")
    colour = np.zeros((32, 40, 3), np.uint8)
    colour[..., 0] = 255
    _png(colour, tmp_path / "colour" / "horse1.png")
    with pytest.raises(ValueError, match=r"colour/horse1\.png: prediction is a colour image"):
        evaluate_predictions(tmp_path / "colour", one, method="m")
    with pytest.raises(ValueError, match="no label files found"):
        evaluate_predictions(preds, tmp_path / "colour", method="m", label_suffix="_label")


def test_saved_volume_predictions_get_example_figures(cohort, tmp_path):
    """Saved predictions of volumes whose images the manifest names get the best / median /
    worst slice per view like model runs do, and the report draws them."""
    from pipeline.evaluation.predictions import evaluate_predictions_with_examples
    from pipeline.reports import build_report, qualitative_figures

    _, _, validation = cohort
    entry = validation[0]
    label = nib.load(entry["label"])
    truth = np.asarray(label.dataobj).astype(np.uint8)
    eroded = truth.copy()
    eroded[::2] = 0  # every other sagittal plane lost: a prediction with errors to rank
    name = entry["source"].removesuffix(".nii.gz")
    write_nifti(eroded, label.affine, tmp_path / "pred" / f"{name}_mask.nii.gz")
    evaluation = evaluate_predictions_with_examples(tmp_path / "pred", validation,
                                                    method="saved", views=["axial", "coronal"])
    plain = evaluate_predictions(tmp_path / "pred", validation, method="saved",
                                 views=["axial", "coronal"])
    assert repr(evaluation.rows) == repr(plain)  # the same rows (NaN where excluded)
    examples = evaluation.examples
    assert examples.views == ["axial", "coronal"]
    by_pick = {(c.view, c.pick): c for c in examples.cases}
    scored = {(r["view"], r["slice"]): r["jaccard"] for r in evaluation.rows
              if r["jaccard"] == r["jaccard"]}
    for view in ("axial", "coronal"):
        values = [j for (v, _), j in scored.items() if v == view]
        assert by_pick[view, "best"].jaccards["saved"] == max(values)
        assert by_pick[view, "worst"].jaccards["saved"] == min(values)
        case = by_pick[view, "worst"]
        assert case.image.shape[-2:] == case.truth.shape == case.predictions["saved"].shape
        assert 0 <= case.image.min() and case.image.max() <= 1  # HU windowed
    figures = qualitative_figures(examples)
    report = build_report([evaluation.rows], figures=figures, n_boot=100)
    assert [f.stem for f in report.figures] == ["qualitative_axial", "qualitative_coronal"]
    with pytest.raises(ValueError, match="need the images"):
        evaluate_predictions_with_examples(tmp_path / "pred", [{k: v for k, v in entry.items()
                                                                 if k != "image"}],
                                           method="saved")
