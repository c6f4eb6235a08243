import json
import re

import pytest

from pixelwise.cli import main
from pixelwise.demo import CLASS_WEIGHTS, demo_config, summary_rows
from pixelwise.report import render_report, svg_line_chart


def test_an_interrupted_quick_demo_resumes_to_its_report(tmp_path, monkeypatch, capsys):
    import pixelwise.demo

    # a smaller quick demo (2 epochs of 25 steps) keeps the default suite short; that the demo learns
    # is the slow tests' claim (the quick one as shipped, 4 epochs of 100 steps, scores 0.49 mIoU)
    monkeypatch.setitem(pixelwise.demo.QUICK, "epochs", 2)
    monkeypatch.setitem(pixelwise.demo.QUICK, "dataset_kwargs",
                        {**pixelwise.demo.QUICK["dataset_kwargs"], "num_train": 200, "num_test": 8})
    real = pixelwise.demo.fit

    def stop_half_way(ev, state):
        if ev == "step" and state.step == 30:
            raise KeyboardInterrupt  # Ctrl-C in the demo's training, in its second epoch

    monkeypatch.setattr(pixelwise.demo, "fit", lambda cfg, **kw: real(cfg, callbacks=[stop_half_way], **kw))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 130
    said = capsys.readouterr().out
    assert f"`pixelwise demo --quick --resume --out {out}` continues from there" in said
    assert not (out / "report.html").exists()
    monkeypatch.setattr(pixelwise.demo, "fit", real)
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--resume"]) == 0
    said = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    phases = [re.search(rf"^\[{i}/4\] ", said, re.M) for i in (1, 2, 3, 4)]  # each phase announced, in order
    assert all(phases) and [m.start() for m in phases] == sorted(m.start() for m in phases)
    assert f"held-out test: mIoU={metrics['mIoU']:.4f} pixel_acc={metrics['pixel_acc']:.4f} (" in said
    assert {"pixel_acc", "mean_acc", "mIoU", "fwIoU", "per_class"} <= set(metrics)
    assert metrics["num_images"] == 8 and metrics["training"]["epochs_completed"] == 2
    assert (out / "best.safetensors").is_file() and (out / "training_curve.svg").is_file()
    report = (out / "report.html").read_text()
    assert "mIoU" in report and "<svg" in report and "<h2>Confusion matrix</h2>" in report
    preds = sorted((out / "predictions").glob("test_*_overlay.png"))
    assert len(preds) == 6  # NUM_EXAMPLES of the 8 test scenes
    assert "<title>pixelwise demo: U-Net on synthetic scenes</title>" in report
    curve = (out / "training_curve.svg").read_text()
    assert all(f">{label} (" in curve for label in ("train loss", "val loss", "val mIoU"))


@pytest.mark.slow
def test_the_quick_demo_learns(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    # predicting background everywhere scores mIoU ~0.21 (84% of pixels); the quick run is bounded
    # by steps (400), not time, so this does not depend on the machine's load (0.49 measured)
    assert json.loads((out / "metrics.json").read_text())["mIoU"] > 0.4


@pytest.mark.slow
def test_full_demo_reaches_target(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mIoU"] >= 0.85


def test_the_training_curve_skips_points_that_are_not_finite():
    """A NaN gave points="295.0,nan" (the browser stops drawing there) and, first in a series, a
    legend of 'nan .. nan'; inf put every finite point on the bottom line."""
    from pixelwise.report import svg_line_chart

    svg = svg_line_chart({"loss": [(1, float("nan")), (2, 1.0), (3, 0.5)], "mIoU": [(1, 0.2), (2, float("inf")),
                                                                                   (3, 0.4)]}, "t")
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert "loss (0.5 .. 1)" in svg and "mIoU (0.2 .. 0.4)" in svg  # the legends' ranges of the finite values


def test_a_write_that_fails_in_the_demos_last_phase_leaves_no_cut_file(tmp_path, monkeypatch):
    """The demo wrote its predictions, metrics.json (over the trainer's), the curve and the report
    in place: a full disk there left a truncated file under its final name (a 3,000-byte report
    without its end, the old one gone). Each is now written beside and renamed."""
    import errno

    from PIL import Image

    import pixelwise.demo
    from pixelwise import create_model, save_checkpoint
    from pixelwise.data.shapes import CLASS_NAMES, PALETTE

    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=len(CLASS_NAMES), base_channels=4),
                    {"model": "unet", "num_classes": len(CLASS_NAMES), "model_kwargs": {"base_channels": 4},
                     "class_names": CLASS_NAMES, "palette": PALETTE})
    folder = tmp_path / "predictions"
    kwargs = {"num_val": 2, "size": 32}
    pixelwise.demo.write_examples(ckpt, folder, kwargs)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save, calls = Image.Image.save, []

    def disk_full_at_the_third(self, fp, *args, **kw):
        calls.append(fp)
        if len(calls) == 3:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n")  # what a full disk leaves: the start of the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kw)

    monkeypatch.setattr(Image.Image, "save", disk_full_at_the_third)
    with pytest.raises(OSError, match="No space left"):
        pixelwise.demo.write_examples(ckpt, folder, kwargs)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before  # each file whole: the earlier one, or the rewritten same bytes


def test_the_report_shows_the_boundary_metrics_and_the_confusion_matrix_in_row_percentages():
    import re

    from pixelwise.report import render_report

    metrics = {"mIoU": 0.5, "boundary_iou": 0.25, "bf_score": 0.75, "num_images": 2,
               "per_class": [{"name": "<sky>", "iou": 0.5, "acc": 0.75}, {"name": "road", "iou": None, "acc": None},
                             {"name": "car", "iou": 0.0, "acc": 0.0}],
               "confusion_matrix": [[3, 1, 0], [0, 0, 0], [1, 1, 2]]}
    page = render_report("t", metrics, "<svg></svg>", [], [])
    assert "<th>boundary_iou</th><td>0.2500</td>" in page and "<th>bf_score</th><td>0.7500</td>" in page
    table = page[page.index("<h2>Confusion matrix</h2>"):]
    rows = re.findall(r"<tr><th>([^<]*)</th>((?:<td>[^<]*</td>)+)</tr>", table)
    assert [(name, re.findall(r"<td>([^<]*)</td>", cells)) for name, cells in rows] == [
        ("&lt;sky&gt;", ["75.0", "25.0", "0.0"]), ("road", ["-", "-", "-"]), ("car", ["25.0", "25.0", "50.0"])]
    assert "Confusion matrix" not in render_report("t", {"mIoU": 0.5}, "", [], [])


def test_the_training_curve_maps_each_series_onto_the_plot_box():
    """Hand-worked with the default 560 x 300 chart and its 40/10/30/30 margins: x from the shared
    range 0..2 onto 40..550, each series' y from its own min..max onto 270 (bottom) .. 30 (top); a
    single point sits at the box's bottom left corner; the legend rows step down by 15 from y 46."""
    svg = svg_line_chart({"a": [(0, 0.0), (1, 0.5), (2, 1.0)], "b": [(1, 10.0), (2, 20.0)]}, "t")
    assert re.findall(r'points="([^"]*)"', svg) == ["40.0,270.0 295.0,150.0 550.0,30.0", "295.0,270.0 550.0,30.0"]
    assert len(re.findall(r"<circle ", svg)) == 5
    assert '<rect x="40" y="30" width="510" height="240"' in svg and 'width="560" height="300"' in svg
    legends = re.findall(r'<text x="48" y="(\d+)"[^>]*>([^<]*)</text>', svg)
    assert legends == [("46", "a (0 .. 1)"), ("61", "b (10 .. 20)")]
    one = svg_line_chart({"c": [(3, 5.0)]}, "t")
    assert re.findall(r'points="([^"]*)"', one) == ["40.0,270.0"] and "c (5 .. 5)" in one


def test_the_training_curve_gives_each_series_its_own_colour_then_cycles():
    svg = svg_line_chart({f"s{i}": [(0, 0.0), (1, 1.0)] for i in range(6)}, "t")
    strokes = re.findall(r'<polyline fill="none" stroke="([^"]*)"', svg)
    assert len(strokes) == 6 and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in strokes)
    assert len(set(strokes[:5])) == 5 and strokes[5] == strokes[0]


def test_the_report_tables_list_metrics_classes_and_examples_in_order():
    metrics = {"num_images": 3, "pixel_acc": 0.875, "mIoU": 0.5, "extra": 1.0,
               "per_class": [{"name": "sky", "iou": 0.25, "acc": None}, {"name": "a&b", "iou": 0.75, "acc": 1.0}],
               "confusion_matrix": [[1, 1], [0, 4]]}
    example = {"name": "s<1>", "image": "p/s_image.png", "truth": "p/s_truth.png", "pred": "p/s.png",
               "overlay": "p/s_overlay.png"}
    page = render_report("T & t", metrics, "<svg/>", [example], ["note <b>"])
    assert "<title>T &amp; t</title>" in page and "<h1>T &amp; t</h1>" in page and "<p>note &lt;b&gt;</p>" in page
    assert re.findall(r"<tr><th>(\w+)</th><td>([^<]*)</td></tr>", page) == [
        ("mIoU", "0.5000"), ("pixel_acc", "0.8750"), ("num_images", "3")]  # the fixed order; "extra" is not shown
    assert re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page) == [
        ("sky", "0.2500", "null"), ("a&amp;b", "0.7500", "1.0000")]
    assert "<tr><th>true class</th><th>sky</th><th>a&amp;b</th></tr>" in page
    assert ("<tr><td>s&lt;1&gt;</td><td><img src=\"p/s_image.png\" width=\"160\"></td>"
            "<td><img src=\"p/s_truth.png\" width=\"160\"></td><td><img src=\"p/s.png\" width=\"160\"></td>"
            "<td><img src=\"p/s_overlay.png\" width=\"160\"></td></tr></table>") in page
    # without per-class names the confusion matrix is headed by the class ids
    assert "<tr><th>true class</th><th>0</th><th>1</th></tr>" in render_report(
        "t", {"confusion_matrix": [[1, 0], [0, 1]]}, "", [], [])


def test_the_demo_recipe_is_the_one_its_comment_and_the_readme_describe(tmp_path):
    """README (Results): U-Net base 16 + BN on 1,600 synthetic 64x64 scenes, 4.4 min of training,
    200 test scenes; demo.py's comment: Adam lr 3e-3, batch 8, poly schedule, up to 5 objects, and
    the quick run 4 epochs of 100 steps (800 scenes / batch 8), bounded by steps, not time."""
    full = demo_config(tmp_path, quick=False, progress=False)
    assert (full.model, full.dataset, full.optimizer, full.lr, full.batch_size, full.schedule) == (
        "unet", "shapes", "adam", 3e-3, 8, "poly")
    assert full.model_kwargs["base_channels"] == 16 and full.model_kwargs["batch_norm"] is True
    assert full.max_minutes == 4.4 and full.epochs >= 1
    assert {k: full.dataset_kwargs[k] for k in ("num_train", "num_test", "size", "max_objects")} == {
        "num_train": 1600, "num_test": 200, "size": 64, "max_objects": 5}
    assert full.class_weights == str(tmp_path / "demo_class_weights.json") and len(CLASS_WEIGHTS) == 4
    quick = demo_config(tmp_path, quick=True, progress=False, resume=True)
    assert quick.max_minutes is None and quick.resume and not quick.overwrite
    assert quick.epochs == 4 and quick.dataset_kwargs["num_train"] // quick.batch_size == 100
    # the measured scores (README's 0.880, the quick run's 0.49) are of this recipe exactly: the rest of it
    assert not full.resume and not full.overwrite and full.augment == quick.augment == {
        "flip": True, "jitter": False, "scale": None}
    assert quick.dataset_kwargs == {"num_train": 800, "num_val": 40, "num_test": 40, "size": 64, "max_objects": 5}
    # against the background's 84% share of the pixels: every class weighed, background least
    assert 0 < CLASS_WEIGHTS[0] < min(CLASS_WEIGHTS[1:])


def test_summary_rows_read_the_csv_as_floats_and_empty_cells_as_none(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,val_loss,mIoU\n1,0.5,0.75,\n2,0.25,0.5,0.125\n")
    assert summary_rows(tmp_path) == [{"epoch": 1.0, "train_loss": 0.5, "val_loss": 0.75, "mIoU": None},
                                      {"epoch": 2.0, "train_loss": 0.25, "val_loss": 0.5, "mIoU": 0.125}]


def test_run_demo_runs_the_full_recipe_unless_asked_for_the_quick_one(tmp_path, monkeypatch):
    import pixelwise.demo

    seen = []

    def stop(cfg, writes):
        seen.append(cfg)
        raise KeyboardInterrupt  # before the first file is written or anything trained

    monkeypatch.setattr(pixelwise.demo, "check_out", stop)
    for kwargs in ({}, {"quick": True}):
        with pytest.raises(KeyboardInterrupt):
            pixelwise.demo.run_demo(tmp_path / "demo", **kwargs)
    assert [(c.epochs, c.max_minutes, c.dataset_kwargs["num_train"]) for c in seen] == [(30, 4.4, 1600), (4, None, 800)]
    assert not seen[0].overwrite and not seen[0].resume and not (tmp_path / "demo").exists()
