"""ONNX export (pixelwise.inference.export, ``pixelwise export``): every semantic model of
``pixelwise models``, narrowed so that the suite stays fast, exported and checked by onnxruntime
against PyTorch eager at two input sizes; metadata round trip; ``predict --onnx`` and
``bench --mode onnx`` on the written file; one-line errors on bad input."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import pixelwise.inference.export as export_module  # noqa: E402
from conftest import docs_images, docs_mask, narrow  # noqa: E402
from pixelwise import __version__, create_model, list_models, save_checkpoint  # noqa: E402
from pixelwise.cli import main  # noqa: E402
from pixelwise.errors import UserError  # noqa: E402
from pixelwise.inference.export import (  # noqa: E402
    MAX_OPSET,
    MIN_OPSET,
    check_maskrcnn_outputs,
    export_maskrcnn_parts,
    export_onnx,
    onnx_metadata,
    sample_batch,
    sort_graph,
    verification_sizes,
    verify,
)
from pixelwise.inference.onnx_runner import (  # noqa: E402
    OnnxModel,
    exported_dropout,
    graph_problem,
    is_onnx,
    load_onnx,
    make_session,
    read_onnx_metadata,
    stored_geometry,
)
from pixelwise.inference.predictor import Predictor  # noqa: E402
from pixelwise.models import forward_logits  # noqa: E402

SIZES = [(1, 64, 80), (2, 53, 97)]  # (batch, H, W): neither a multiple of 32 for the second
CLASSES = 5


VARIANTS = {"unet_valid": ("unet", {"padding": "valid"}), "unet_input_norm": ("unet", {"input_norm": True}),
            "unet_global_context": ("unet", {"global_context": True}),
            "unet_ibn": ("unet", {"batch_norm": True, "ibn_levels": 2})}  # base 64: halves of 64, 128 narrow evenly
SEMANTIC = [*list_models("semantic"), *VARIANTS]


def build(name: str) -> tuple[nn.Module, dict]:
    base, kwargs = VARIANTS.get(name, (name, {}))
    torch.manual_seed(0)
    model = narrow(create_model(base, num_classes=CLASSES, **kwargs))
    return model, {"model": base, "model_kwargs": kwargs, "num_classes": CLASSES}


@pytest.mark.parametrize("name", SEMANTIC)
def test_every_semantic_model_exports_and_matches_eager(name, tmp_path):
    model, meta = build(name)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, meta, model_name=meta["model"], sizes=SIZES)
    assert [c.shape for c in report.checks] == [(1, 3, 64, 80), (2, 3, 53, 97)]
    for check in report.checks:
        assert check.agreement >= 0.999
        assert check.max_abs_diff <= 1e-3 * max(1.0, check.max_abs_logit)
    onnx_model, stored = load_onnx(path)
    assert stored["model"] == meta["model"] and stored["onnx"]["dynamic_axes"] == ["batch", "height", "width"]
    # the class axis is the number in the graph (a final crop or resize left ENet's, SegNet-Basic's,
    # DeepLabV3+'s a symbol, which shape-checking runtimes read)
    assert _output_shape(path) == ["batch", CLASSES, "height", "width"]
    x = torch.randn(3, 3, 41, 70)  # a third size, batch 3, never seen at export
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(x), forward_logits(model, x), atol=1e-3, rtol=1e-3)


def test_metadata_holds_the_input_contract_and_classes(tmp_path):
    model, meta = build("segnet_basic")
    meta.update(class_names=[f"c{i}" for i in range(CLASSES)], palette=[[i, i, i] for i in range(CLASSES)],
                input={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": [64, 80]},
                ignore_color=[0, 0, 0], data={"dataset_kwargs": {}, "train_split": "train", "val_split": "val"})
    report = export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES)
    stored = read_onnx_metadata(report.path)
    assert stored["class_names"] == meta["class_names"] and stored["palette"] == meta["palette"]
    assert stored["ignore_color"] == [0, 0, 0]  # serve reads an uploaded truth's ignored pixels with it
    assert stored["data"] == meta["data"]  # eval --onnx says when it scores images the model trained on
    assert stored["input"]["mean"] == [0.5, 0.5, 0.5] and stored["input"]["std"] == [0.25, 0.25, 0.25]
    assert stored["onnx"]["precision"] == "float32" and len(stored["onnx"]["verified"]) == 2


def test_export_puts_the_callers_model_back_on_its_device(tmp_path, monkeypatch):
    """The export traces on the CPU; a caller's GPU model was left there. Here the model "lives" on
    the meta device as far as export can tell (no GPU on the test machine): it is moved back."""
    model, meta = build("segnet_basic")
    moves = []
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        if self is model:
            moves.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    somewhere = torch.device("meta")
    monkeypatch.setattr("pixelwise.inference.export._export_onnx", lambda *a, **k: (moves.append("export"), "r")[1])
    monkeypatch.setattr(torch.nn.Parameter, "device", property(lambda p: somewhere), raising=False)
    assert export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES) == "r"
    assert moves == ["export", somewhere]


def test_export_puts_a_training_model_back_in_training_mode(tmp_path, monkeypatch):
    """export_onnx (and export_maskrcnn_parts, which also left a GPU model on the CPU) switched the
    caller's model to eval mode for good: later training steps ran on running statistics."""
    from pixelwise.inference import export
    from pixelwise.models import create_model

    model, meta = build("segnet_basic")
    model.train()
    export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES)
    assert model.training
    maskrcnn = create_model("maskrcnn_resnet18_fpn", num_classes=3).train()
    seen = []
    monkeypatch.setattr(export, "_export_maskrcnn_parts", lambda m, *a, **k: seen.append(m.training) or [])
    somewhere = torch.device("meta")
    monkeypatch.setattr(torch.nn.Parameter, "device", property(lambda p: somewhere), raising=False)
    moves = []
    real_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: (moves.append(a[0]) if self is maskrcnn else None,
                                                                real_to(self, *a, **k))[1])
    assert export.export_maskrcnn_parts(maskrcnn, tmp_path / "mr.onnx") == []
    assert maskrcnn.training and moves == [somewhere]


def test_an_int8_export_without_calibration_batches_is_one_line(tmp_path):
    """calibration=[] ended in onnxruntime's 'No data is collected' traceback."""
    pytest.importorskip("onnxruntime")
    model, meta = build("segnet_basic")
    with pytest.raises(UserError, match="int8 export needs calibration batches"):
        export_onnx(model, tmp_path / "m.onnx", meta, calibration=iter([]), sizes=SIZES)
    assert not list(tmp_path.iterdir())


def test_export_fails_loudly_and_writes_nothing_below_the_agreement(tmp_path):
    model, meta = build("segnet_basic")
    path = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="verification failed.*nothing written"):
        export_onnx(model, path, meta, sizes=SIZES, min_agreement=1.01)
    assert not path.exists() and not list(tmp_path.iterdir())
    model, meta = build("unet")  # its fp16 file agrees on 99.6%: the threshold was printed as '(needs 100.0%'
    with pytest.raises(UserError, match=r"\(needs 99\.999999999%"):
        export_onnx(model, path, meta, sizes=SIZES, fp16=True, min_agreement=0.99999999999)


def test_fp16_export_keeps_float32_io(tmp_path):
    model, meta = build("unet")
    report = export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES, fp16=True, min_agreement=0.98)
    assert report.precision == "float16"
    onnx_model, stored = load_onnx(report.path)
    assert stored["onnx"]["precision"] == "float16"
    assert onnx_model(torch.randn(1, 3, 32, 48)).dtype == torch.float32


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_each_precision_exports_at_both_ends_of_the_opsets_export_accepts(precision, end, tmp_path):
    # float32 with SegNet-Basic: index unpooling and padding on traced sizes are the oldest-opset ops
    model, meta = build("segnet_basic" if precision == "float32" else "unet")
    opset = MIN_OPSET[precision] if end == "oldest" else MAX_OPSET
    calibration = [torch.randn(2, 3, 64, 80)] if precision == "int8" else None
    # the graph is under test here, not the precision's agreement (tested above and below)
    report = export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES, opset=opset, fp16=precision == "float16",
                         calibration=calibration, min_agreement=0.0 if precision == "int8" else 0.98)
    onnx_model, stored = load_onnx(report.path)
    assert stored["onnx"]["opset"] == opset and stored["onnx"]["precision"] == precision
    assert onnx_model(torch.randn(1, 3, 40, 56)).shape == (1, CLASSES, 40, 56)
    assert _output_shape(report.path) == ["batch", CLASSES, "height", "width"]


def _output_shape(path) -> list:
    import onnx

    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- command line


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet", num_classes=CLASSES, base_channels=8).eval()  # a checkpoint must rebuild
    meta = {"model": "unet", "model_kwargs": {"base_channels": 8}, "num_classes": CLASSES,
            "class_names": [f"c{i}" for i in range(CLASSES)],
            "input": {"mean": [0.5] * 3, "std": [0.25] * 3, "resize": [48, 64]}}
    path = tmp_path / "unet.safetensors"
    save_checkpoint(path, model, meta)
    return path


def test_cli_export_predict_and_bench_run_the_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "argmax agreement 100.000%" in printed and "48x64 (batch 1)" in printed
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "a.png")
    args = ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main([*args, "--onnx", str(out)]) == 0
    assert main([*args[:2], "--out", str(tmp_path / "pred_pt"), "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    onnx_mask = np.asarray(Image.open(tmp_path / "pred" / "a.png"))
    torch_mask = np.asarray(Image.open(tmp_path / "pred_pt" / "a.png"))
    assert onnx_mask.shape == (50, 70) and (onnx_mask == torch_mask).mean() >= 0.999
    capsys.readouterr()
    # int8 does not apply to an ONNX file: said first, not after asking for calibration images and reading them
    for calib in ([], ["--calib-dataset", "folder", "--calib-data", str(tmp_path / "no-such-folder")]):
        assert main([*args, "--onnx", str(out), "--mode", "int8", *calib]) == 2
        assert capsys.readouterr().err.startswith("pixelwise: error: --mode int8 does not apply to an ONNX file")
    bench_json = tmp_path / "bench.json"
    assert main(["bench", "--onnx", str(out), "--size", "32x48", "--repeats", "1", "--json", str(bench_json)]) == 0
    result = json.loads(bench_json.read_text())
    assert result["mode"] == "onnx" and result["ms_per_img"] > 0


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format"),
    (["--checkpoint", "/nonexistent/x.safetensors"], "nonexistent"),
    (["--out", "TMP/file/m.onnx"], "is a file, not a folder"),  # a folder that is a file: unwritable even as root
    (["--out", "TMP/m.txt"], ".onnx"),
    (["--model", "unet3000"], "unknown model"),
    (["--model", "unet", "--num-classes", "0"], "--num-classes must be at least 1, got 0"),  # was silently 21
    (["--model", "unet", "--num-classes", "-2"], "--num-classes must be at least 1, got -2"),  # was a traceback
    (["--min-agreement", "1.5"], "--min-agreement must be a fraction in (0, 1], got 1.5"),  # was after the export
    (["--min-agreement", "-1"], "--min-agreement must be a fraction in (0, 1], got -1.0"),  # was no verification
    (["--min-agreement", "nan"], "--min-agreement must be a fraction in (0, 1], got nan"),
    (["--min-agreement", "0"], "--min-agreement must be a fraction in (0, 1], got 0.0"),  # was the default
    (["--model", "maskrcnn_resnet18_fpn", "--num-classes", "3", "--int8", "--calib-dataset", "shapes"],
     "--int8 applies to semantic models only"),  # was ignored: float32 files, exit 0
    (["--model", "maskrcnn_resnet18_fpn", "--num-classes", "3", "--fp16"], "--fp16 applies to semantic models only"),
    (["--calib-dataset", "shapes"], "add --int8"),
])
def test_cli_export_bad_input_is_one_line_exit_2(checkpoint, tmp_path, capsys, args, message):
    """Refused before any work: one line, exit 2, nothing written."""
    (tmp_path / "file").write_text("")
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    base = {"--checkpoint": str(checkpoint), "--format": "onnx", "--out": str(tmp_path / "m.onnx")}
    for flag in ("--checkpoint", "--format", "--out"):
        if flag in args or (flag == "--checkpoint" and "--model" in args):
            base.pop(flag)
    assert main(["export", *[x for kv in base.items() for x in kv], *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err and message in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file", "unet.safetensors"]


def test_predict_onnx_missing_file_is_one_line(tmp_path, capsys):
    assert main(["predict", "x.png", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "no such ONNX file" in err


def test_maskrcnn_exports_backbone_rpn_and_heads(tmp_path, capsys, monkeypatch):
    from pixelwise.inference import export

    checked = []
    real = export.check_onnx_file
    monkeypatch.setattr(export, "check_onnx_file", lambda path, opset, what: checked.append(what) or real(
        path, opset, what))
    torch.manual_seed(0)
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = export.export_maskrcnn_parts(model, tmp_path / "m.onnx",
                                               {"model": "maskrcnn_resnet18_fpn", "num_classes": 3},
                                               sizes=[(1, 96, 128), (2, 64, 160)], rois=[2, 5])
    # the tracer's warnings about sizes are the export's own business (the verification is what counts)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught][:3]
    assert [r.path for r in reports] == [str(tmp_path / "m.onnx"), str(tmp_path / "m_heads.onnx")]
    for report in reports:
        assert all(c.agreement >= 0.999 for c in report.checks)
    assert read_onnx_metadata(reports[1].path)["onnx"]["outputs"] == ["class_logits", "box_deltas", "mask_logits"]
    # the backbone file's outputs, as docs/deploy.md lists them
    rpn = [f"{name}_{k}" for name in ("fpn", "objectness", "rpn_deltas") for k in range(5)]
    assert read_onnx_metadata(reports[0].path)["onnx"]["outputs"] == rpn
    assert [o.name for o in onnx.load(reports[0].path).graph.output] == rpn
    for report in reports:  # the parts' own input: normalised (no model.transform in them), resized, padded to 32
        assert read_onnx_metadata(report.path)["input"] == {
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "normalize": True, "resize": None,
            "channels": 3, "min_size": 800, "max_size": 1333, "size_divisible": 32}
    assert checked == ["Mask R-CNN's backbone_rpn", "Mask R-CNN's roi_heads"]
    with pytest.raises(UserError, match="holds part of an instance model"):
        load_onnx(reports[0].path)  # not a semantic model: predict --onnx refuses it
    # each report says what its agreement counts; each file records its part, opset, precision and the graph's
    # own input names
    assert [r.agreement_of for r in reports] == ["RPN objectness sign", "RoI class argmax"]
    for report, part in zip(reports, ("backbone_rpn", "roi_heads")):
        stored, graph = read_onnx_metadata(report.path)["onnx"], onnx.load(report.path).graph
        assert (stored["part"], stored["opset"], stored["precision"]) == (part, 17, "float32")
        assert stored["inputs"] == [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    assert read_onnx_metadata(reports[0].path)["onnx"]["inputs"] == ["image"]


def test_cli_int8_export_calibrates_and_reports_agreement(checkpoint, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--int8", "--calib-dataset", "shapes",
                 "--calib-images", "8", "--calib-crop", "48", "--min-agreement", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "argmax agreement" in printed
    model, meta = load_onnx(out)
    assert meta["onnx"]["precision"] == "int8"
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, CLASSES, 48, 64)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.onnx"), "--int8"]) == 2
    assert "--calib-dataset" in capsys.readouterr().err


# --------------------------------------------------------------------------- Mask R-CNN's second file


def save_maskrcnn(path) -> None:
    torch.manual_seed(0)
    save_checkpoint(path, create_model("maskrcnn_resnet18_fpn", num_classes=3),
                    {"model": "maskrcnn_resnet18_fpn", "num_classes": 3})


def test_cli_maskrcnn_export_keeps_an_existing_heads_file(tmp_path, capsys):
    out, heads = tmp_path / "m.onnx", tmp_path / "m_heads.onnx"
    heads.write_text("my precious notes")
    assert main(["export", "--model", "maskrcnn_resnet18_fpn", "--num-classes", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pixelwise: error: --out {out} would also write {heads}, which exists; pass --overwrite to "
                   "replace it")
    assert heads.read_text() == "my precious notes" and not out.exists()


def test_cli_maskrcnn_export_never_writes_its_heads_over_the_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "m_heads.onnx"  # a checkpoint is known by its contents, whatever its name
    save_maskrcnn(checkpoint)
    before = checkpoint.read_bytes()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err and "over the input" in err
    assert checkpoint.read_bytes() == before and not (tmp_path / "m.onnx").exists()


def test_maskrcnn_export_writes_neither_file_when_one_fails(tmp_path, monkeypatch):
    """The backbone verifies, the heads do not: both files keep what they held (no half export)."""
    import dataclasses

    from pixelwise.inference import export

    real = export._check_parts

    def heads_disagree(module, session, inputs, sign):
        check = real(module, session, inputs, sign)
        return check if sign else dataclasses.replace(check, agreement=0.5)

    monkeypatch.setattr(export, "_check_parts", heads_disagree)
    for name in ("m.onnx", "m_heads.onnx"):
        (tmp_path / name).write_text(name)
    torch.manual_seed(0)
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3).eval()
    with pytest.raises(UserError, match="roi_heads.*nothing written"):
        export.export_maskrcnn_parts(model, tmp_path / "m.onnx", sizes=[(1, 64, 96)], rois=[2])
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == {"m.onnx": "m.onnx", "m_heads.onnx": "m_heads.onnx"}


# --------------------------------------------------------------------------- tiling geometry


def test_onnx_tiles_as_the_checkpoint(tmp_path, capsys):
    """The export stores the model's context and alignment, so ``--onnx --tile`` cuts the tiles the
    checkpoint gets: for the valid U-Net, tiled = untiled, in ONNX as in PyTorch. A file without
    them (exported before they were stored) still runs, tiled as a model that states neither."""
    import onnx

    from pixelwise.inference.predictor import Predictor

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "padding": "valid"}
    model = create_model("unet", num_classes=3, **kwargs)
    with torch.no_grad():  # a spread of classes rather than one class everywhere
        model.head.weight.mul_(8.0)
    checkpoint, out = tmp_path / "unetv.safetensors", tmp_path / "unetv.onnx"
    save_checkpoint(checkpoint, model, {"model": "unet", "num_classes": 3, "model_kwargs": kwargs})
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_onnx_metadata(out)["geometry"] == {"context": 92, "alignment": 16}
    image = (np.random.default_rng(1).random((173, 251, 3)) * 255).astype(np.uint8)  # odd sizes, several tiles
    whole = Predictor.from_checkpoint(checkpoint).predict(image).mask
    assert len(np.unique(whole)) >= 2, "degenerate prediction"
    masks = {}
    for path in (checkpoint, out):
        predictor = Predictor.from_checkpoint(path, tile=64)
        assert (predictor.context, predictor.alignment, predictor.overlap) == (92, 16, 0.0)
        assert predictor.needs_tiles(image)
        masks[path] = predictor.predict(image).mask
    np.testing.assert_array_equal(masks[checkpoint], whole)
    untiled = (Predictor.from_checkpoint(out).predict(image).mask == whole).mean()
    assert untiled >= 0.999 and (masks[out] == masks[checkpoint]).mean() >= untiled  # was 0.73

    old = onnx.load(str(out))  # as exported before: no geometry
    props = {p.key: p.value for p in old.metadata_props if p.key != "pixelwise.geometry"}
    props["pixelwise"] = json.dumps({k: v for k, v in json.loads(props["pixelwise"]).items() if k != "geometry"})
    del old.metadata_props[:]
    for key, value in props.items():
        old.metadata_props.add(key=key, value=value)
    onnx.save(old, str(tmp_path / "old.onnx"))
    predictor = Predictor.from_checkpoint(tmp_path / "old.onnx", tile=64)
    assert (predictor.context, predictor.alignment, predictor.overlap) == (0, 1, 0.25)
    assert predictor.predict(image).mask.shape == image.shape[:2]

    props["pixelwise"] = json.dumps({**json.loads(props["pixelwise"]), "geometry": {"context": -1}})
    del old.metadata_props[:]
    for key, value in props.items():
        old.metadata_props.add(key=key, value=value)
    onnx.save(old, str(tmp_path / "damaged.onnx"))
    with pytest.raises(UserError, match="damaged"):
        load_onnx(tmp_path / "damaged.onnx")


# --------------------------------------------------------------------------- valid ONNX, opsets, messages


def test_fp16_file_is_valid_onnx(tmp_path):
    """The float16 converter appends the input Cast after its readers: the file is sorted again, so
    the checker and the ONNX reference runtime (not only onnxruntime, which re-sorts) accept it."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model, meta = build("unet")
    report = export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES, fp16=True, min_agreement=0.98)
    onnx.checker.check_model(onnx.load(report.path), full_check=True)  # was: nodes not topologically sorted
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 48)).astype(np.float32)
    logits = ReferenceEvaluator(report.path).run(None, {"image": x})[0]
    assert logits.shape == (1, CLASSES, 32, 48) and np.isfinite(logits).all()


def test_sort_graph_puts_producers_first_and_keeps_a_sorted_order():
    from onnx import TensorProto, helper

    from pixelwise.inference.export import sort_graph

    nodes = [helper.make_node("Relu", ["b"], ["c"], name="n2"), helper.make_node("Neg", ["c"], ["d"], name="n3"),
             helper.make_node("Identity", ["x"], ["a"], name="n0"), helper.make_node("Abs", ["a"], ["b"], name="n1"),
             helper.make_node("Sigmoid", ["x"], ["e"], name="free")]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [2])],
                              [value("d", TensorProto.FLOAT, [2]), value("e", TensorProto.FLOAT, [2])])
    sort_graph(graph)
    assert [n.name for n in graph.node] == ["n0", "n1", "n2", "n3", "free"]
    sort_graph(graph)  # already sorted: unchanged
    assert [n.name for n in graph.node] == ["n0", "n1", "n2", "n3", "free"]


def test_export_checks_every_file_before_writing_it(tmp_path, monkeypatch):
    """onnx.checker runs on every file export writes; an invalid one (here: fp16 left unsorted) is
    refused with one line and nothing written."""
    from pixelwise.inference import export

    model, meta = build("unet")
    monkeypatch.setattr(export, "sort_graph", lambda graph: None)
    with pytest.raises(UserError, match=r"float16 export at opset 17 is not valid ONNX \(.*topologically.*nothing"):
        export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES, fp16=True, min_agreement=0.98)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()

    checked = []
    real = export.check_onnx_file
    monkeypatch.setattr(export, "check_onnx_file", lambda path, opset, what: checked.append(what) or real(
        path, opset, what))
    export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES[:1])
    export_onnx(model, tmp_path / "i8.onnx", meta, sizes=SIZES[:1], calibration=[torch.randn(1, 3, 64, 80)],
                min_agreement=0.0, opset=13)
    assert checked == ["the float32 export", "the int8 export"]


def test_unet_same_padding_exports_at_opset_11(tmp_path):
    """pad_same's last-index clamp is a Where, not an int64 Clip (which needs opset 12)."""
    for name in ("unet", "unet_global_context"):
        model, meta = build(name)
        report = export_onnx(model, tmp_path / f"{name}.onnx", meta, sizes=SIZES, opset=11)
        assert min(c.agreement for c in report.checks) >= 0.999
        onnx_model, _ = load_onnx(report.path)
        x = torch.randn(1, 3, 37, 50)
        with torch.no_grad():
            torch.testing.assert_close(onnx_model(x), forward_logits(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("h, w, bottom, right", [(5, 7, 3, 1), (5, 7, 6, 2), (1, 4, 0, 3), (9, 3, 4, 0), (2, 2, 1, 1)])
def test_pad_same_is_reflect_or_replicate_exactly(h, w, bottom, right):
    import torch.nn.functional as F

    from pixelwise.models.unet import pad_same

    x = torch.randn(2, 3, h, w)
    mode = "reflect" if min(h, w) > max(bottom, right) else "replicate"
    assert torch.equal(pad_same(x, bottom, right), F.pad(x, (0, right, 0, bottom), mode=mode))


def test_an_export_onnxruntime_cannot_load_names_the_opset_not_a_temporary_file(tmp_path):
    class IntClip(nn.Module):  # an int64 Clip: opset 12 and newer
        def forward(self, x):
            i = torch.arange(x.shape[-1] + 2)
            return x.index_select(-1, torch.clamp(i, max=x.shape[-1] - 1))[..., : x.shape[-1]]

    with pytest.raises(UserError) as info:
        export_onnx(IntClip(), tmp_path / "m.onnx", {"model": "clip", "num_classes": 3}, sizes=SIZES, opset=11)
    message = str(info.value)
    assert "opset 11" in message and "a newer --opset (up to" in message and ".tmp" not in message
    assert "nothing written" in message and "\n" not in message and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- dropout, --uncertainty


def test_predict_onnx_refuses_uncertainty_for_a_model_with_dropout(checkpoint, tmp_path, capsys):
    """The export traces without dropout: predict --onnx cannot give the model's Monte-Carlo
    dropout mask and uncertainty, so it says so (before, it gave another mask without a word)."""
    from PIL import Image

    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_onnx_metadata(out)["onnx"]["dropout"] is True
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    args = ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "pred"), "--no-progress", "--onnx", str(out)]
    capsys.readouterr()
    assert main([*args, "--uncertainty"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: --uncertainty: ") and "\n" not in err
    assert "no Monte-Carlo dropout" in err and "give the --checkpoint" in err
    assert main([*args, "--uncertainty", "--mc-samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "an ONNX export has none" in err and "unet has none" not in err and "\n" not in err
    assert not (tmp_path / "pred").exists()


def test_predict_onnx_uncertainty_of_a_model_without_dropout_is_its_entropy(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "dropout": 0.0}
    checkpoint, out = tmp_path / "u.safetensors", tmp_path / "u.onnx"
    save_checkpoint(checkpoint, create_model("unet", num_classes=3, **kwargs),
                    {"model": "unet", "num_classes": 3, "model_kwargs": kwargs})
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_onnx_metadata(out)["onnx"]["dropout"] is False
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    for flag, path in (("--onnx", out), ("--checkpoint", checkpoint)):
        assert main(["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / flag[2:]), "--no-progress",
                     flag, str(path), "--uncertainty"]) == 0
    maps = [np.asarray(Image.open(tmp_path / d / "a_uncertainty.png")).astype(int) for d in ("onnx", "checkpoint")]
    assert np.abs(maps[0] - maps[1]).max() <= 1


# --------------------------------------------------------------------------- the documented pre/post-processing


def docs_predictor(path, image: np.ndarray) -> np.ndarray:
    """predict's mask written from docs/deploy.md and the file's metadata alone: numpy, OpenCV and
    onnxruntime, no pixelwise."""
    import onnx
    import onnxruntime as ort

    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["pixelwise"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return docs_mask(meta["input"], image, lambda x: session.run(None, {"image": x})[0][0])


@pytest.mark.parametrize("channels", [3, 1])
def test_a_predictor_written_from_the_docs_equals_predict_onnx(tmp_path, capsys, channels):
    from PIL import Image

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "in_channels": channels}
    model = create_model("unet", num_classes=4, **kwargs)
    with torch.no_grad():  # a spread of classes, with edges between them
        model.head.weight.mul_(8.0)
    mean, std = ([0.45, 0.4, 0.35], [0.2, 0.25, 0.3]) if channels == 3 else ([0.3], [0.2])
    checkpoint, out = tmp_path / "u.safetensors", tmp_path / "u.onnx"
    save_checkpoint(checkpoint, model, {"model": "unet", "num_classes": 4, "model_kwargs": kwargs,
                                        "input": {"mean": mean, "std": std, "resize": [37, 53], "channels": channels}})
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    names = docs_images(tmp_path)  # down, up, mixed and the contract's size
    assert main(["predict", *[str(tmp_path / f"{n}.png") for n in names], "--out", str(tmp_path / "pred"),
                 "--no-progress", "--onnx", str(out)]) == 0
    for name in names:
        image = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"))
        assert len(np.unique(mask)) >= 2, "degenerate prediction"
        np.testing.assert_array_equal(docs_predictor(out, image), mask)


# --------------------------------------------------------------------------- folders, --checkpoint FILE.onnx


def test_a_refused_export_leaves_no_new_folder(tmp_path):
    from pixelwise.checkpoint import atomic_write

    model, meta = build("segnet_basic")
    with pytest.raises(UserError, match="nothing written"):
        export_onnx(model, tmp_path / "new" / "sub" / "m.onnx", meta, sizes=SIZES[:1], min_agreement=1.01)
    assert not list(tmp_path.iterdir())  # was: new/sub left behind
    (tmp_path / "mine").mkdir()  # a folder that was there stays, and so does one that is not empty
    (tmp_path / "mine" / "other").mkdir()

    def fail(tmp: str) -> None:
        raise OSError("disk full")

    for target in (tmp_path / "mine" / "a" / "b" / "x.txt", tmp_path / "mine" / "other" / "c" / "x.txt"):
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, fail)
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*")) == ["other"]
    atomic_write(tmp_path / "mine" / "d" / "x.txt", lambda tmp: Path(tmp).write_text("ok"))  # success keeps it
    assert (tmp_path / "mine" / "d" / "x.txt").read_text() == "ok"


def test_cli_export_of_an_onnx_file_says_so(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    renamed = tmp_path / "m.safetensors"  # known by its contents too
    renamed.write_bytes(out.read_bytes())
    for given in (out, renamed):
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(given), "--out", str(tmp_path / "again.onnx")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"pixelwise: error: {given} is an ONNX file (already exported); export takes a .safetensors "
                       "checkpoint")
    assert not (tmp_path / "again.onnx").exists()


def _edited(src, dst, edit):
    """A copy of the exported ``src`` whose pixelwise metadata ``edit`` (a dict -> a JSON text) rewrote."""
    model = onnx.load(str(src))
    prop = {p.key: p for p in model.metadata_props}["pixelwise"]
    prop.value = edit(json.loads(prop.value))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize(("edit", "words"), [
    (lambda m: "{bad", "pixelwise metadata is not a JSON object"),
    (lambda m: json.dumps({**m, "input": None}), "input contract must be an object"),
    (lambda m: json.dumps({**m, "palette": [[1, 2]]}), "palette must be a list of [r, g, b] colours"),
    (lambda m: json.dumps({**m, "input": {**m["input"], "channels": 1, "mean": [0.5], "std": [0.2]}}),
     "input contract gives 1 channel(s), and the graph takes 3"),
    (lambda m: json.dumps({**m, "num_classes": 3, "class_names": ["a", "b", "c"]}),
     f"num_classes is 3, and the graph gives {CLASSES} class scores"),
    (lambda m: json.dumps({**m, "class_names": ["a"]}),
     f"class_names must list a name (text) for each of the {CLASSES}"),
    (lambda m: json.dumps({**{k: v for k, v in m.items() if k != "input"}, "mean": "x"}),  # an older file's layout
     "the file's mean is 'x', not a list of one number per channel"),
])
def test_damaged_metadata_in_an_onnx_file_is_one_line(checkpoint, tmp_path, capsys, edit, words):
    """Such edits were tracebacks (JSONDecodeError, AttributeError, ValueError, onnxruntime's
    INVALID_ARGUMENT) or were taken silently (a class count the graph does not give)."""
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    bad = _edited(out, tmp_path / "bad.onnx", edit)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["predict", "--onnx", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pixelwise: error: {bad}: ") and words in err and "\n" not in err, err


def test_a_graph_fixed_to_another_size_than_the_contracts_resize_is_refused_at_load(checkpoint, tmp_path, capsys):
    """A graph whose input is fixed to one height and width (an edited or hand-made file: pixelwise
    exports dynamic ones) and a contract that resizes to another size: every image failed inside
    onnxruntime, named only at the first image after the load. One of the contract's size runs."""
    out = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "a.png")
    for resize, fits in (([20, 24], False), ([16, 16], True)):
        model = onnx.load(str(out))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value, dims[3].dim_value = 16, 16
        prop = {p.key: p for p in model.metadata_props}["pixelwise"]
        meta = json.loads(prop.value)
        prop.value = json.dumps({**meta, "input": {**meta["input"], "resize": resize}})
        fixed = tmp_path / f"fixed{resize[0]}.onnx"
        onnx.save(model, str(fixed))
        capsys.readouterr()
        code = main(["predict", "--onnx", str(fixed), str(tmp_path / "a.png"), "--out", str(tmp_path / f"p{resize[0]}"),
                     "--no-progress"])
        err = capsys.readouterr().err.strip()
        if fits:
            assert code == 0, err
        else:
            assert code == 2 and err == (f"pixelwise: error: {fixed}: the stored input contract resizes images to "
                                         "24x20, and the graph takes only 16x16 inputs; the file is damaged: export "
                                         "it again with `pixelwise export`"), err


def test_a_checkpoint_with_a_null_input_contract_is_one_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, create_model("unet", num_classes=2, base_channels=4),
                    {"model": "unet", "num_classes": 2, "model_kwargs": {"base_channels": 4}})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata["pixelwise"])
    save_file(load_file(str(path)), str(path), {**metadata, "pixelwise": json.dumps({**meta, "input": None})})
    with pytest.raises(UserError, match="the checkpoint's input contract must be an object"):
        Predictor.from_checkpoint(path)


@pytest.mark.parametrize("verb", ["predict", "eval", "bench"])
def test_onnx_given_twice_is_refused(tmp_path, capsys, verb):
    """Only the last --onnx ran, as if the first had not been given (repeating --checkpoint is an ensemble)."""
    assert main([verb, "--onnx", "a.onnx", "--onnx", "b.onnx", "x.png", "--out", str(tmp_path / "o")]
                if verb == "predict" else [verb, "--onnx", "a.onnx", "--onnx", "b.onnx"]) == 2
    assert "--onnx: given twice" in capsys.readouterr().err


def test_an_onnx_entry_that_is_not_an_object_is_damage_not_a_traceback(checkpoint, tmp_path, capsys):
    """bench read meta["onnx"].get(...): AttributeError on a file whose entry was a string."""
    import onnx

    path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(path)]) == 0
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == "pixelwise")
    prop.value = json.dumps({**json.loads(prop.value), "onnx": "x"})
    onnx.save(model, str(path))
    capsys.readouterr()
    for verb in (["bench", "--onnx", str(path), "--size", "32x32"],
                 ["predict", "--onnx", str(path), str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o")]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert "onnx entry is 'x', not an object; the file is damaged" in err and len(err.splitlines()) == 1, err


def test_a_model_with_nan_weights_fails_verification(tmp_path):
    """NaN logits agreed '100%' with onnxruntime's NaN logits: the export verified a broken model."""
    model, meta = build("unet")
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    with pytest.raises(UserError, match="holds NaN or infinite values .* nothing written"):
        export_onnx(model, tmp_path / "m.onnx", meta, sizes=SIZES)
    assert not (tmp_path / "m.onnx").exists()


def test_is_onnx_reads_the_suffix_in_any_case():
    assert is_onnx("model.onnx") and is_onnx("MODEL.ONNX") and not is_onnx("model.onnx.safetensors")


def test_exported_dropout_is_the_stored_bool_or_none():
    assert exported_dropout({"onnx": {"dropout": True}}) is True
    assert exported_dropout({"onnx": {"dropout": False}}) is False
    assert exported_dropout({"onnx": {"dropout": 1}}) is None  # not a bool: not recorded
    assert exported_dropout({"onnx": None}) is None and exported_dropout({}) is None


def test_stored_geometry_takes_the_least_valid_values_and_refuses_below_them():
    assert stored_geometry("m.onnx", {}) == (0, 1)  # a file of before pixelwise stored it
    assert stored_geometry("m.onnx", {"geometry": {"context": 0, "alignment": 1}}) == (0, 1)
    assert stored_geometry("m.onnx", {"geometry": {"context": 5, "alignment": 8}}) == (5, 8)
    assert stored_geometry("m.onnx", {"geometry": {"alignment": 4}}) == (0, 4)
    for bad in ({"context": -1, "alignment": 1}, {"context": 0, "alignment": 0}, {"context": 0.5}, "16"):
        with pytest.raises(UserError, match="m.onnx: its stored tiling geometry .* is not a context >= 0"):
            stored_geometry("m.onnx", {"geometry": bad})


def test_a_session_named_by_the_caller_calls_its_file_the_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(UserError) as named:
        make_session(path, name="the export at opset 11")
    assert str(named.value).startswith("onnxruntime cannot load the export at opset 11: ")
    assert "from the file failed" in str(named.value) and str(path) not in str(named.value)
    with pytest.raises(UserError, match="cannot load .*m.onnx: "):
        make_session(path)  # unnamed: its path


def test_reading_onnx_metadata_without_the_onnx_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # its import fails as where it is not installed
    with pytest.raises(UserError, match=r"reading ONNX files needs onnx: pip install -e '.\[export\]'"):
        read_onnx_metadata(tmp_path / "m.onnx")


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_export_without_the_export_extra_says_how_to_install_it_before_any_work(monkeypatch, tmp_path, capsys,
                                                                                missing):
    from pixelwise.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # its import fails as where it is not installed
    model = create_model("unet", num_classes=2, base_channels=4).eval()
    for export in (lambda: export_onnx(model, tmp_path / "a.onnx"),
                   lambda: export_maskrcnn_parts(None, tmp_path / "b.onnx")):  # refused before the model is read
        with pytest.raises(UserError, match=rf"needs onnx.*{missing} is not installed.*pip install -e '.\[export\]'"
                           if missing == "onnx" else r"needs onnxruntime: pip install -e '.\[export\]'"):
            export()
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", "--model", "unet", "--num-classes", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixelwise: error: ") and err.count("\n") == 1 and "pip install -e '.[export]'" in err
    assert "--opset" not in err and not out.parent.exists()


def test_verification_sizes_are_the_contract_and_a_second_odd_one_of_at_least_33_rows():
    """(1, H, W) of the contract (else 256 x 320), then batch 2 at 3H/4 + 5 (at least 33) x 5W/4 + 3."""
    def contract(resize):
        return {"input": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": resize}}

    assert verification_sizes(None) == verification_sizes(contract(None)) == [(1, 256, 320), (2, 197, 403)]
    assert verification_sizes(contract([64, 48])) == [(1, 64, 48), (2, 53, 63)]
    # a small contract: 3 * 24 // 4 + 5 = 23 rows would be below the floor of 33
    assert verification_sizes(contract([24, 32])) == [(1, 24, 32), (2, 33, 43)]


class _FakeSession:
    """What _check_parts reads of an onnxruntime session: the input names, and run()."""

    def __init__(self, names, outputs):
        self.names, self.outputs = names, outputs

    def get_inputs(self):
        return [type("Input", (), {"name": n})() for n in self.names]

    def run(self, _, feed):
        assert sorted(feed) == sorted(self.names)
        return [o.numpy() for o in self.outputs]


def test_maskrcnn_backbone_agreement_counts_the_objectness_signs_only():
    """Of the backbone part's 15 outputs (5 FPN levels, 5 objectness maps, 5 box deltas) only the
    objectness maps count: the levels and deltas all flipped, one objectness map half flipped, 4 of
    its 8 logits disagree in sign out of 40, 90%."""
    reference = [torch.ones(1, 2, 2, 2) for _ in range(15)]
    reference[6] = torch.zeros(1, 2, 2, 2)  # zero on both sides: the same sign (none)
    got = [-r if k < 5 or k >= 10 else r.clone() for k, r in enumerate(reference)]
    got[5].view(-1)[:4] = -1.0

    class Outputs(nn.Module):
        def forward(self, x):
            return tuple(reference)

    x = torch.zeros(1, 3, 32, 32)
    check = export_module._check_parts(Outputs(), _FakeSession(["image"], got), [x], sign=True)
    assert check.agreement == pytest.approx(36 / 40)
    assert (check.shape, check.max_abs_diff, check.max_abs_logit) == ((1, 3, 32, 32), 2.0, 1.0)


def test_maskrcnn_export_bounds_are_inclusive_and_1e_3_at_least(tmp_path, monkeypatch):
    """A part passes at an agreement equal to min_agreement, and with a difference up to 1e-3 of
    its largest output but never less than 1e-3: outputs of at most 0.5 may differ by 6e-4."""
    import dataclasses

    real = export_module._check_parts

    def small(module, session, inputs, sign):
        return dataclasses.replace(real(module, session, inputs, sign), agreement=0.75, max_abs_logit=0.5,
                                   max_abs_diff=6e-4)

    monkeypatch.setattr(export_module, "_check_parts", small)
    torch.manual_seed(0)
    model = create_model("maskrcnn_resnet18_fpn", num_classes=3).eval()
    reports = export_module.export_maskrcnn_parts(model, tmp_path / "m.onnx", sizes=[(1, 64, 96)], rois=[2],
                                                  min_agreement=0.75)
    assert [(c.agreement, c.max_abs_diff) for r in reports for c in r.checks] == [(0.75, 6e-4), (0.75, 6e-4)]


def test_export_onnx_replaces_an_existing_file_by_default(tmp_path):
    """replace=True is the default: a second export to the same path replaces the first."""
    torch.manual_seed(0)
    out = tmp_path / "m.onnx"
    export_onnx(nn.Conv2d(3, 2, 1), out, sizes=[(1, 8, 8)])
    export_onnx(nn.Conv2d(3, 4, 1), out, sizes=[(1, 8, 8)])
    assert read_onnx_metadata(out)["num_classes"] == 4 and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_sort_graph_reads_the_outer_values_of_a_list_of_subgraphs():
    """A node whose attribute is a list of graphs (type GRAPHS) reads what its subgraphs read from
    outside: it goes after their producer, and the subgraphs are sorted too."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    body = helper.make_graph([helper.make_node("Neg", ["t"], ["u"], name="s1"),
                              helper.make_node("Abs", ["a"], ["t"], name="s0")],  # reads the outer "a"
                             "body", [], [value("u", TensorProto.FLOAT, [2])])
    holder = helper.make_node("Holder", [], ["y"], name="holder", domain="test", bodies=[body])
    assert holder.attribute[0].type == onnx.AttributeProto.GRAPHS
    graph = helper.make_graph([holder, helper.make_node("Identity", ["x"], ["a"], name="producer")], "g",
                              [value("x", TensorProto.FLOAT, [2])], [value("y", TensorProto.FLOAT, [2])])
    sort_graph(graph)
    assert [n.name for n in graph.node] == ["producer", "holder"]
    assert [n.name for n in graph.node[1].attribute[0].graphs[0].node] == ["s0", "s1"]


def test_verify_feeds_three_channels_by_default_and_batches_smaller_than_8_pixels():
    """verify's default is an RGB batch; sample_batch makes one for any size, under 8 pixels too
    (its coarse noise is at least 1 x 1)."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 2, 1).eval()
    with torch.no_grad():
        checks = verify(model, model, [(1, 5, 7), (2, 9, 3)])  # the exported model: here the model itself
    assert [c.shape for c in checks] == [(1, 3, 5, 7), (2, 3, 9, 3)]
    assert all(c.agreement == 1.0 and c.max_abs_diff == 0.0 and c.classes == 2 for c in checks)
    x = sample_batch(2, 1, 3, 20, seed=4)
    assert x.shape == (2, 1, 3, 20) and bool(torch.isfinite(x).all())
    # the docstring's recipe: noise at 1/8 resolution (here 2 x 3), upsampled bilinearly, plus 0.2 fine noise
    g = torch.Generator().manual_seed(3)
    coarse = torch.nn.functional.interpolate(torch.randn(1, 3, 2, 3, generator=g), size=(16, 24), mode="bilinear",
                                             align_corners=False)
    torch.testing.assert_close(sample_batch(1, 3, 16, 24, seed=3), coarse + 0.2 * torch.randn(1, 3, 16, 24,
                                                                                                generator=g))


def test_onnx_metadata_of_a_bare_model_is_written_out():
    """Without a checkpoint's metadata: the model name given, task semantic, the default input
    contract, the model's geometry, the version that wrote it, and the export's own entries."""
    torch.manual_seed(0)
    got = onnx_metadata(None, "Conv2d", {"opset": 17}, nn.Conv2d(3, 2, 1))
    assert got == {"model": "Conv2d", "task": "semantic",
                   "input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "normalize": True,
                             "resize": None, "channels": 3},
                   "geometry": {"context": 0, "alignment": 1}, "pixelwise_version": __version__,
                   "onnx": {"opset": 17}}


def test_maskrcnn_heads_file_is_not_overwritten_unless_asked(tmp_path):
    """check_maskrcnn_outputs refuses an existing heads file by default, not with overwrite=True."""
    (tmp_path / "m_heads.onnx").write_text("notes")
    with pytest.raises(UserError, match="m_heads.onnx, which exists; pass --overwrite"):
        check_maskrcnn_outputs(tmp_path / "m.onnx")
    check_maskrcnn_outputs(tmp_path / "m.onnx", overwrite=True)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, CLASSES, 1)

    def forward(self, x, y=None):
        return self.c(x) if y is None else self.c(x) + self.c(y)


class _Scores(_Conv):  # [N, classes]: a classifier's output
    def forward(self, x):
        return self.c(x).mean((2, 3))


@pytest.mark.parametrize(("module", "inputs", "fixed", "words"), [
    (_Conv(), 2, False, "the graph takes 2 inputs (x, y), not one image batch"),
    (_Conv().half(), 1, False, "input x is a tensor(float16)"),
    (_Scores(), 1, False, "not float [N, classes, H, W] scores"),
    # fixed to 64x64 and the contract resizes to 48x64: refused on loading (was onnxruntime's at the first image)
    (_Conv(), 1, True, "the stored input contract resizes images to 64x48, and the graph takes only 64x64 inputs"),
])
def test_a_foreign_graph_with_pixelwise_metadata_is_one_line(checkpoint, tmp_path, capsys, module, inputs, fixed,
                                                             words):
    """An ONNX file pixelwise did not write, given an export's metadata: two inputs, a float16 input,
    an [N, C] output, a fixed size other than the image's were onnxruntime tracebacks
    (ValueError, InvalidArgument) in predict and bench, or torch's interpolate ValueError."""
    good = tmp_path / "unet.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(good)]) == 0
    names = ["x", "y"][:inputs]
    x = torch.zeros(1, 3, 64, 64, dtype=torch.float16 if words.endswith("float16)") else torch.float32)
    bad = tmp_path / "foreign.onnx"
    torch.onnx.export(module, (x,) * inputs, str(bad), input_names=names, output_names=["out"], opset_version=17,
                      dynamic_axes=None if fixed else {n: {0: "n", 2: "h", 3: "w"} for n in names}, dynamo=False)
    graph = onnx.load(str(bad))
    graph.metadata_props.add(key="pixelwise", value={p.key: p.value for p in onnx.load(str(good)).metadata_props}[
        "pixelwise"])
    onnx.save(graph, str(bad))
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "a.png")
    capsys.readouterr()
    for verb in (["predict", "--onnx", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / "p"),
                  "--no-progress"], ["bench", "--onnx", str(bad), "--size", "32x32"]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pixelwise: error: ") and words in err and "\n" not in err, err


class _FailingSession:
    """An onnxruntime session stand-in whose run raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def run(self, outputs, feed):
        raise self.error


def test_onnx_model_forward_makes_onnxruntimes_errors_one_line_but_lets_memory_errors_through():
    """onnxruntime's InvalidArgument/Fail (any exception) is a UserError naming the file, the input's
    shape and the first line of onnxruntime's text (its type where it has none); a MemoryError stays
    one, for the CLI's own out-of-memory line."""
    x = torch.zeros(1, 3, 4, 5)
    model = OnnxModel(_FailingSession(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad dims\nmore")),
                      name="m.onnx")
    with pytest.raises(UserError) as refused:
        model(x)
    assert str(refused.value) == ("onnxruntime cannot run m.onnx on a [1, 3, 4, 5] input: [ONNXRuntimeError] : 2 : "
                                  "INVALID_ARGUMENT : bad dims")
    with pytest.raises(UserError, match=r"input: KeyError$"):
        OnnxModel(_FailingSession(KeyError()), name="m.onnx")(x)
    with pytest.raises(MemoryError):
        OnnxModel(_FailingSession(MemoryError()), name="m.onnx")(x)


def _session(inputs: list[tuple[str, list]], outputs: list[tuple[str, list]]):
    """An onnxruntime session stand-in of inputs and outputs (type, shape)."""
    def args(pairs):
        return [type("Arg", (), {"name": f"t{k}", "type": t, "shape": shape})() for k, (t, shape) in enumerate(pairs)]
    return type("Session", (), {"get_inputs": lambda self: args(inputs), "get_outputs": lambda self: args(outputs)})()


def test_graph_problem_takes_float16_scores_of_a_float32_input_and_nothing_else_of_another_type():
    """The checked contract: one float32 [N, C, H, W] input, a first output [N, classes, H, W] of
    float32 or float16 scores (forward reads either as float32); a float64 or int output is refused."""
    image = [("tensor(float)", ["n", 3, "h", "w"])]
    for scores in ("tensor(float)", "tensor(float16)"):
        assert graph_problem(_session(image, [(scores, ["n", 4, "h", "w"])])) is None
    for scores in ("tensor(double)", "tensor(int64)"):
        assert graph_problem(_session(image, [(scores, ["n", 4, "h", "w"])])) == (
            f"graph gives a {scores} of shape ['n', 4, 'h', 'w'], not float [N, classes, H, W] scores")
    assert graph_problem(_session(image, [])) == "graph gives nothing, not float [N, classes, H, W] scores"
    assert graph_problem(_session([("tensor(float)", ["n", 3])], [("tensor(float)", ["n", 4, "h", "w"])])) == (
        "graph's input t0 is a tensor(float) of shape ['n', 3], not a float32 [N, C, H, W] batch")


def test_export_report_times_the_export_and_sizes_the_file(tmp_path):
    """report.seconds is the export's own time (export + verification: no more than the call took)
    and report.bytes the written file's size; the metadata names the graph's own input and output."""
    torch.manual_seed(0)
    out = tmp_path / "m.onnx"
    began = time.perf_counter()
    report = export_onnx(nn.Conv2d(3, 2, 1), out, sizes=[(1, 8, 8)])
    took = time.perf_counter() - began
    assert 0 < report.seconds <= took and report.bytes == out.stat().st_size
    stored, graph = read_onnx_metadata(out)["onnx"], onnx.load(out).graph
    assert (stored["input_name"], stored["output_name"]) == (graph.input[0].name, graph.output[0].name)
    assert (stored["input_name"], stored["output_name"]) == ("image", "logits")


def test_onnx_metadata_keeps_the_checkpoints_model_name_over_the_fallback():
    """The checkpoint's own model name is stored; the name given is only the fallback of a bare model."""
    got = onnx_metadata({"model": "unet", "num_classes": 2}, "UNet", {})
    assert (got["model"], got["num_classes"]) == ("unet", 2)


def test_sample_batch_of_fewer_than_16_rows_is_one_coarse_value_per_channel_plus_fine_noise():
    """Under 16 pixels a side the coarse noise is 1 x 1 (size // 8, at least 1): the image is that
    value everywhere plus 0.2 fine noise."""
    g = torch.Generator().manual_seed(5)
    coarse = torch.randn(2, 3, 1, 1, generator=g)
    expected = coarse.expand(2, 3, 12, 9) + 0.2 * torch.randn(2, 3, 12, 9, generator=g)
    torch.testing.assert_close(sample_batch(2, 3, 12, 9, seed=5), expected)


def test_a_fresh_export_report_has_its_own_empty_checks():
    """ExportReport's checks default to a new empty list: a field (asdict has it), shared by no two reports."""
    from dataclasses import asdict

    from pixelwise.inference.export import ExportReport

    a, b = ExportReport("a.onnx", 17, "float32", 0.0, 0), ExportReport("b.onnx", 17, "float32", 0.0, 0)
    assert asdict(a) == {"path": "a.onnx", "opset": 17, "precision": "float32", "seconds": 0.0, "bytes": 0,
                         "checks": [], "agreement_of": "argmax", "runtime": "onnxruntime"}
    a.checks.append(None)
    assert b.checks == [] and b.summary().startswith("wrote b.onnx (0.0 MiB, opset 17, float32, 0.0 s)")
    # a .pt2's report: no opset, what ran it named
    pt2 = ExportReport("c.pt2", 0, "float32", 0.0, 0, runtime="torch.export")
    assert pt2.summary() == "wrote c.pt2 (0.0 MiB, float32, 0.0 s); torch.export vs PyTorch eager: "


def test_a_file_refused_at_a_newer_opset_than_the_default_suggests_an_older_opset_or_newer_readers():
    """onnxruntime 1.23 cannot run int8 at opset 23 (no QuantizeLinear(23)), onnx 1.15 cannot read
    opset 23: the refusal said what but offered nothing at the newest opset."""
    from pixelwise.inference.export import DEFAULT_OPSET, MAX_OPSET, _newer_opset_hint

    newest = _newer_opset_hint(MAX_OPSET)
    assert "a newer --opset" not in newest
    assert f"the installed onnx and onnxruntime may not read opset {MAX_OPSET} yet: give an older --opset (the " \
           f"default is {DEFAULT_OPSET}) or upgrade them (pip install -U onnx onnxruntime)" in newest
    assert _newer_opset_hint(DEFAULT_OPSET) == f"; a newer --opset (up to {MAX_OPSET}) may express it"
