import json

import pytest

from pixelwise.cli import main


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
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pixel_acc", "mean_acc", "mIoU", "fwIoU", "per_class"} <= set(metrics)
    assert metrics["num_images"] == 8 and metrics["training"]["epochs_completed"] == 2
    assert (out / "best.safetensors").is_file() and (out / "training_curve.svg").is_file()
    report = (out / "report.html").read_text()
    assert "mIoU" in report and "<svg" in report and "<h2>Confusion matrix</h2>" in report
    preds = sorted((out / "predictions").glob("test_*_overlay.png"))
    assert len(preds) >= 4


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
