"""torch.export archives (pixelwise.inference.export_pt2, ``pixelwise export --format pt2``): every
semantic model of ``pixelwise models``, narrowed so that the suite stays fast, either exports and then
runs like eager at sizes and batches it was never verified on, or is refused in one line with
nothing written; the metadata; the verification's two refusals; the CLI's flags."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
import torch.nn as nn

from conftest import narrow
from pixelwise import create_model, list_models, load_checkpoint, save_checkpoint
from pixelwise.cli import main
from pixelwise.errors import UserError
from pixelwise.inference.export_pt2 import META_FILE, export_pt2, pickled_payloads, read_pt2_metadata
from pixelwise.models import forward_logits

CLASSES = 4
SIZES = [(1, 48, 64), (2, 37, 75), (1, 263, 265)]  # (batch, H, W) of the verification: pt2_sizes' kinds, smaller
VARIANTS = {"unet_valid": ("unet", {"padding": "valid"}), "unet_global_context": ("unet", {"global_context": True}),
            "unet_input_norm": ("unet", {"input_norm": True})}
# torch.export (torch 2.13) cannot give DeconvNet one program for every size: its fc6 map is 1 pixel wide
# for every input up to 224 and wider above, and torch's contiguity checks make a program traced above
# assume > 1 (and one traced below, 1). docs/deploy.md says so; --format onnx exports it.
REFUSED = {"deconvnet"}


def build(name: str) -> tuple[nn.Module, dict]:
    base, kwargs = VARIANTS.get(name, (name, {}))
    torch.manual_seed(0)
    return narrow(create_model(base, num_classes=CLASSES, **kwargs)), {"model": base, "model_kwargs": kwargs,
                                                                       "num_classes": CLASSES}


def load(path) -> tuple[nn.Module, dict]:
    """What a PyTorch program without pixelwise does with the file (docs/deploy.md)."""
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[META_FILE])


# the default suite exports one of each kind of size arithmetic (U-Net's reflect padding both ways, SegNet's
# index unpooling, ENet's pooling and unpooling, DeepLabV3+'s atrous pyramid) and the refusal; the rest of
# the zoo, 5-16 s each, is slow
QUICK = {"unet", "unet_valid", "segnet_basic", "deeplabv3plus_resnet18", "enet", "deconvnet"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow)
                                  for n in [*list_models("semantic"), *VARIANTS]])
def test_every_semantic_model_exports_and_runs_like_eager_at_new_sizes(name, tmp_path):
    model, meta = build(name)
    path = tmp_path / f"{name}.pt2"
    if name in REFUSED:
        with pytest.raises(UserError, match=r"--format onnx exports it") as error:
            export_pt2(model, path, meta, model_name=meta["model"], sizes=SIZES)
        assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []
        return
    report = export_pt2(model, path, meta, model_name=meta["model"], sizes=SIZES)
    assert [c.shape for c in report.checks] == [(1, 3, 48, 64), (2, 3, 37, 75), (1, 3, 263, 265)]
    assert all(c.agreement == 1.0 for c in report.checks)
    program, stored = load(path)
    assert stored["model"] == meta["model"] and stored["model_kwargs"] == meta["model_kwargs"]
    assert stored["pt2"]["dynamic_axes"] == ["batch", "height", "width"] and len(stored["pt2"]["verified"]) == 3
    assert stored["num_classes"] == CLASSES and stored["input"]["channels"] == 3
    assert pickled_payloads(path) == [] and read_pt2_metadata(path) == stored
    model.eval()
    # batch 3 and sizes no verification saw
    for shape in [(3, 3, 61, 90), (1, 3, 33, 33), (1, 3, 96, 50), (1, 3, 290, 230)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            got, expected = program(x), forward_logits(model, x)
        assert got.shape == (shape[0], CLASSES, *shape[2:])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_the_metadata_is_the_checkpoints_and_the_model_keeps_its_mode(tmp_path):
    torch.manual_seed(1)
    kwargs = {"base_channels": 4, "in_channels": 1}
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=3, **kwargs), {
        "model": "unet", "num_classes": 3, "model_kwargs": kwargs, "class_names": ["a", "b", "c"],
        "palette": [[0, 0, 0], [9, 9, 9], [7, 7, 7]],
        "input": {"mean": [0.5], "std": [0.25], "normalize": True, "resize": [40, 56], "channels": 1}})
    model, meta = load_checkpoint(ckpt)
    model.train()
    report = export_pt2(model, tmp_path / "m.pt2", meta, sizes=[(1, 40, 56)])
    (tmp_path / "m.safetensors").unlink()
    assert model.training  # put back as it was
    _, stored = load(report.path)
    assert stored["class_names"] == ["a", "b", "c"] and stored["palette"][1] == [9, 9, 9]
    assert stored["input"]["resize"] == [40, 56] and stored["input"]["channels"] == 1
    assert stored["input"]["mean"] == [0.5] and stored["model"] == "unet"
    assert stored["pt2"]["dropout"] is True  # U-Net's default dropout: gone from the eval-mode program
    assert stored["geometry"] == {"context": 0, "alignment": 16}
    assert report.checks[0].shape == (1, 1, 40, 56)


class _Negated(nn.Module):
    """Its program computes the negated scores of its eager forward: argmax and argmin swap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return -self.conv(x) if torch.compiler.is_exporting() else self.conv(x)


class _SizeBound(nn.Module):
    """Only right at width 64: traced there, the program is fixed to that width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x) if x.shape[-1] == 64 else -self.conv(x)


def test_a_program_that_disagrees_with_eager_is_not_written(tmp_path):
    with pytest.raises(UserError, match=r"argmax agrees with PyTorch on .*needs 99.9%.*nothing written"):
        export_pt2(_Negated(), tmp_path / "a.pt2", sizes=[(1, 32, 32)])
    with pytest.raises(UserError, match=r"does not run at 32x48 \(batch 1\).*nothing written"):
        export_pt2(_SizeBound(), tmp_path / "b.pt2", sizes=[(1, 32, 64), (1, 32, 48)])
    assert list(tmp_path.iterdir()) == []


def test_instance_models_bad_names_and_diverged_weights_are_refused(tmp_path):
    with pytest.raises(UserError, match="no .pt2 export for the instance model"):
        export_pt2(create_model("maskrcnn_resnet18_fpn", num_classes=2), tmp_path / "m.pt2")
    model = create_model("unet", num_classes=2, base_channels=4)
    with pytest.raises(UserError, match=r"ends with .pt2"):
        export_pt2(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite"):
        export_pt2(model, tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_read_metadata_refuses_another_archive(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/extra/other.json", "{}")
    (tmp_path / "x.pt2").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="not a pixelwise export"):
        read_pt2_metadata(tmp_path / "x.pt2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "unet.safetensors"
    save_checkpoint(path, create_model("unet", num_classes=3, base_channels=4),
                    {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4},
                     "input": {"mean": [0.5] * 3, "std": [0.25] * 3, "normalize": True, "resize": [48, 64],
                               "channels": 3}})
    return path


def test_cli_writes_the_format_out_names_and_never_writes_over_a_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "m.pt2"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}") and "torch.export vs PyTorch eager" in said
    assert "37x53 (batch 1)" in said and "263x265" in said
    before = out.read_bytes()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "pt2", "--out", str(out), "--overwrite"]) == 0
    _, stored = load(out)
    assert stored["input"]["resize"] == [48, 64] and stored["pt2"]["verified"][0]["shape"] == [1, 3, 48, 64]
    # pixelwise runs checkpoints and ONNX files, never a .pt2 (loading one can unpickle)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), str(out), "--out", str(tmp_path / "p")]) == 2
    assert "is a torch.export archive" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.pt2", "sub"]


@pytest.mark.parametrize("args, message", [
    (["--out", "TMP/m.pt2", "--opset", "18"], "--opset applies to --format onnx; a .pt2 is float32"),
    (["--out", "TMP/m.pt2", "--fp16", "--int8"], "--fp16/--int8 apply to --format onnx"),
    (["--out", "TMP/m.pt2", "--calib-dataset", "shapes"], "--calib-dataset applies to --format onnx"),
    (["--out", "TMP/m.onnx", "--format", "pt2"], "a --format pt2 file's name ends with .pt2"),
    (["--out", "TMP/m.pt", "--format", "pt2"], "a --format pt2 file's name ends with .pt2"),
    (["--out", "TMP/m.pt"], "name an .onnx or a .pt2 file"),
    (["--out", "TMP/m.pt2", "--format", "torchscript"], "--format 'torchscript' is not supported: give onnx or pt2"),
    (["--out", "TMP/m.pt2", "--model", "maskrcnn_resnet18_fpn"], "no .pt2 export for the instance model"),
    (["--out", "CKPT", "--format", "pt2"], "a --format pt2 file's name ends with .pt2"),
])
def test_cli_bad_input_is_one_line_exit_2(checkpoint, tmp_path, capsys, args, message):
    args = [a.replace("TMP", str(tmp_path)).replace("CKPT", str(checkpoint)) for a in args]
    source = [] if "--model" in args else ["--checkpoint", str(checkpoint)]
    assert main(["export", *source, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_torch_without_dim_auto_is_told_to_upgrade(tmp_path, monkeypatch):
    """torch's floor (2.3) predates torch.export.Dim.AUTO: there the export says so, before any work."""
    monkeypatch.setattr(torch.export, "Dim", type("Dim", (), {}))
    with pytest.raises(UserError, match=r"needs a newer torch: this one \(.*\) has no torch.export.Dim.AUTO"):
        export_pt2(create_model("unet", num_classes=2, base_channels=4), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_the_verification_sizes_add_a_small_odd_one_and_one_about_three_halves_of_the_first():
    from pixelwise.inference.export_pt2 import pt2_sizes

    # without a resize: the ONNX sizes 256x320 and 197x403, then 37x53 and 3/2 of 256x320 plus 7 and 9
    assert pt2_sizes(None) == [(1, 256, 320), (2, 197, 403), (1, 37, 53), (1, 391, 489)]
    # a small resize: the large size is at least 263x265 (DeconvNet's program changes at 224)
    contract = {"mean": [0.5] * 3, "std": [0.25] * 3, "normalize": True, "resize": [48, 64], "channels": 3}
    assert pt2_sizes({"input": contract})[2:] == [(1, 37, 53), (1, 263, 265)]


def test_pickled_payloads_are_the_weights_and_constants_marked_so(tmp_path):
    def config(**payloads):
        return json.dumps({"config": {k: {"use_pickle": v} for k, v in payloads.items()}})

    path = tmp_path / "p.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data/weights/model_weights_config.json", config(w0=True, w1=False))
        z.writestr("archive/data/constants/model_constants_config.json", config(c0=True))
        z.writestr("archive/models/model.json", config(other=True))  # no payload config: not read as one
    assert pickled_payloads(path) == ["w0", "c0"]


class _RaisesWhenExported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise RuntimeError("the first line\nthe second line")
        return self.conv(x)


def test_an_export_that_torch_refuses_names_the_model_and_the_first_line_of_torchs_reason(tmp_path):
    with pytest.raises(UserError) as error:
        export_pt2(_RaisesWhenExported(), tmp_path / "m.pt2", sizes=[(1, 32, 32)])
    assert str(error.value) == ("torch.export cannot export _RaisesWhenExported with dynamic batch, height and width "
                                "(RuntimeError: the first line); --format onnx exports it")
    assert list(tmp_path.iterdir()) == []


def test_other_program_bytes_written_than_those_verified_are_not_written(tmp_path, monkeypatch):
    save, calls = torch.export.save, []

    def second_save_differs(program, f, extra_files=None, **kwargs):
        calls.append(f)
        extra = {**(extra_files or {}), **({"other.txt": "x"} if len(calls) == 2 else {})}
        save(program, f, extra_files=extra, **kwargs)

    monkeypatch.setattr(torch.export, "save", second_save_differs)
    with pytest.raises(UserError, match="other program bytes the second time than those verified; nothing written"):
        export_pt2(nn.Conv2d(3, 2, 1), tmp_path / "m.pt2", sizes=[(1, 32, 32)])
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_an_archive_with_a_pickled_payload_is_not_written(tmp_path, monkeypatch):
    import pixelwise.inference.export_pt2 as export_pt2_module

    monkeypatch.setattr(export_pt2_module, "pickled_payloads", lambda archive: ["w0", "w1", "w2", "w3"])
    with pytest.raises(UserError, match=r"torch.export stored w0, w1, w2 pickled, which loading would unpickle; "
                                        "nothing written"):
        export_pt2(nn.Conv2d(3, 2, 1), tmp_path / "m.pt2", sizes=[(1, 32, 32)])
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_the_checkpoint_by_a_link_is_refused_and_the_checkpoint_kept(checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    (tmp_path / "link.pt2").symlink_to(checkpoint)
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "link.pt2"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pixelwise: error: --out") and "\n" not in err and "--checkpoint" in err
    assert checkpoint.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["link.pt2"]
