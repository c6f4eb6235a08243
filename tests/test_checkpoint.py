import errno
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file as save_safetensors

from conftest import edit_safetensors
from pixelwise import __version__, create_model, load_checkpoint, save_checkpoint
from pixelwise.checkpoint import (
    HERE,
    STALE_SECONDS,
    NameTaken,
    _optimizer_state,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    load_train_state,
    model_input_spec,
    place,
    remove_stale_temporaries,
    save_train_state,
)
from pixelwise.errors import UserError
from pixelwise.weights import (
    backbone_file,
    download_weights,
    load_matching,
    non_finite,
    read_weights,
    saved_meta,
    saved_model_kwargs,
    url_has_hash,
    weights_not_found,
)

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}


def _model():
    torch.manual_seed(0)
    return create_model("unet", num_classes=3, **KW).eval()


def test_round_trip_identical_outputs(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"model": "unet", "num_classes": 3, "model_kwargs": KW,
                                  "class_names": ["a", "b", "c"]})
    loaded, meta = load_checkpoint(path)
    assert meta["class_names"] == ["a", "b", "c"] and meta["format"].startswith("pixelwise")
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PIXELWISE_PWNED']}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PIXELWISE_PWNED", str(marker))
    for name in ("evil.pth", "evil.safetensors", "evil.bin"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"w": _Payload()}))
        with pytest.raises(UserError, match="pickle|safetensors"):
            load_checkpoint(path)
    # a torch.save zip file too
    torch.save({"w": _Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(tmp_path / "evil2.pt")
    # and the only path that reads .pth at all uses weights_only=True, which refuses the payload
    with pytest.raises(UserError, match="weights_only"):
        read_weights(tmp_path / "evil2.pt")
    assert not marker.exists(), "the pickle payload ran"


def test_a_plain_pickle_given_as_weights_is_refused_in_one_line_without_torchs_warning(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns about the protocol before refusing it
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="is not a plain weights file torch can load safely"):
            read_weights(path)
    assert not seen, [str(w.message) for w in seen]


def test_truncated_and_missing(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="t.safetensors"):
        load_checkpoint(tmp_path / "t.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_weights_of_other_shapes_are_explained_not_a_traceback(tmp_path):
    """A checkpoint whose tensors have the names but not the shapes of the model its metadata
    rebuilds (another version's layout, or edited options) is a UserError naming the tensors."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    wrong = {"model": "unet", "num_classes": 3, "model_kwargs": {**KW, "base_channels": 8}}
    with pytest.raises(ValueError, match=r"is not the model given \(99 of other shapes"):
        save_checkpoint(path, _model(), wrong)  # refused when written, not when read
    save_checkpoint(path, _model(), {**wrong, "model_kwargs": KW})
    with safe_open(path, "pt") as f:  # as written by another version, or edited
        meta = json.loads(f.metadata()["pixelwise"])
    save_file(load_file(path), path, {"pixelwise": json.dumps({**meta, "model_kwargs": wrong["model_kwargs"]})})
    with pytest.raises(UserError, match=r"m.safetensors: weights do not fit model 'unet'.*down.0.0.weight "
                                        r"\(4, 3, 3, 3\) where the model has \(8, 3, 3, 3\)"):
        load_checkpoint(path)


def test_plain_safetensors_without_metadata_is_explained(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="not a pixelwise checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_foreign_weights_pth_round_trip(tmp_path):
    model = _model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    other = create_model("unet", num_classes=3, pretrained=str(tmp_path / "w.pth"), **KW).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("palette", [[[300, 0, 0], [1, 2, 3]], [[255, 0, 0, 9]], [[0.5, 0, 0]], "red", [[True, 0, 0]]])
def test_a_palette_that_is_not_rgb_bytes_is_refused_on_save_and_on_load(tmp_path, palette):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    kw = {"model": "unet", "num_classes": 3, "model_kwargs": KW}
    with pytest.raises(ValueError, match="palette must be a list of \\[r, g, b\\] colours"):
        save_checkpoint(tmp_path / "bad.safetensors", _model(), {**kw, "palette": palette})
    assert not (tmp_path / "bad.safetensors").exists()
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, _model(), {**kw, "palette": [[0, 0, 0], [255, 255, 255], [1, 2, 3]]})
    with safe_open(good, "pt") as f:  # a file written elsewhere, or edited by hand
        meta = json.loads(f.metadata()["pixelwise"])
    save_file(load_file(good), tmp_path / "edited.safetensors", {"pixelwise": json.dumps({**meta, "palette": palette})})
    with pytest.raises(UserError, match="edited.safetensors: the checkpoint's palette must be"):
        load_checkpoint(tmp_path / "edited.safetensors")


@pytest.mark.parametrize("ids", [[0, 5], [0, 5, "7"], "0,5,7", [0, 5, True]])
def test_category_ids_that_do_not_give_each_class_an_id_are_refused(tmp_path, ids):
    kw = {"model": "unet", "num_classes": 3, "model_kwargs": KW}
    with pytest.raises(ValueError, match="category_ids must list one whole-number id for each of the 3 classes"):
        save_checkpoint(tmp_path / "bad.safetensors", _model(), {**kw, "category_ids": ids})
    save_checkpoint(tmp_path / "good.safetensors", _model(), {**kw, "category_ids": [0, 5, 90]})
    assert load_checkpoint(tmp_path / "good.safetensors")[1]["category_ids"] == [0, 5, 90]


def test_save_checkpoint_unwraps_wrappers_and_refuses_metadata_that_would_not_load(tmp_path):
    model = _model()
    meta = {"model": "unet", "num_classes": 3, "model_kwargs": KW}
    x = torch.rand(1, 3, 20, 28)
    for wrapped in (nn.DataParallel(model), torch.compile(model)):  # keys with module. / _orig_mod.
        save_checkpoint(tmp_path / "w.safetensors", wrapped, meta)
        loaded, _ = load_checkpoint(tmp_path / "w.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    for bad, words in (({"model_kwargs": {}}, "of other shapes"), ({"num_classes": 5}, "of other shapes"),
                       ({"model": "enet", "model_kwargs": {}}, "missing"),
                       ({"model": "enet"}, "cannot rebuild model 'enet'"),
                       ({"class_names": ["a"]}, r"class_names must list a name \(text\) for each of the 3 classes"),
                       ({"class_names": ["a", None, 3]}, r"for each of the 3 classes, and holds \['a', None, 3\]"),
                       ({"palette": [[0, 0, 0]]}, "1 colours for 3 classes"),
                       ({"input": {"mean": [0, 0], "std": [1, 1]}}, "input is not an input contract"),
                       ({"input": {"mean": [0.5] * 3, "std": [0.5] * 3, "normalize": False}},
                        "the model normalises.* would be normalised by neither"),
                       ({"input": {"mean": [0.5], "std": [0.5], "channels": 1}}, r"has 1 channel\(s\).* takes 3")):
        with pytest.raises(ValueError, match=words):
            save_checkpoint(tmp_path / "bad.safetensors", model, {**meta, **bad})
    assert not (tmp_path / "bad.safetensors").exists()


def test_saving_onto_a_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="is a folder; give the name of a file"):
        save_checkpoint(tmp_path, _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    # no temporary beside the folder: today's names (.pixelwise-*), and older versions' (.NAME.*.tmp)
    assert [p.name for p in tmp_path.parent.iterdir()
            if p.name.startswith((".pixelwise-", f".{tmp_path.name}."))] == []


def test_metadata_a_python_user_naturally_passes_is_stored_as_json(tmp_path):
    """num_classes = mask.max() + 1 is a numpy integer, and predictor.input_spec an InputSpec: both
    are stored as the JSON they stand for; what is not a dict is a ValueError, not a TypeError deep in."""
    import numpy as np

    from pixelwise import InputSpec

    model = _model()
    spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize=(16, 24))
    save_checkpoint(tmp_path / "np.safetensors", model,
                    {"model": "unet", "num_classes": np.int64(3), "model_kwargs": KW, "input": spec,
                     "class_names": np.array(["a", "b", "c"]), "palette": np.zeros((3, 3), np.uint8)})
    _, meta = load_checkpoint(tmp_path / "np.safetensors")
    assert meta["num_classes"] == 3 and type(meta["num_classes"]) is int
    assert meta["class_names"] == ["a", "b", "c"] and meta["palette"] == [[0, 0, 0]] * 3
    assert meta["input"]["resize"] == [16, 24] and meta["input"]["mean"] == [0.5] * 3
    with pytest.raises(ValueError, match="must be a dict, got NoneType"):
        save_checkpoint(tmp_path / "none.safetensors", model, None)
    with pytest.raises(ValueError, match="JSON-serialisable.*object"):
        save_checkpoint(tmp_path / "obj.safetensors", model,
                        {"model": "unet", "num_classes": 3, "model_kwargs": KW, "note": object()})
    assert not (tmp_path / "none.safetensors").exists() and not (tmp_path / "obj.safetensors").exists()


def test_a_run_folder_given_as_checkpoint_names_the_file_to_give(tmp_path):
    save_checkpoint(tmp_path / "best.safetensors", _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    with pytest.raises(UserError, match=r"is a folder: give a checkpoint file in it such as .*best\.safetensors"):
        load_checkpoint(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this torch build has no CUDA|no CUDA GPU"):
            load_checkpoint(tmp_path / "best.safetensors", device="cuda")
    with pytest.raises(UserError, match="'gpu' is not a device"):
        load_checkpoint(tmp_path / "best.safetensors", device="gpu")


def test_a_checkpoint_replaced_while_it_is_read_gives_one_versions_metadata_and_weights(tmp_path, monkeypatch):
    """The metadata and the weights were read through two opens: a training run replacing best.safetensors
    between them gave one epoch's weights labelled with another's epoch."""
    import safetensors

    from pixelwise.checkpoint import read_checkpoint

    path = tmp_path / "best.safetensors"
    meta = {"model": "unet", "num_classes": 2, "model_kwargs": {"base_channels": 4}}
    model = create_model("unet", num_classes=2, base_channels=4)
    save_checkpoint(path, model, {**meta, "training": {"epoch": 1}})
    first_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "new.safetensors", model, {**meta, "training": {"epoch": 2}})
    real = safetensors.safe_open

    class ReplacedAfterOpen:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            handle = self.f.__enter__()
            os.replace(tmp_path / "new.safetensors", path)  # the trainer's rename, between two reads
            return handle

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr("pixelwise.checkpoint.safe_open", ReplacedAfterOpen)
    state, meta_read = read_checkpoint(path)
    assert meta_read["training"]["epoch"] == 1
    assert all(torch.equal(state[k], v) for k, v in first_weights.items())  # epoch 1's weights with epoch 1's label


def test_save_writes_its_own_format_and_version_and_refuses_another_task(tmp_path):
    """Passing a loaded checkpoint's metadata back to save_checkpoint kept the old writer's
    version and format; a task other than the model's was written, and predict then gave the
    U-Net to the instance predictor (AttributeError)."""
    import json

    from safetensors import safe_open

    from pixelwise import __version__
    from pixelwise.checkpoint import FORMAT, atomic_save_tensors

    model = create_model("unet", num_classes=3, base_channels=4)
    meta = {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4},
            "format": "pixelwise-checkpoint/0", "pixelwise_version": "0.0.9"}
    save_checkpoint(tmp_path / "a.safetensors", model, meta)
    _, stored = load_checkpoint(tmp_path / "a.safetensors")
    assert (stored["format"], stored["pixelwise_version"], stored["task"]) == (FORMAT, __version__, "semantic")
    with pytest.raises(ValueError, match="task 'instance', but unet is a semantic model"):
        save_checkpoint(tmp_path / "b.safetensors", model, {**meta, "task": "instance"})
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["pixelwise"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a handle, not a dict
    atomic_save_tensors(tensors, tmp_path / "c.safetensors",
                        {"pixelwise": json.dumps({**header, "task": "instance"})})
    with pytest.raises(UserError, match="task 'instance', but unet is a semantic model"):
        load_checkpoint(tmp_path / "c.safetensors")


def _edited(tmp_path, name, meta_edit=None, tensor_edit=None):
    """A good checkpoint with its metadata and/or tensors edited as by hand (or by damage)."""
    good = tmp_path / "good.safetensors"
    if not good.exists():
        save_checkpoint(good, _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    return edit_safetensors(good, tmp_path / name, "pixelwise", meta_edit, tensor_edit)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, value):
    """NaN logits argmax to class 0 everywhere: eval scored such a file 3x the real model's mIoU,
    export verified it ('agreement 100%'), and one NaN member turned an ensemble to class 0."""
    def poison(tensors):
        key = sorted(k for k, v in tensors.items() if v.is_floating_point())[-1]
        tensors[key] = tensors[key].clone().view(-1).index_fill_(0, torch.tensor([0]), value).view(tensors[key].shape)

    path = _edited(tmp_path, "nan.safetensors", tensor_edit=poison)
    with pytest.raises(UserError, match=r"nan\.safetensors: weight .* holds NaN or infinite values"):
        load_checkpoint(path)
    load_checkpoint(tmp_path / "good.safetensors")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(format="pixelwise-checkpoint/9", pixelwise_version="9.0"), "written by a newer pixelwise"),
    (lambda m: m.update(format=None), "checkpoint format None is not pixelwise's"),
    (lambda m: m.update(format="other/1"), "checkpoint format 'other/1' is not pixelwise's"),
    (lambda m: m["input"].update(normalize=None), "normalize must be true or false"),
    (lambda m: m["input"].update(normalize="no"), "normalize must be true or false"),
    (lambda m: m["input"].update(resize=0), "input resize must be"),
    (lambda m: m["input"].update(resize=[100000, 100000]), "resize of 10,000,000,000 pixels"),
    (lambda m: m["input"].update(channels="3"), "channels must be 1 or 3"),
    (lambda m: m.update(num_classes=True), "num_classes must be a whole number >= 1, and is True"),
    (lambda m: m.update(num_classes="3"), "num_classes must be a whole number >= 1, and is '3'"),
    (lambda m: m.update(palette=[[0, 0, 0]]), "palette must hold a colour for each of the 3 classes, and holds 1"),
    (lambda m: m["model_kwargs"].update(pretrained="imagenet"), "model_kwargs must be an object of the model's"),
    (lambda m: m["input"].update(normalize=False), "does not normalise its input itself: it would be normalised by "
                                                   "neither"),
    (lambda m: m["input"].update(channels=1, mean=[0.5], std=[0.25]), "input contract has 1 channel(s), and unet"),
])
def test_metadata_read_as_written_not_by_truth_value(tmp_path, edit, words):
    """normalize null or 0 switched the normalisation off (163 of 1024 pixels changed), "no" left
    it on; a resize of 10^10 pixels failed inside OpenCV; a newer format loaded without a word; a
    pretrained tag in model_kwargs downloaded weights; a short palette loaded though save refuses it."""
    path = _edited(tmp_path, "edited.safetensors", meta_edit=edit)
    with pytest.raises(UserError, match=re.escape(words)):
        load_checkpoint(path)


def test_checkpoints_of_before_the_format_field_still_load(tmp_path):
    path = _edited(tmp_path, "old.safetensors", meta_edit=lambda m: m.pop("format"))
    assert load_checkpoint(path)[1]["model"] == "unet"


@pytest.mark.parametrize("ids", [[0, 5, 5], [0, -1, 7]])
def test_category_ids_two_classes_share_or_negative_are_refused(tmp_path, ids):
    """Two classes under one COCO id put one class's detections under the other's category_id."""
    path = _edited(tmp_path, "ids.safetensors", meta_edit=lambda m: m.update(category_ids=ids))
    words = f"category_ids must be distinct ids >= 0 (one per class), got {ids}"
    with pytest.raises(UserError, match=re.escape(words)):
        load_checkpoint(path)


def test_a_checkpoint_path_that_is_no_checkpoint_file_is_named_as_what_it_is(tmp_path):
    """An ONNX export was "not a safetensors checkpoint (bad header); was it truncated?", and a pipe
    or a symbolic link loop given as a checkpoint was "not found"."""
    from pixelwise.inference.predictor import Predictor

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))  # how an ONNX protobuf begins
    with pytest.raises(UserError, match="m.onnx is an ONNX file .* give it to predict, eval and bench as --onnx"):
        load_checkpoint(onnx)
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.onnx")  # a PyTorch file named .onnx is named as what it is
    with pytest.raises(UserError, match="w.onnx is a pickle/PyTorch file"):
        load_checkpoint(tmp_path / "w.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        load_checkpoint(tmp_path / "empty.onnx")
    for name, fmt, kind in (("photo.png", "PNG", "PNG"), ("photo.jpg", "JPEG", "JPEG"), ("scan.tif", "TIFF", "TIFF")):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name, format=fmt)
        with pytest.raises(UserError, match=f"{name} is a {kind} image, not a checkpoint: give the .safetensors"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError, match=r"checkpoint .*none.safetensors not found; check the path"):
        load_checkpoint(tmp_path / "none.safetensors")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.safetensors"
    broken.symlink_to(tmp_path / "gone.safetensors")
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)  # opened for reading it would wait for a writer forever
    os.mkfifo(tmp_path / "pipe.onnx")
    pytest.importorskip("onnx", reason="the export extra is not installed")
    with pytest.raises(UserError, match=re.escape("pipe.onnx: not a regular file")):
        Predictor.from_checkpoint(tmp_path / "pipe.onnx")
    for path, words in ((loop, "symbolic link loop"), (broken, "broken symbolic link"),
                        (pipe, "not a regular file (a folder, pipe or device); give a checkpoint file"),
                        (tmp_path / "none.safetensors", "none.safetensors not found")):
        for load in (load_checkpoint, Predictor.from_checkpoint):
            with pytest.raises(UserError, match=re.escape(words)):
                load(path)


def test_load_checkpoint_takes_device_none_as_the_cpu(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", create_model("unet", num_classes=2, base_channels=4),
                    {"model": "unet", "num_classes": 2, "model_kwargs": {"base_channels": 4}})
    model, _ = load_checkpoint(tmp_path / "m.safetensors", None)
    assert next(model.parameters()).device.type == "cpu"


def test_pretrained_weights_that_are_not_float_finite_or_are_prefixed_are_named(tmp_path):
    """--pretrained took NaN weights (training then 'diverged: lower --lr'), int8 values of a
    quantised export (cast to float garbage), and a 'module.'-prefixed save was refused without the
    fix; a file of another class count for a model that keeps its class layer blamed the model name."""
    from safetensors.torch import save_file

    source = create_model("unet", num_classes=3, base_channels=4)
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}

    def refused(tensors, words, classes=3):
        save_file(tensors, tmp_path / "w.safetensors")
        with pytest.raises(UserError, match=re.escape(words)):
            create_model("unet", num_classes=classes, base_channels=4, pretrained=str(tmp_path / "w.safetensors"))

    nan = {**state, "down.1.0.weight": state["down.1.0.weight"].clone()}
    nan["down.1.0.weight"].view(-1)[3] = float("nan")
    refused(nan, "weight down.1.0.weight holds NaN or infinite values")
    refused({**state, "down.1.0.weight": state["down.1.0.weight"].to(torch.int8)}, "down.1.0.weight holds int8 values")
    refused({f"module.{k}": v for k, v in state.items()}, "the file's keys begin with 'module.'")
    fcn32 = create_model("fcn32s", num_classes=3).state_dict()
    fcn32["score_fr.weight"] = fcn32["score_fr.weight"].clone()
    fcn32["score_fr.weight"][0, 0] = float("nan")
    torch.save(fcn32, tmp_path / "fcn32s.pth")  # a staged recipe's coarser stage that diverged
    with pytest.raises(UserError, match="weight score_fr.weight holds NaN or infinite values"):
        create_model("fcn16s", num_classes=3, pretrained=str(tmp_path / "fcn32s.pth"))
    deeper = create_model("deeplabv3_resnet101", num_classes=3).state_dict()
    torch.save(deeper, tmp_path / "r101.pth")  # its keys begin with backbone., as the model's own: no prefix hint
    with pytest.raises(UserError, match=r"do not fit DeepLabV3: missing \[\], unexpected \[.backbone.layer3") as e:
        create_model("deeplabv3_resnet50", num_classes=3, pretrained=str(tmp_path / "r101.pth"))
    assert "prefix" not in str(e.value)
    refused(state, "the file scores 3 classes and this model 5: UNet loads its class layer as it is", classes=5)
    save_file(state, tmp_path / "ok.safetensors")
    model = create_model("unet", num_classes=3, base_channels=4, pretrained=str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("value", [None, 1.5, -1])
def test_an_older_checkpoints_mean_or_std_that_is_not_a_list_is_named(tmp_path, value, capsys):
    """Checkpoints from before the input contract (2026-11-21) carry top-level mean and std; a null
    or a bare number there was a TypeError traceback ('NoneType' object is not iterable)."""
    from pixelwise.cli import main

    save_checkpoint(tmp_path / "m.safetensors", _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})

    def older(meta, key):
        meta.pop("input")
        meta.update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        meta[key] = value

    for key in ("mean", "std"):
        old = edit_safetensors(tmp_path / "m.safetensors", tmp_path / f"{key}.safetensors", "pixelwise",
                               meta_edit=lambda meta, key=key: older(meta, key))
        with pytest.raises(UserError, match=re.escape(f"{old}: the file's {key} is {value!r}, not a list")):
            load_checkpoint(old)
    good = edit_safetensors(tmp_path / "m.safetensors", tmp_path / "good.safetensors", "pixelwise",
                            meta_edit=lambda meta: older(meta, "mean") or meta.update(mean=[0.5, 0.5, 0.5]))
    assert load_checkpoint(good)[1]["input"]["mean"] == [0.5, 0.5, 0.5]  # an older file as written: read
    untasked = edit_safetensors(good, tmp_path / "untasked.safetensors", "pixelwise",
                                meta_edit=lambda meta: meta.update(task=None))  # was: "use SemanticPredictor"
    assert load_checkpoint(untasked)[1]["task"] == "semantic"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "std.safetensors"), str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "std.safetensors: the file's std is" in capsys.readouterr().err


def test_weights_that_do_not_fit_name_the_way_out_by_who_wrote_them(tmp_path):
    """'written by pixelwise 0.1.0, this is 0.1.0: load it with the pixelwise that wrote it' sent
    the user to the version they had: metadata that does not describe the weights is the cause then."""
    from pixelwise import __version__

    save_checkpoint(tmp_path / "m.safetensors", _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    for version, words in ((__version__, "of other shapes, e.g. .*\\); the file's model, num_classes or model_kwargs "
                                         "do not describe its weights: fix its metadata, or retrain"),
                           ("0.0.1", f"\\); written by pixelwise 0.0.1, this is {re.escape(__version__)}: load it "
                                     "with the pixelwise that wrote it, or retrain")):
        bad = edit_safetensors(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", "pixelwise",
                               meta_edit=lambda meta, v=version: meta.update(model_kwargs={}, pixelwise_version=v))
        with pytest.raises(UserError, match=words):
            load_checkpoint(bad)


def test_place_on_a_file_system_without_hard_links_renames_a_free_name_and_refuses_a_taken_one(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    tmp = tmp_path / "a.tmp"
    tmp.write_text("new")
    place(tmp, tmp_path / "free.txt", replace=False)  # free: renamed
    assert (tmp_path / "free.txt").read_text() == "new" and not tmp.exists()
    tmp.write_text("newer")
    (tmp_path / "taken.txt").write_text("theirs")
    with pytest.raises(NameTaken):
        place(tmp, tmp_path / "taken.txt", replace=False)
    assert (tmp_path / "taken.txt").read_text() == "theirs"


def test_atomic_write_text_and_json_replace_by_default_and_write_nan_as_null(tmp_path):
    target = tmp_path / "sub" / "m.json"
    atomic_write_text(target, "old")
    assert target.read_text(encoding="utf-8") == "old"
    atomic_write_text(target, "ünï")  # replace=True by default, utf-8
    assert target.read_bytes() == "ünï".encode()
    atomic_write_json(target, {"a": float("nan"), "b": [1.5, float("inf")], "c": (2,)})  # replaces by default
    assert json.loads(target.read_text()) == {"a": None, "b": [1.5, None], "c": [2]}
    with pytest.raises(NameTaken):
        atomic_write_json(target, {"x": 1}, replace=False)
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~_umask())


def test_atomic_write_leaves_the_process_umask_as_it_was(tmp_path):
    """Reading the umask sets it; what the command writes afterwards (logs, images by plain open())
    must still get the user's, not 0666."""
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        after = os.umask(0o027)
    finally:
        os.umask(old)
    assert oct(after) == oct(0o027)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o640)


def test_what_a_killed_atomic_write_left_is_removed_by_the_next_write_into_its_folder(tmp_path):
    """A SIGKILL in the middle of atomic_write (a checkpoint, --json, an export) left a hidden
    temporary file that no later run removed, one per kill, as large as the output. Its name now
    says which process wrote it, and the next write into the folder removes it once that process is
    gone; one whose process still runs is kept (it is being written)."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time\n"
            "from pixelwise.checkpoint import atomic_write\n"
            "def write(tmp):\n"
            "    open(tmp, 'w').write('half')\n"
            "    print(tmp, flush=True)\n"
            "    time.sleep(60)\n"
            "atomic_write(sys.argv[1], write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m.json")], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(proc.stdout.readline().strip())
        running = sorted(p.name for p in tmp_path.iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert running == [left.name] and left.name.startswith(f".pixelwise-{HERE}-{proc.pid}-"), running
    assert left.read_text() == "half" and not (tmp_path / "m.json").exists()
    live = tmp_path / f".pixelwise-{HERE}-{os.getppid()}-0123456789ab-0.tmp"  # a process that still runs
    live.write_text("being written")
    atomic_write_json(tmp_path / "other.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "other.json"])


def test_a_leftover_that_cannot_be_removed_is_skipped_and_the_rest_removed(tmp_path):
    """predict calls remove_stale_temporaries on its --out: a leftover it may not remove (another
    user's, in a shared sticky folder; here a folder of such a name) stopped the whole predict with a
    message naming a file the user never gave."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stuck = tmp_path / f".pixelwise-{HERE}-{dead.pid}-000000000000-0.png"
    stuck.mkdir()
    (stuck / "x").write_text("")
    left = tmp_path / f".pixelwise-{HERE}-{dead.pid}-ffffffffffff-0.png"
    left.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert stuck.is_dir() and not left.exists()


def test_the_place_of_a_temporary_names_the_boot_too(monkeypatch):
    """Two machines of one hostname (each in its first process-id namespace, whose inode number is
    the same on every Linux) were one place: a write on one deleted the temporaries of the other's
    running writers, whose process ids it cannot see. The boot's id tells them apart."""
    import pixelwise.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.socket, "gethostname", lambda: "localhost")
    monkeypatch.setattr(checkpoint, "_boot_id", lambda: "machine-a")
    a = checkpoint._here()
    monkeypatch.setattr(checkpoint, "_boot_id", lambda: "machine-b")
    assert checkpoint._here() != a
    monkeypatch.setattr(checkpoint, "_boot_id", lambda: "machine-a")
    assert checkpoint._here() == a


def test_atomic_write_removes_an_older_versions_temporaries_of_its_file_once_a_day_old(tmp_path):
    """Before 2026-12-07 the temporaries were ``.NAME.<8 random>.tmp``, with no process id: those of
    the file being written are removed once unwritten for a day; fresh ones (a running older
    version may be writing them) and a like-named file of another name are kept."""
    import time

    old = tmp_path / ".m.json.k1ll3d_x.tmp"
    fresh = tmp_path / ".m.json.abcdefgh.tmp"
    other = tmp_path / ".n.json.k1ll3d_x.tmp"
    mine = tmp_path / ".m.json.notes.tmp"  # not 8 characters: not a temporary of ours
    for path in (old, fresh, other, mine):
        path.write_text("x")
    long_ago = time.time() - STALE_SECONDS - 60
    for path in (old, other, mine):
        os.utime(path, (long_ago, long_ago))
    atomic_write_text(tmp_path / "m.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, mine.name, "m.json"])


def test_a_folder_that_cannot_be_tidied_does_not_fail_the_write(tmp_path, monkeypatch):
    import pixelwise.checkpoint as checkpoint

    def refuse(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    (tmp_path / "m.json").write_text("old")
    monkeypatch.setattr(checkpoint, "remove_stale_temporaries", refuse)
    atomic_write_text(tmp_path / "m.json", "new")
    assert (tmp_path / "m.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["m.json"]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("key", ["model", "num_classes"])
def test_save_checkpoint_names_a_missing_model_or_num_classes(tmp_path, key):
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4)
    meta = {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4}}
    del meta[key]
    with pytest.raises(ValueError, match=f"checkpoint metadata needs '{key}'"):
        save_checkpoint(tmp_path / "m.safetensors", model, meta)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key", ["optim.2.exp_avg", "optim.x.exp_avg"])
def test_optimizer_state_for_no_parameter_is_a_value_error(key):
    params = [torch.zeros(3), torch.zeros(2, 2)]
    good = _optimizer_state({"optim.0.exp_avg": torch.ones(3), "optim.1.exp_avg": torch.ones(2, 2)},
                            {"0.step": 1, "1.step": 1}, params)
    assert sorted(good) == [0, 1] and good[1]["step"] == 1 and torch.equal(good[0]["exp_avg"], torch.ones(3))
    with pytest.raises(ValueError, match="for no parameter of the model"):
        _optimizer_state({key: torch.ones(3)}, {}, params)


def _stepped_linear() -> tuple[nn.Linear, torch.optim.SGD]:
    """A small model and its SGD with momentum after one step: an optimizer state to save."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_train_state_round_trips_weights_optimizer_an_enabled_grad_scaler_and_the_callers_values(tmp_path):
    torch.manual_seed(0)
    model, opt = _stepped_linear()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    path = tmp_path / "last.state.safetensors"
    save_train_state(path, model, opt, scaler, {"rng.x": torch.arange(4)}, {"epoch": 3})
    model2 = nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    scaler2 = torch.amp.GradScaler("cpu")
    rest, meta = load_train_state(path, model2, opt2, scaler2)
    assert meta == {"epoch": 3}  # the caller's values only: optimizer, groups and scaler are taken out
    assert list(rest) == ["rng.x"] and torch.equal(rest["rng.x"], torch.arange(4))
    assert scaler2.get_scale() == 512.0 and scaler2.get_growth_interval() == 7
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "encoder.", "net."])
def test_a_wrapper_prefix_on_every_key_is_named(prefix):
    model = nn.Conv2d(3, 2, 1)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=f"the file's keys begin with '{prefix}'"):
        load_matching(model, state, "w")


def test_backbone_file_drops_the_classifier_of_a_file_of_the_bodys_own_keys():
    body = nn.Sequential(nn.Conv2d(3, 2, 1))
    state = {"0.weight": torch.ones(2, 3, 1, 1), "0.bias": torch.zeros(2), "fc.weight": torch.ones(5, 2)}
    assert sorted(backbone_file(state, body)) == ["0.bias", "0.weight"]
    whole = {"backbone.0.weight": torch.ones(2, 3, 1, 1), "0.weight": torch.ones(2, 3, 1, 1)}
    assert backbone_file(whole, body) is None  # a whole-model file, even where a key matches the body's
    assert backbone_file({"head.weight": torch.ones(1)}, body) is None  # none of the body's keys


def test_a_large_but_finite_float16_tensor_is_finite():
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # its float16 sum overflows to inf
    assert not non_finite(big)
    assert non_finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))
    assert not non_finite(torch.tensor([1, 2]))  # integers are never NaN


def test_url_has_hash_follows_torch_hubs_rule():
    assert url_has_hash("https://x.org/w/resnet50-0676ba61.pth")
    assert not url_has_hash("https://x.org/w/resnet50.pth")
    assert not url_has_hash("https://x.org/w/resnet50-0676b.pth")  # 5 hex digits: too short


def test_weights_not_found_names_the_tags_in_order():
    assert "pass imagenet or coco, or the path" in str(weights_not_found("x.pth", ["imagenet", "coco"]))
    assert "pass a, b or c, or the path" in str(weights_not_found("x.pth", ["a", "b", "c"]))
    assert "pass imagenet, or the path" in str(weights_not_found("x.pth", ["imagenet"]))
    assert str(weights_not_found("x.pth", name="unet")).startswith(
        "unet: weights 'x.pth' not found: pass the path of a .safetensors")


def test_weights_not_found_without_tags_or_name_offers_the_path_only():
    assert str(weights_not_found("x.pth")) == "weights 'x.pth' not found: pass the path of a .safetensors/.pth file"


def test_saved_meta_and_model_kwargs_read_the_pixelwise_header_entry(tmp_path):
    meta = {"model_kwargs": {"base_channels": 4}, "num_classes": 3}
    save_safetensors({"w": torch.ones(1)}, str(tmp_path / "c.safetensors"), {"pixelwise": json.dumps(meta)})
    save_safetensors({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"), {"other": "1"})
    save_safetensors({"w": torch.ones(1)}, str(tmp_path / "list.safetensors"),
                     {"pixelwise": json.dumps({"model_kwargs": [4]})})
    assert saved_meta(tmp_path / "c.safetensors") == meta
    assert saved_model_kwargs(str(tmp_path / "c.safetensors")) == {"base_channels": 4}
    assert saved_meta(tmp_path / "plain.safetensors") == {}
    assert saved_model_kwargs(tmp_path / "plain.safetensors") is None
    assert saved_model_kwargs(tmp_path / "list.safetensors") is None  # not a dict: no options
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert saved_meta(tmp_path / "bad.safetensors") is None and saved_meta("imagenet") is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_every_weights_suffix_is_read_as_a_state_dict(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save_safetensors({"w": torch.arange(3.0)}, str(path)) if suffix == ".safetensors" else torch.save(
        {"w": torch.arange(3.0)}, path)
    assert list(read_weights(path)) == ["w"] and torch.equal(read_weights(path)["w"], torch.arange(3.0))


def test_a_bare_name_without_published_weights_is_a_tag_and_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(UserError, match=r"^weights 'imagenet': this model has no published weights to download"):
        read_weights("imagenet")
    for given in ("foo.pth", str(tmp_path / "foo")):
        with pytest.raises(UserError, match=r"^weights '.*foo(\.pth)?' not found: pass the path of a "):
            read_weights(given)


@pytest.mark.parametrize("content", [[torch.ones(1)], {"w": torch.ones(1), "epoch": 3}])
def test_a_pth_that_is_not_a_dict_of_tensors_is_named(tmp_path, content):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(UserError, match="w.pth does not hold a state dict of tensors"):
        read_weights(path)


def test_the_class_layer_hint_is_given_only_for_the_last_layer():
    model = nn.Module()
    model.head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    state = dict(model.state_dict())
    state["head.0.weight"], state["head.0.bias"] = torch.ones(5, 3, 1, 1), torch.ones(5)  # not the last layer
    with pytest.raises(UserError) as first:
        load_matching(model, state, "w")
    assert str(first.value) == ("w: weight head.0.weight has shape (5, 3, 1, 1), the model needs (4, 3, 1, 1); "
                                "check the model name and its arguments")
    state = dict(model.state_dict())
    state["head.1.weight"], state["head.1.bias"] = torch.ones(5, 4, 1, 1), torch.ones(5)  # the last layer
    with pytest.raises(UserError, match="if it is the class layer, the file scores 5 classes and this model 2"):
        load_matching(model, state, "w")


def test_a_weights_file_of_another_suffix_is_named_as_an_unknown_format(tmp_path):
    path = tmp_path / "w.txt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(UserError, match=r"w.txt: unknown weights format '.txt'; use .safetensors, .pth, .pt or .bin"):
        read_weights(path)


def test_download_weights_returns_what_torch_hub_reads(monkeypatch):
    state = {"w": torch.ones(2)}
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: calls.append((url, kw)) or state)
    assert download_weights("https://example.org/w/resnet-0676ba61.pth") is state
    assert calls[0][1]["weights_only"] is True and calls[0][1]["check_hash"] is True


def test_the_class_layer_is_the_last_layer_even_without_a_bias():
    model = nn.Module()
    model.head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1, bias=False))
    state = dict(model.state_dict())
    state["head.0.weight"], state["head.0.bias"] = torch.ones(5, 3, 1, 1), torch.ones(5)  # the layer before
    with pytest.raises(UserError) as info:
        load_matching(model, state, "w")
    assert "head.0.weight has shape (5, 3, 1, 1)" in str(info.value) and "class layer" not in str(info.value)


def test_a_model_that_normalises_its_input_states_its_own_mean_and_std_not_the_callers():
    class Normalising(nn.Module):  # as Mask R-CNN: its transform subtracts its own image_mean
        normalizes_input = True
        input_mean_std = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))

    spec = model_input_spec(Normalising(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (spec.mean, spec.std, spec.normalize) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), False)


def test_a_train_state_without_weights_resumes_with_the_weights_of_last_safetensors(tmp_path):
    """Older runs kept the weights only in last.safetensors, beside a state of optimizer and RNG."""
    torch.manual_seed(0)
    model, opt = _stepped_linear()
    path = tmp_path / "last.state.safetensors"
    save_train_state(path, model, opt, None, {"rng.x": torch.arange(4)}, {"epoch": 3})
    edit_safetensors(path, path, "pixelwise_train_state",
                     tensor_edit=lambda t: [t.pop(k) for k in list(t) if k.startswith("model.")])
    atomic_save_tensors(model.state_dict(), tmp_path / "last.safetensors",
                        {"pixelwise": json.dumps({"model": "unet", "num_classes": 2})})
    model2 = nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    rest, meta = load_train_state(path, model2, opt2, None)
    assert meta == {"epoch": 3} and list(rest) == ["rng.x"]
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def test_a_train_state_whose_parameter_groups_name_no_parameters_is_refused(tmp_path):
    """Damaged param_groups that torch's load_state_dict cannot map ([[0], [1]] for [0, 1]): a
    resume without the optimizer's momentum would go on without a word."""
    model, opt = _stepped_linear()
    path = tmp_path / "last.state.safetensors"
    save_train_state(path, model, opt, None, {}, {"epoch": 3})

    def listed(meta):
        meta["param_groups"][0]["params"] = [[i] for i in meta["param_groups"][0]["params"]]

    edit_safetensors(path, path, "pixelwise_train_state", meta_edit=listed)
    model2 = nn.Linear(3, 2)
    with pytest.raises(UserError, match="the optimizer state in .* is damaged or does not fit these settings"):
        load_train_state(path, model2, torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), None)


def test_weights_that_do_not_fit_a_file_of_no_recorded_version_say_so(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", _model(), {"model": "unet", "num_classes": 3, "model_kwargs": KW})
    bad = edit_safetensors(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", "pixelwise",
                           meta_edit=lambda meta: (meta.update(model_kwargs={}), meta.pop("pixelwise_version")))
    with pytest.raises(UserError, match=f"\\); written by pixelwise \\?, this is {re.escape(__version__)}: load it"):
        load_checkpoint(bad)


def test_the_place_of_temporaries_is_named_where_the_pid_namespace_cannot_be_read(monkeypatch):
    """``_here`` reads /proc/self/ns/pid, which macOS, Windows and some sandboxes lack: it must
    still name the place (host alone), in the form remove_stale_temporaries matches, not raise
    (an import of pixelwise.checkpoint would fail there)."""
    from pixelwise.checkpoint import _TEMPORARY, _here

    real_stat = os.stat

    def no_proc(path, *args, **kwargs):
        if os.fspath(path).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", no_proc)
    name = _here()
    assert re.fullmatch(r"h[0-9a-f]{8}", name) and _here() == name  # one name per host, every time
    assert _TEMPORARY.fullmatch(f".pixelwise-{name}-123-0123456789ab-0.tmp").group(1) == name


def test_load_matching_names_the_optional_layers_it_left_fresh_and_only_those():
    """A classifier of another class count (optional prefix '1.') is skipped and named; the body is
    loaded. A file whose classifier fits loads it all and names nothing."""
    torch.manual_seed(0)
    file = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 5)).state_dict()
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    fresh = model[1].weight.detach().clone()
    assert load_matching(model, file, "f", optional=("1.",)) == ["1"]
    assert torch.equal(model[0].weight, file["0.weight"]) and torch.equal(model[1].weight, fresh)
    same = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    assert load_matching(same, model.state_dict(), "f", optional=("1.",)) == []
    assert torch.equal(same[1].weight, model[1].weight)


def test_metadata_nested_deeper_than_python_recurses_is_one_user_error(tmp_path):
    """json.loads raised RecursionError (a traceback from predict, eval, export and serve) on a
    checkpoint or an exported file whose pixelwise metadata nests 100,000 brackets."""
    deep = "[" * 100_000 + "]" * 100_000
    save_safetensors({"w": torch.zeros(1)}, tmp_path / "deep.safetensors", metadata={"pixelwise": deep})
    with pytest.raises(UserError, match=r"deep\.safetensors: its checkpoint metadata is nested too deeply"):
        load_checkpoint(tmp_path / "deep.safetensors")
    onnx = pytest.importorskip("onnx")
    from pixelwise.inference.onnx_runner import read_onnx_metadata

    graph = onnx.helper.make_graph([], "g", [], [])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {"pixelwise": deep})
    onnx.save(model, tmp_path / "deep.onnx")
    with pytest.raises(UserError, match=r"deep\.onnx: its pixelwise metadata is not a JSON object \(nested too deeply"):
        read_onnx_metadata(tmp_path / "deep.onnx")


@pytest.mark.parametrize("major", ["9" * 5000, "\u0661"])
def test_a_format_of_thousands_of_digits_or_non_ascii_digits_is_not_pixelwises(tmp_path, major):
    """int() refuses strings of over 4300 digits (ValueError, a traceback); str.isdigit() takes the
    Arabic-Indic digit one, which int() read as format 1 and loaded."""
    path = _edited(tmp_path, "fmt.safetensors", meta_edit=lambda m: m.update(format=f"pixelwise-checkpoint/{major}"))
    with pytest.raises(UserError, match=r"fmt\.safetensors: checkpoint format .* is not pixelwise's") as caught:
        load_checkpoint(path)
    assert len(str(caught.value)) < 300  # a long format is named by its ends


def _needs_safetensors_to_write(dtype, tmp_path):
    """Skip where the installed safetensors cannot store ``dtype`` (0.4.0, the floor, has no
    complex64 or float8): the file under test cannot be made there."""
    try:
        save_safetensors({"t": torch.zeros(1).to(dtype)}, tmp_path / "probe.safetensors")
    except (KeyError, ValueError, TypeError) as e:
        pytest.skip(f"this safetensors cannot write {dtype} ({type(e).__name__}: {e})")
    (tmp_path / "probe.safetensors").unlink()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_weights_of_another_kind_than_the_models_are_refused(tmp_path, dtype):
    """int32, bool, uint8 and complex weights where the model has float ones loaded cast (fractions
    cut to 0, the imaginary part dropped) and predicted garbage with exit 0."""
    _needs_safetensors_to_write(dtype, tmp_path)

    def cast(tensors):
        key = sorted(k for k, v in tensors.items() if v.dim() == 4)[0]
        tensors[key] = tensors[key].to(dtype)

    path = _edited(tmp_path, "odd.safetensors", tensor_edit=cast)
    kind = str(dtype).removeprefix("torch.")
    with pytest.raises(UserError, match=rf"odd\.safetensors: weights do not fit .*1 of other types, e\.g\. \S+ "
                                        rf"{kind} where the model has float32"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_float_weights_of_any_width_load_as_float32(tmp_path, dtype):
    """A checkpoint saved in half, bfloat16, double or float8 precision loads (its values rounded to
    that precision); float8 was a traceback in the NaN check (no sum for it)."""
    _needs_safetensors_to_write(dtype, tmp_path)

    def cast(tensors):
        for key in [k for k, v in tensors.items() if v.is_floating_point()]:
            tensors[key] = tensors[key].to(dtype)

    path = _edited(tmp_path, "half.safetensors", tensor_edit=cast)
    model, _ = load_checkpoint(path)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


def test_non_finite_looks_at_float8_tensors_too():
    nan = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert non_finite(nan) and not non_finite(torch.ones(3).to(torch.float8_e4m3fn))
    assert not non_finite(torch.ones(3, dtype=torch.int32)) and not non_finite(torch.ones(2, dtype=torch.complex64))
