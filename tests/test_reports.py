"""Reports: numbers recomputed independently from a generated per-image table, files, errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import re
from dataclasses import replace
from importlib import metadata

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from pipeline.evaluation.tables import (
    EVAL_COLUMNS,
    evaluation_rows,
    load_tables,
    read_eval_table,
    select_cases,
    write_eval_table,
)
from pipeline.metrics import compute_dice, compute_jaccard
from pipeline.reports import (
    ALL_VIEWS,
    NO_LABELS_NOTE,
    ReportFigure,
    bootstrap_ci,
    build_report,
    collect_provenance,
    plot_qualitative,
    plot_training_curves,
    render_html,
    wilcoxon_test,
    write_report,
)
from pipeline.reports.logs import read_training_log

VIEWS = ("axial", "coronal", "sagittal")
METHODS = ("cnn", "piecewise", "joint")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _generate_rows(rng: np.random.Generator, n_cases: int = 3, n_slices: int = 12) -> list[dict]:
    """Per-image rows for 3 views × 3 methods with empty truths, false positives and ties."""
    rows = []
    for view in VIEWS:
        for case in range(n_cases):
            for s in range(n_slices):
                truth_empty = rng.random() < 0.2
                base = rng.uniform(0.4, 0.85)
                piecewise = min(1.0, max(0.0, base + rng.normal(0.02, 0.03)))
                joint = piecewise if rng.random() < 0.3 else \
                    min(1.0, max(0.0, piecewise + rng.normal(0.01, 0.02)))
                for method, j in zip(METHODS, (base, piecewise, joint), strict=True):
                    rows.append({
                        "case": f"case{case}", "view": view, "slice": s, "method": method,
                        "jaccard": math.nan if truth_empty else j,
                        "dice": math.nan if truth_empty else 2 * j / (1 + j),
                        "truth_empty": int(truth_empty),
                        "pred_empty": int(bool(truth_empty and rng.random() < 0.5)),
                        "image": f"case{case}/{view}/{s:03d}.png",
                    })
    # one scored image has no joint row: it must be left out of the pairs with joint
    drop = next(i for i, r in enumerate(rows) if r["method"] == "joint" and r["view"] == "axial"
                and not r["truth_empty"])
    del rows[drop]
    order = rng.permutation(len(rows))  # row order must not matter
    return [rows[i] for i in order]


def _write_csv(path, rows, columns=(*EVAL_COLUMNS, "image")) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v
                             for k, v in row.items()})


@pytest.fixture
def generated(rng, tmp_path):
    rows = _generate_rows(rng)
    path = tmp_path / "eval.csv"
    _write_csv(path, rows)
    return rows, path


def test_summary_numbers_recomputed(generated):
    rows, path = generated
    report = build_report([path], n_boot=500)
    assert report.views == list(VIEWS) and report.methods == list(METHODS)
    for view in VIEWS:
        for method in METHODS:
            group = [r for r in rows if r["view"] == view and r["method"] == method]
            scored = [r["jaccard"] for r in group if not math.isnan(r["jaccard"])]
            excluded = [r for r in group if math.isnan(r["jaccard"])]
            s = report.summary(view, method)
            assert s.n_images == len(group)
            assert s.n_scored == len(scored)
            assert s.n_excluded == len(excluded) == sum(r["truth_empty"] for r in group)
            assert s.n_false_positive == sum(r["pred_empty"] == 0 for r in excluded)
            assert s.mean_jaccard == pytest.approx(np.mean(scored), rel=1e-12)
            assert s.std_jaccard == pytest.approx(np.std(scored, ddof=1), rel=1e-12)
            assert s.note == ""
    pooled = report.summary(ALL_VIEWS, "cnn")
    cnn = [r["jaccard"] for r in rows if r["method"] == "cnn" and not math.isnan(r["jaccard"])]
    assert pooled.mean_jaccard == pytest.approx(np.mean(cnn)) and pooled.n_scored == len(cnn)


def test_paired_comparisons_recomputed(generated):
    rows, path = generated
    report = build_report(path, n_boot=2000, seed=3)
    scored = {(r["case"], r["view"], r["slice"], r["method"]): r["jaccard"] for r in rows
              if not math.isnan(r["jaccard"])}
    for a, b in (("joint", "piecewise"), ("joint", "cnn"), ("piecewise", "cnn")):
        for view in VIEWS:
            keys = sorted({k[:3] for k in scored if k[1] == view})
            d = np.array([scored[(*k, a)] - scored[(*k, b)] for k in keys
                          if (*k, a) in scored and (*k, b) in scored])
            c = report.comparison(a, b, view)
            assert c.n_pairs == d.size
            assert c.mean_difference == pytest.approx(d.mean(), rel=1e-12)
            assert c.p_value == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
            assert (c.wins, c.losses, c.ties) == (int((d > 0).sum()), int((d < 0).sum()),
                                                  int((d == 0).sum()))
            assert c.ci_low <= d.mean() <= c.ci_high
            half_width = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
            assert (c.ci_high - c.ci_low) / 2 == pytest.approx(half_width, rel=0.3)
            expected_unmatched = 1 if view == "axial" and "joint" in (a, b) else 0
            assert c.n_unmatched == expected_unmatched
    assert report.comparison("joint", "piecewise", "axial").ties > 0  # the generator made ties


def test_bootstrap_and_wilcoxon_edge_cases(rng):
    values = rng.normal(0.02, 0.05, 50_000)
    low, high = bootstrap_ci(values, n_boot=200, seed=1, max_block=100_000)  # 100 blocks
    assert (low, high) == bootstrap_ci(values, n_boot=200, seed=1)  # blocks change nothing
    assert low < values.mean() < high
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    stat, p, note = wilcoxon_test(np.zeros(7))
    assert p == 1.0 and math.isnan(stat) and "all paired differences are zero" in note
    assert math.isnan(wilcoxon_test([])[1])


def _bootstrap_oracle(values, n_boot, confidence, seed, max_block):
    """The hand-written percentile bootstrap that ``scipy.stats.bootstrap`` replaced: the
    published intervals came from it, so the library must give them to the last bit."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, max_block // v.size)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return tuple(float(q) for q in np.quantile(means, [alpha, 1.0 - alpha]))


@pytest.mark.parametrize(("n", "n_boot", "confidence", "seed", "max_block"), [
    (2, 2000, 0.95, 0, 4_000_000), (50, 2000, 0.95, 0, 4_000_000), (137, 500, 0.9, 3, 10_000),
    (1000, 9999, 0.99, 7, 4_000_000), (20, 37, 0.95, 1, 1), (5, 1, 0.95, 0, 4_000_000),
])
def test_bootstrap_reproduces_the_hand_written_intervals_bit_for_bit(rng, n, n_boot,
                                                                     confidence, seed, max_block):
    values = rng.normal(0.01, 0.03, n)
    assert bootstrap_ci(values, n_boot=n_boot, confidence=confidence, seed=seed,
                        max_block=max_block) == _bootstrap_oracle(values, n_boot, confidence,
                                                                  seed, max_block)


def test_identical_methods_give_p_one(generated):
    rows, _ = generated
    copy = [dict(r, method="joint") for r in rows if r["method"] == "piecewise"]
    same = [r for r in rows if r["method"] == "piecewise"] + copy
    c = build_report([same], n_boot=100).comparison("joint", "piecewise", "axial")
    assert c.p_value == 1.0 and c.mean_difference == 0.0 and c.ties == c.n_pairs > 0


def test_report_files(generated, tmp_path, rng):
    _, path = generated
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_jaccard,val_jaccard_crf,gamma\n"
                   "1,0.50,0.45,\n2,0.62,,0.3\n3,0.70,0.61,0.5\n")
    table = read_eval_table(path)
    picks = select_cases(table, "joint")
    figures = []
    image = rng.random((24, 24))
    truth = np.zeros((24, 24), np.uint8)
    truth[6:18, 5:15] = 1
    for view, chosen in picks.items():
        for which, row in chosen.items():
            preds = {m: np.roll(truth, k, axis=1) for k, m in enumerate(METHODS)}
            figures.append(ReportFigure(f"{view} {which}: {row['case']} slice {row['slice']}",
                                        plot_qualitative(image, truth, preds, title=view)))
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"training": []}')
    provenance = collect_provenance({"c": 10.0, "preset": "cpu"}, manifest)
    report = build_report([table], training_log=log, figures=figures, provenance=provenance,
                          n_boot=300)
    out = write_report(report, tmp_path / "out")
    assert {"md", "html", "summary_csv", "comparisons_csv", "json"} <= set(out)
    for kind in ("md", "html", "summary_csv", "comparisons_csv", "json"):
        text = out[kind].read_text()
        for name in (*VIEWS, *METHODS):
            assert name in text, (kind, name)
    html = out["html"].read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 1 + 9  # training curves + best/median/worst for 3 views
    assert all(base64.b64decode(x).startswith(PNG_MAGIC) for x in images)
    assert provenance["git_commit"] in html and provenance["manifest_sha256"] in html
    md = out["md"].read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out["md"].parent / link).read_bytes().startswith(PNG_MAGIC)
    data = json.loads(out["json"].read_text())
    s = next(x for x in data["summaries"] if (x["view"], x["method"]) == ("coronal", "joint"))
    assert s["mean_jaccard"] == pytest.approx(report.summary("coronal", "joint").mean_jaccard)
    with out["summary_csv"].open() as handle:
        summary_rows = list(csv.DictReader(handle))
    assert len(summary_rows) == len(report.summaries) == 4 * 3
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes left no temporaries


def test_html_escapes_every_value_and_marks_numbers(generated):
    _, path = generated
    png = PNG_MAGIC + b"not really an image"
    report = replace(build_report(path, n_boot=200), title='<script>alert("t")</script> & co',
                     notes=["mean <b>undefined</b>", "a & 'b'"],
                     figures=[ReportFigure('fig "<1>"', png, caption="<i>cap</i>"),
                              ReportFigure("plain", png)],
                     provenance={"git_commit": "<commit>", "args": {"x": "a&b"}})
    # one spelling of the quote entities (html.escape and markupsafe differ, both are valid)
    page = render_html(report).replace("&quot;", "&#34;").replace("&#x27;", "&#39;")
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page
    assert page.count("&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt; &amp; co") == 2  # title, h1
    assert '<li class="note">mean &lt;b&gt;undefined&lt;/b&gt;</li>' in page
    assert "<li>a &amp; &#39;b&#39;</li>" in page
    assert '<h3>fig &#34;&lt;1&gt;&#34;</h3>' in page and 'alt="fig &#34;&lt;1&gt;&#34;"' in page
    assert "<figcaption>&lt;i&gt;cap&lt;/i&gt;</figcaption>" in page
    assert page.count("<figcaption>") == 1  # the figure without a caption has none
    data = base64.b64encode(png).decode("ascii")
    assert page.count(f'<img src="data:image/png;base64,{data}"') == 2
    assert "<td>&lt;commit&gt;</td>" in page and "<td>a&amp;b</td>" in page
    s = report.summary("axial", "cnn")
    assert f'<td class="num">{100 * s.mean_jaccard:.2f}</td>' in page
    assert f'<td class="num">{s.n_scored}</td>' in page
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</html>\n")


def test_missing_column_names_file_and_column(generated, tmp_path):
    rows, _ = generated
    bad = tmp_path / "bad_eval.csv"
    _write_csv(bad, rows, [c for c in EVAL_COLUMNS if c != "pred_empty"])
    with pytest.raises(ValueError, match=r"bad_eval\.csv.*'pred_empty'"):
        build_report([bad])
    with pytest.raises(ValueError, match=r"bad_eval\.csv.*'pred_empty'"):
        read_eval_table(bad)


@pytest.mark.parametrize(("column", "value", "message"), [
    ("jaccard", "abc", r"line 2: column 'jaccard' must be a number"),
    ("jaccard", "83.5", r"line 2: column 'jaccard' must lie in \[0, 1\]"),
    ("truth_empty", "2", r"line 2: column 'truth_empty' must be 0 or 1"),
    ("view", "", r"line 2: column 'view' is empty"),
])
def test_bad_values_named(generated, tmp_path, column, value, message):
    rows, _ = generated
    rows = [dict(rows[0], **{column: value}), *rows[1:]]
    path = tmp_path / "values.csv"
    _write_csv(path, rows)
    with pytest.raises(ValueError, match=rf"values\.csv, {message}"):
        read_eval_table(path)


def test_inconsistent_or_duplicate_rows_rejected(generated):
    rows, _ = generated
    labelled = next(r for r in rows if not r["truth_empty"])
    with pytest.raises(ValueError, match="only an empty ground truth can be excluded"):
        load_tables([[dict(labelled, jaccard=math.nan)]])
    with pytest.raises(ValueError, match="already appears"):
        load_tables([[labelled, dict(labelled)]])
    with pytest.raises(ValueError, match="more than one table"):
        load_tables([[labelled], [labelled]])


def test_unlabelled_evaluation_says_so(generated, tmp_path):
    rows, _ = generated
    unlabelled = [dict(r, jaccard=math.nan, dice=math.nan, truth_empty=1) for r in rows]
    report = build_report([unlabelled], n_boot=100)
    s = report.summary("axial", "cnn")
    assert s.n_scored == 0 and math.isnan(s.mean_jaccard) and s.note == NO_LABELS_NOTE
    assert s.n_false_positive == sum(1 for r in rows if r["view"] == "axial"
                                     and r["method"] == "cnn" and r["pred_empty"] == 0)
    out = write_report(report, tmp_path / "unlabelled")
    md = out["md"].read_text()
    assert NO_LABELS_NOTE in md and "undefined" in md
    assert not re.search(r"\| axial \| cnn \| \d", md)  # no number printed as a mean
    data = json.loads(out["json"].read_text())
    assert all(x["mean_jaccard"] is None for x in data["summaries"])
    assert all(x["n_pairs"] == 0 and x["p_value"] is None for x in data["comparisons"])


def test_select_cases_best_median_worst(generated):
    rows, path = generated
    picks = select_cases(read_eval_table(path), "piecewise")
    for view in VIEWS:
        js = sorted(r["jaccard"] for r in rows if r["view"] == view
                    and r["method"] == "piecewise" and not math.isnan(r["jaccard"]))
        assert picks[view]["best"]["jaccard"] == js[-1]
        assert picks[view]["worst"]["jaccard"] == js[0]
        assert picks[view]["median"]["jaccard"] == js[(len(js) - 1) // 2]
    with pytest.raises(ValueError, match="which must be"):
        select_cases(read_eval_table(path), "cnn", which=("mean",))


def test_training_log_and_figures(tmp_path):
    log = tmp_path / "train.csv"
    log.write_text("epoch,val_jaccard_cnn,gamma,note\n2,0.6,,x\n1,,0.1,y\n")
    parsed = read_training_log(log)
    np.testing.assert_array_equal(parsed["epoch"], [1, 2])
    np.testing.assert_array_equal(parsed["val_jaccard_cnn"], [np.nan, 0.6])
    assert "train_jaccard" not in parsed and "note" not in parsed
    png = plot_training_curves(log)
    assert Image.open(io.BytesIO(png)).size[0] > 100
    no_epoch = tmp_path / "no_epoch.csv"
    no_epoch.write_text("step,train_jaccard\n1,0.5\n")
    with pytest.raises(ValueError, match=r"no_epoch\.csv.*'epoch'"):
        read_training_log(no_epoch)
    rgb = np.zeros((3, 16, 20))
    truth = np.zeros((16, 20), np.uint8)
    png = plot_qualitative(rgb, truth, {"cnn": truth, "other": np.ones_like(truth)})
    assert png.startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="shape"):
        plot_qualitative(rgb, truth, {"cnn": truth[:-1]})


def test_evaluation_rows_round_trip(rng, tmp_path):
    pred = (rng.random((4, 1, 10, 12)) < 0.5).astype(np.uint8)
    truth = (rng.random((4, 1, 10, 12)) < 0.5).astype(np.uint8)
    truth[1] = 0
    pred[2] = 0
    rows = evaluation_rows(pred, truth, case="p01", view="coronal", method="joint",
                           slices=[5, 6, 7, 8], spacing=(0.8, 0.8))
    path = write_eval_table(rows, tmp_path / "rows.csv")
    table = read_eval_table(path)
    np.testing.assert_allclose(table["jaccard"], compute_jaccard(pred, truth), rtol=1e-15)
    np.testing.assert_allclose(table["dice"], compute_dice(pred, truth), rtol=1e-15)
    np.testing.assert_array_equal(table["truth_empty"], [False, True, False, False])
    np.testing.assert_array_equal(table["pred_empty"], [False, False, True, False])
    assert list(table["slice"]) == ["5", "6", "7", "8"]
    assert np.isnan(table["hd95_mm"][[1, 2]]).all() and (table["hd95_mm"][[0, 3]] > 0).all()
    assert table.names[:len(EVAL_COLUMNS)] == list(EVAL_COLUMNS)


def test_collect_provenance(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_bytes(b'{"training": [{"image": "a.png"}]}')
    info = collect_provenance({"nested": {"c": 1}}, manifest)
    assert info["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", info["git_commit"])
    assert info["packages"]["numpy"] == metadata.version("numpy")
    assert set(info["packages"]) >= {"torch", "monai", "numpy", "cvxpy", "PyMaxflow"}
    assert info["config"] == {"nested": {"c": 1}} and info["python"].count(".") == 2
    bare = collect_provenance()
    assert "manifest_sha256" not in bare and "config" not in bare


def _case(view, pick, rng, jaccard, methods=("cnn", "joint")):
    from pipeline.evaluation.examples import QualitativeCase

    truth = np.zeros((12, 16), np.uint8)
    truth[3:9, 4:12] = 1
    return QualitativeCase(view=view, pick=pick, case="p01", slice=str(len(pick)),
                           image=rng.random((1, 12, 16)).astype(np.float32), truth=truth,
                           predictions={m: np.roll(truth, k, axis=1)
                                        for k, m in enumerate(methods)},
                           jaccards=dict.fromkeys(methods, jaccard), image_id=f"{view}:{pick}")


def test_qualitative_figures_from_cases(rng, tmp_path):
    from pipeline.evaluation.examples import QualitativeCases
    from pipeline.reports import plot_qualitative_grid, qualitative_figures

    cases = QualitativeCases("joint", [_case("sagittal", "worst", rng, 0.2),
                                       _case("axial", "median", rng, 0.5),
                                       _case("axial", "best", rng, 0.9),
                                       _case("axial", "worst", rng, math.nan)])
    assert cases.views == ["axial", "sagittal"] and cases.methods == ["cnn", "joint"]
    assert [c.pick for c in cases.of_view("axial")] == ["best", "median", "worst"]
    figures = qualitative_figures(cases)
    assert [f.name for f in figures] == ["qualitative_axial", "qualitative_sagittal"]
    assert "best, median, worst" in figures[0].caption and "joint" in figures[0].caption
    tall = Image.open(io.BytesIO(figures[0].png)).size
    short = Image.open(io.BytesIO(figures[1].png)).size
    assert tall[1] > 2 * short[1]  # three rows against one
    assert qualitative_figures(cases, views=["coronal"]) == []
    saved = QualitativeCases.load(cases.save(tmp_path / "cases.npz"))
    assert math.isnan(saved.cases[3].jaccards["joint"]) and saved.cases[2].jaccards["cnn"] == 0.9
    report = build_report([_generate_rows(rng)], figures=figures, n_boot=50)
    data = json.loads(write_report(report, tmp_path / "r")["json"].read_text())
    assert [f["name"] for f in data["figures"]] == ["qualitative_axial", "qualitative_sagittal"]
    assert (tmp_path / "r" / "figures" / "qualitative_axial.png").read_bytes() \
        .startswith(PNG_MAGIC)
    truth = cases.cases[0].truth
    with pytest.raises(ValueError, match="at least one row"):
        plot_qualitative_grid([], [], [])
    with pytest.raises(ValueError, match="one entry per row"):
        plot_qualitative_grid([truth, truth], [truth], [{"a": truth}])
    with pytest.raises(ValueError, match="every row needs the methods"):
        plot_qualitative_grid([truth, truth], [truth, truth], [{"a": truth}, {"b": truth}])
