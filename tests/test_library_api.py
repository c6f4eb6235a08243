"""pixelwise used as a Python library (notebooks, scripts, threads): what probe 6 found. Each test
fails without its fix; numbers are checked against an independent reference (the sequential run,
a hand count, numpy)."""
import json
import re
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import pixelwise
from conftest import ROOT
from pixelwise import InputSpec, SemanticPredictor
from pixelwise.data import build_dataset, collate
from pixelwise.data.palette import colorize
from pixelwise.errors import UserError
from pixelwise.inference.ensemble import EnsemblePredictor, from_checkpoints
from pixelwise.inference.mc_dropout import MAX_MC_SAMPLES, dropout_layers, dropout_sampling
from pixelwise.inference.predictor import InstancePredictor, Prediction, Predictor, check_mc_samples
from pixelwise.inference.writers import predict_files
from pixelwise.metrics import (
    BFMeter,
    BoundaryIoUMeter,
    ConfusionMeter,
    RandMeter,
    confusion_matrix,
    image_bf_scores,
    pixel_error,
    rand_counts,
)


def unet(classes: int = 3, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return pixelwise.create_model("unet", num_classes=classes, base_channels=4, **kwargs)


def checkpoint(tmp_path: Path, name: str = "u", classes: int = 3, **meta) -> Path:
    path = tmp_path / f"{name}.safetensors"
    pixelwise.save_checkpoint(path, unet(classes), {"model": "unet", "num_classes": classes,
                                                    "model_kwargs": {"base_channels": 4}, **meta})
    return path


def images(n: int, size: tuple[int, int] = (40, 40), seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


# --- 1: Monte-Carlo dropout from several threads -------------------------------------------------

def test_mc_dropout_predictor_in_threads_equals_sequential_and_leaves_rng_and_modes(tmp_path):
    p = Predictor.from_checkpoint(checkpoint(tmp_path), mc_samples=3)
    assert isinstance(p, SemanticPredictor) and dropout_layers(p.model)
    imgs = images(12)
    seq = [p.predict(im, uncertainty=True) for im in imgs]
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            par = list(pool.map(lambda im: p.predict(im, uncertainty=True), imgs))
        for a, b in zip(seq, par):
            assert a.probs is not None and b.probs is not None
            assert torch.equal(a.probs, b.probs) and np.array_equal(a.mask, b.mask)
            assert np.array_equal(a.uncertainty, b.uncertainty)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    assert not any(m.training for m in p.model.modules())  # dropout is off again: eval forwards are plain
    x = p.preprocess(imgs[0])
    assert torch.equal(p.model(x), p.model(x))


def test_mc_dropout_draws_from_its_own_generator_whatever_other_threads_draw(tmp_path):
    """Seeded sampling borrowed torch's global generator: a thread of the caller drawing random
    numbers meanwhile changed the masks (4-13 of 3,072 pixels) and had its own numbers repeat (20k
    distinct of 112k draws). The dropout layers now draw from the call's own generator."""
    import threading

    p = Predictor.from_checkpoint(checkpoint(tmp_path), mc_samples=4)
    imgs = images(3, (48, 64))
    alone = [p.predict(im, uncertainty=True) for im in imgs]
    stop, draws = threading.Event(), []

    def caller_draws():
        torch.manual_seed(7)
        while not stop.is_set():
            draws.append(torch.rand(4))

    other = threading.Thread(target=caller_draws)
    other.start()
    try:
        busy = [p.predict(im, uncertainty=True) for im in imgs for _ in range(2)]
    finally:
        stop.set()
        other.join()
    for i, b in enumerate(busy):
        assert np.array_equal(alone[i // 2].mask, b.mask) and np.array_equal(alone[i // 2].uncertainty, b.uncertainty)
    # the caller's thread drew its own stream, undisturbed (it had numbers of the borrowed state, undone)
    ref = torch.Generator().manual_seed(7)
    assert len(draws) > 10 and torch.equal(torch.cat(draws), torch.rand(4 * len(draws), generator=ref))


@pytest.mark.parametrize("kind, shape", [
    (torch.nn.Dropout, (8, 64, 5)), (torch.nn.Dropout1d, (64, 30)), (torch.nn.Dropout1d, (8, 64, 5)),
    (torch.nn.Dropout2d, (8, 64)), (torch.nn.Dropout2d, (8, 64, 5)), (torch.nn.Dropout2d, (8, 64, 5, 5)),
    (torch.nn.Dropout2d, (4, 64, 3, 3, 3)), (torch.nn.Dropout3d, (64, 3, 3, 3)), (torch.nn.Dropout3d, (4, 64, 3, 3, 3)),
])
def test_seeded_dropout_drops_what_torchs_own_layer_drops_at_its_rate(kind, shape):
    """The seeded masks come from a generator of the call's own: over the same dimensions as
    torch's own layer (a 3-D input to Dropout2d is [N, C, L], to Dropout3d unbatched [C, D, H, W]),
    at the layer's rate, scaled by 1 / (1 - p), and without touching torch's global generator."""
    import warnings

    from pixelwise.inference.mc_dropout import dropout_sampling

    def constant_over(y):
        return [bool((y == y.select(d, 0).unsqueeze(d)).all()) for d in range(y.ndim)]

    x, p = torch.ones(shape), 0.4
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own note on a 3-D input to Dropout2d
        own = kind(p).train()(x)
    model = torch.nn.Sequential(kind(p)).eval()
    before = torch.get_rng_state()
    with dropout_sampling(model, torch.Generator().manual_seed(0)):
        y = model(x)
    assert torch.equal(torch.get_rng_state(), before)
    assert constant_over(y) == constant_over(own)
    assert torch.isclose(y[y != 0], torch.tensor(1 / (1 - p))).all() and abs((y == 0).float().mean() - p) < 0.1


def test_seeded_dropout_refuses_the_ranks_torchs_own_layer_refuses():
    """A 1-D input to Dropout2d (and a 1-D or 4-D one to Dropout1d): torch's layer raises, and so
    does the seeded layer, rather than drop elements on its own."""
    for kind, shape in ((torch.nn.Dropout2d, (5,)), (torch.nn.Dropout1d, (5,)), (torch.nn.Dropout1d, (2, 3, 4, 5))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError):
                kind(0.4).train()(torch.ones(shape))
            model = torch.nn.Sequential(kind(0.4)).eval()
            with dropout_sampling(model, torch.Generator().manual_seed(0)), pytest.raises(RuntimeError):
                model(torch.ones(shape))


def test_seeded_sampling_leaves_no_forward_on_the_layers_even_when_it_fails(monkeypatch):
    from pixelwise.inference.mc_dropout import mc_dropout

    model = unet(dropout=0.5)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout2d))
    calls = []
    layer.forward = lambda x: calls.append(1) or x  # the caller's own, on the instance
    plain = unet(dropout=0.5)
    mc_dropout(plain, torch.rand(1, 3, 32, 32), samples=2, seed=0)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    x = torch.rand(1, 3, 32, 32)
    a = mc_dropout(model, x, samples=2, seed=0)[0]
    assert calls == [1, 1] and "forward" in layer.__dict__  # the caller's forward ran the samples, and stays
    assert torch.equal(a, mc_dropout(model, x, samples=2, seed=0)[0])  # the global state borrowed, seeded
    alpha = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AlphaDropout(0.3))  # not torch's plain kind
    gpus_seeded: list[int] = []  # torch.manual_seed seeded every GPU's generator, which nothing gave back
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpus_seeded.append)
    before = torch.get_rng_state()
    assert torch.equal(mc_dropout(alpha, x, samples=3, seed=0)[0], mc_dropout(alpha, x, samples=3, seed=0)[0])
    assert torch.equal(torch.get_rng_state(), before) and not gpus_seeded

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    failing = torch.nn.Sequential(torch.nn.Dropout(0.5), Boom()).eval()
    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout(failing, torch.rand(1, 3, 4, 4), samples=2, seed=0)
    assert "forward" not in failing[0].__dict__ and not failing[0].training


def test_a_caller_whose_default_dtype_is_float64_loads_the_float32_model(tmp_path):
    """load_checkpoint built the model in torch's default dtype: after set_default_dtype(float64)
    (common in scientific code) every predict failed with 'expected scalar type Float but found Double'."""
    path = checkpoint(tmp_path)
    img = images(1, (40, 56))[0]
    want = Predictor.from_checkpoint(path, mc_samples=2).predict(img, uncertainty=True)
    stored = pixelwise.load_checkpoint(path)[0].state_dict()
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # float16 ones were rounded, then widened
        torch.set_default_dtype(dtype)
        try:
            p = Predictor.from_checkpoint(path, mc_samples=2)
            got = p.predict(img, uncertainty=True)
        finally:
            torch.set_default_dtype(torch.float32)
        assert all(torch.equal(v, stored[k]) and v.dtype == stored[k].dtype for k, v in p.model.state_dict().items())
        assert np.array_equal(got.mask, want.mask) and np.array_equal(got.uncertainty, want.uncertainty)
    from pixelwise.layers import BilinearUpsample

    torch.set_default_dtype(torch.float64)
    try:  # the FCNs' upsamplers: 'Index put requires the source and destination dtypes match'
        up = BilinearUpsample(3, 2)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(up.weight.float(), BilinearUpsample(3, 2).weight)


def test_a_callers_autocast_around_predict_changes_nothing(tmp_path):
    """A caller's torch.autocast (a web handler wrapped whole) ran eager, tiled, MC and fast models
    in bf16 (1-39 mask pixels changed) and failed inside torch for int8 ('Quantize only works on
    Float Tensor') and Mask R-CNN (scatter's dtypes). Each mode runs its own precision."""
    from pixelwise import InstancePredictor

    path = checkpoint(tmp_path)
    imgs = images(2, (32, 48))
    base = Predictor.from_checkpoint(path)
    builders = {"eager": lambda: Predictor.from_checkpoint(path, tile=16),
                "mc": lambda: Predictor.from_checkpoint(path, mc_samples=2),
                "fast": lambda: Predictor.from_checkpoint(path, mode="fast"),
                "int8": lambda: SemanticPredictor(base.model, base.meta, mode="int8", calib_data=images(1, (32, 32)),
                                                  calib_crop=32, measuring=True)}  # random weights: no guard
    for name, build in builders.items():
        p = build()
        want = [p.predict(im, uncertainty=True) for im in imgs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = build()  # also built under it: int8 calibrates, fast measures
            got = [q.predict(im, uncertainty=True) for im in imgs]
        for a, b in zip(want, got):
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.uncertainty, b.uncertainty), name
    torch.manual_seed(0)
    detector = InstancePredictor(pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3, min_size=64,
                                                        max_size=96, box_score_thresh=0.0,
                                                        box_detections_per_img=5),
                                 {"model": "maskrcnn_resnet18_fpn", "num_classes": 3}, score_thresh=0.0)
    want = detector.predict(imgs[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = detector.predict(imgs[0])
    assert len(want["boxes"]) > 0 and all(torch.equal(want[k], got[k]) for k in want)


def test_two_predictors_sharing_a_model_sample_it_one_at_a_time():
    from pixelwise.inference.mc_dropout import model_lock

    model = unet()
    a = SemanticPredictor(model, {"model": "unet", "num_classes": 3}, mc_samples=2)
    b = SemanticPredictor(model, {"model": "unet", "num_classes": 3}, mc_samples=2, tta="flip")
    assert model_lock(model) is model_lock(a.model) is model_lock(b.model)
    imgs = images(8, (32, 32))
    jobs = [(p, im) for im in imgs for p in (a, b)]
    seq = [p.predict(im).probs for p, im in jobs]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda job: job[0].predict(job[1]).probs, jobs))
    assert all(torch.equal(s, q) for s, q in zip(seq, par))
    assert not any(m.training for m in model.modules())


# --- 2: predict_batch / predict_rows take any iterable -------------------------------------------

def test_predict_batch_and_rows_take_generators_and_other_iterables(tmp_path):
    path = checkpoint(tmp_path)
    p = SemanticPredictor.from_checkpoint(path)
    imgs = [np.zeros((9, 11, 3), np.uint8), np.full((5, 7, 3), 200, np.uint8)]
    want = [p.predict(im).mask for im in imgs]
    for given in ((im for im in imgs), map(lambda x: x, imgs), iter(imgs), tuple(imgs),
                  {"a": imgs[0], "b": imgs[1]}.values()):
        got = p.predict_batch(given)
        assert len(got) == 2 and all(np.array_equal(g.mask, w) for g, w in zip(got, want))
    rows = p.predict_rows(im for im in imgs)
    assert len(rows) == 2
    for bands, w in zip(rows, want):
        assert np.array_equal(np.concatenate([mask for _, mask, _ in bands]), w)
    tiled = SemanticPredictor.from_checkpoint(path, tile=16)
    big = images(1, (40, 40))[0]
    got = tiled.predict_batch(iter([big]))
    assert len(got) == 1 and np.array_equal(got[0].mask, tiled.predict(big).mask)
    for bad in (3, None):
        with pytest.raises(TypeError, match=r"a list \(or any iterable\) of uint8\[H, W, 3\] arrays"):
            p.predict_batch(bad)  # type: ignore[arg-type]


# --- 3: the input contract refuses what it cannot apply ------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"mean": (float("nan"),) * 3}, "input mean must be finite numbers"),
    ({"std": (0.2, 0.2, float("inf"))}, "input std must be finite numbers"),
    ({"resize": (8.7, 8)}, "two whole numbers of pixels >= 1, got (8.7, 8)"),
    ({"resize": (True, 8)}, "two whole numbers of pixels >= 1, got (True, 8)"),
    ({"resize": 8}, r"such as (8, 8), got 8"),
    ({"resize": (0, 8)}, "two whole numbers of pixels >= 1"),
])
def test_input_spec_refuses_non_finite_statistics_and_fractional_sizes(tmp_path, fields, words):
    with pytest.raises(UserError, match=re.escape(words)):
        InputSpec(**fields)
    contract = {**InputSpec().to_dict(), **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}
    with pytest.raises(UserError, match=re.escape(words)):
        InputSpec.from_dict(contract)
    with pytest.raises(ValueError, match="input is not an input contract"):
        checkpoint(tmp_path, input=contract)


def test_input_spec_keeps_whole_float_sizes_as_ints():
    spec = InputSpec(resize=(8.0, np.int64(9)), mean=[0.5, 0.5, 0.5])  # type: ignore[arg-type]
    assert spec.resize == (8, 9) and all(type(v) is int for v in spec.resize)
    assert spec.mean == (0.5, 0.5, 0.5)
    assert InputSpec.from_dict(spec.to_dict()) == spec


# --- 4 and 11: metrics take labels, one image at a time where they are per image ----------------

def square(n: int = 40) -> np.ndarray:
    t = np.zeros((n, n), np.int64)
    t[10:30, 10:30] = 1
    return t


def test_bf_and_rand_refuse_soft_maps_as_the_confusion_matrix_does():
    t = square()
    soft = t * 0.6
    for call in (lambda: BFMeter(2).update(soft, t), lambda: image_bf_scores(soft, t, 2),
                 lambda: RandMeter().update(soft, t), lambda: rand_counts(soft, t),
                 lambda: confusion_matrix(soft, t, 2), lambda: BFMeter(2).update(t > 0, t)):
        with pytest.raises(TypeError, match="prediction must hold integer class labels"):
            call()
    with pytest.raises(TypeError, match="target must hold integer class labels"):
        image_bf_scores(t, t.astype(np.float32), 2)
    # the exact map still scores perfectly, against the hand values
    b = BFMeter(2)
    b.update(t, t)
    assert b.compute() == {"bf_score": 1.0, "per_class_bf": [1.0, 1.0]}
    r = RandMeter()
    r.update(t, t)
    assert r.compute()["rand_error"] == 0.0


def test_bf_refuses_predictions_out_of_range_as_the_confusion_matrix_does():
    pred, target = np.full((4, 4), 7), np.zeros((4, 4), np.int64)
    for call in (lambda: image_bf_scores(pred, target, 2), lambda: BFMeter(2).update(pred, target),
                 lambda: confusion_matrix(pred, target, 2)):
        with pytest.raises(ValueError, match=r"prediction has labels outside 0\.\.1"):
            call()
    pred[:] = 255  # under ignored ground truth a prediction is not looked at, in both
    target[:] = 255
    assert image_bf_scores(pred, target, 2) == {}
    assert confusion_matrix(pred, target, 2).sum() == 0


def test_bf_and_rand_take_one_image_at_a_time():
    batch = np.stack([square(), square()])
    for call in (lambda: BFMeter(2).update(batch, batch), lambda: RandMeter().update(batch, batch)):
        with pytest.raises(ValueError, match=r"one image at a time: pred and target int\[H, W\].*once per image"):
            call()
    cm = confusion_matrix(batch, batch, 2)  # the confusion matrix takes any shape
    assert cm.tolist() == [[2 * (1600 - 400), 0], [0, 2 * 400]]
    b = BFMeter(2)
    b.update(torch.from_numpy(square()), torch.from_numpy(square()))  # torch maps of one image
    assert b.compute()["bf_score"] == 1.0


def test_pixel_error_takes_a_numpy_matrix_and_confusion_matrix_nested_lists():
    m = np.array([[3, 1], [0, 4]])
    assert pixel_error(m) == pytest.approx(1 / 8)
    assert pixel_error(torch.from_numpy(m)) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match=r"confusion matrix \[C, C\]"):
        pixel_error(np.zeros((2, 3, 3), np.int64))
    pred, target = [[0, 1, 1], [2, 2, 0]], [[0, 1, 2], [2, 2, 255]]
    want = np.zeros((3, 3), np.int64)
    for p, t in zip(np.ravel(pred), np.ravel(target)):
        if t != 255:
            want[t, p] += 1
    assert confusion_matrix(pred, target, 3).numpy().tolist() == want.tolist()


# --- 5: a predictor built on a bare model knows its classes --------------------------------------

def test_semantic_predictor_without_metadata_takes_the_class_count_from_the_model():
    p = SemanticPredictor(unet(5))
    assert p.class_names == [f"class_{i}" for i in range(5)]
    assert len(p.palette) == 5 and len(set(p.palette)) == 5
    r = p.predict(images(1, (48, 48))[0])
    assert r.probs is not None and r.probs.shape[0] == len(p.class_names)
    colours = colorize(np.arange(5, dtype=np.uint8).reshape(1, 5), p.palette)[0]
    assert len({tuple(c) for c in colours}) == 5
    valid = SemanticPredictor(unet(4, padding="valid"))  # a model that needs context: a large enough input
    assert len(valid.class_names) == 4
    # a meta with a count and no names: the same generic names (they were "0", "1", ... there alone)
    assert SemanticPredictor(unet(3), {"num_classes": 3}).class_names == ["class_0", "class_1", "class_2"]
    ensemble = EnsemblePredictor([p, SemanticPredictor(unet(5, seed=1))])
    assert ensemble.class_names == p.class_names and len(ensemble.palette) == 5


# --- 6: Predictor.predict is typed for both tasks ------------------------------------------------

def test_predictor_base_class_has_a_typed_predict():
    hints = typing.get_type_hints(Predictor.predict)
    assert hints["return"] == Prediction | dict[str, torch.Tensor]
    assert typing.get_type_hints(from_checkpoints)["return"] is Predictor
    with pytest.raises(NotImplementedError, match="use SemanticPredictor or InstancePredictor"):
        Predictor(unet()).predict(images(1)[0])
    # the README's Python API block calls predict(image, uncertainty=True) on Predictor.from_checkpoint
    readme = (ROOT / "README.md").read_text()
    assert "predictor = pixelwise.Predictor.from_checkpoint(" in readme and "uncertainty=True)" in readme


# --- 7: a predictor refuses a model of the other task when it is built ---------------------------

def test_predictors_refuse_a_model_of_the_other_task():
    torch.manual_seed(0)
    mask_rcnn = pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3)
    with pytest.raises(UserError, match="maskrcnn_resnet18_fpn is an instance model; use InstancePredictor"):
        SemanticPredictor(mask_rcnn, {"model": "maskrcnn_resnet18_fpn", "num_classes": 3})
    with pytest.raises(UserError, match="MaskRCNN is an instance model; use InstancePredictor"):
        SemanticPredictor(mask_rcnn)
    with pytest.raises(UserError, match="unet is a semantic model; use SemanticPredictor"):
        InstancePredictor(unet(), {"model": "unet", "num_classes": 3})
    with pytest.raises(UserError, match="UNet is a semantic model; use SemanticPredictor"):
        InstancePredictor(unet())
    detector = InstancePredictor(mask_rcnn)  # the base class's predict(image, uncertainty) signature
    # without metadata, names and colours for the classifier's 3 classes (background included)
    assert detector.class_names == ["class_0", "class_1", "class_2"] and len(detector.palette) == 3
    with pytest.raises(UserError, match=r"uncertainty \(--uncertainty\) .* does not apply to instance models"):
        detector.predict(images(1, (32, 32))[0], uncertainty=True)


@pytest.mark.parametrize("value", ["no", 0, 1, None, [False]])
def test_on_off_options_of_the_python_api_take_only_true_or_false(value, tmp_path):
    """``predict(image, uncertainty="no")`` counted as true and computed the entropy map it was
    asked not to; every on/off option of the predictors and predict_files takes a bool only."""
    predictor, image = SemanticPredictor(unet()), images(1, (16, 16))[0]
    calls = {"uncertainty": [lambda v: predictor.predict(image, uncertainty=v),
                             lambda v: predictor.predict_batch([image], uncertainty=v),
                             lambda v: predictor.predict_rows([image], uncertainty=v),
                             lambda v: predict_files(predictor, [str(tmp_path)], tmp_path / "o", uncertainty=v)],
             "probs": [lambda v: predictor.predict(image, probs=v),
                       lambda v: predictor.predict_batch([image], probs=v)],
             "overwrite": [lambda v: predict_files(predictor, [str(tmp_path)], tmp_path / "o", overwrite=v)],
             "resume": [lambda v: predict_files(predictor, [str(tmp_path)], tmp_path / "o", resume=v)]}
    for name, each in calls.items():
        for call in each:
            with pytest.raises(UserError, match=f"^{name} must be True or False, got "):
                call(value)
    assert not (tmp_path / "o").exists()
    # numpy's bool (a comparison's result) is a bool
    assert predictor.predict(image, uncertainty=np.bool_(True)).uncertainty.shape == (16, 16)


def test_an_instance_predictor_takes_only_true_or_false_for_uncertainty():
    torch.manual_seed(0)
    detector = InstancePredictor(pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3))
    with pytest.raises(UserError, match="^uncertainty must be True or False, got 'no'"):
        detector.predict(images(1, (32, 32))[0], uncertainty="no")


def test_an_instance_predictor_predicts_without_an_uncertainty_argument():
    """predict(image) alone returns the detections (uncertainty defaults to False; True is refused).
    The runner is a stand-in, so that only the predictor's own steps run: threshold and order by score."""
    detector = InstancePredictor(pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3), score_thresh=0.5)
    masks = torch.zeros(3, 1, 32, 32)
    masks[1, 0, 4:9, 2:7] = 1.0
    found = {"boxes": torch.tensor([[0.0, 0, 4, 4], [2, 4, 7, 9], [1, 1, 3, 3]]), "labels": torch.tensor([1, 2, 1]),
             "scores": torch.tensor([0.6, 0.9, 0.2]), "masks": masks}
    detector.runner = lambda xs: [found]
    det = detector.predict(images(1, (32, 32))[0])
    assert det["scores"].tolist() == pytest.approx([0.9, 0.6]) and det["labels"].tolist() == [2, 1]
    assert torch.equal(det["masks"][0], masks[1, 0] >= 0.5) and not det["masks"][1].any()


# --- 8: the documented DataLoader recipe ---------------------------------------------------------

def test_docs_data_shows_the_collate_a_dataloader_needs():
    from torch.utils.data import DataLoader

    doc = (ROOT / "docs" / "data.md").read_text()
    assert "collate_fn=collate" in doc and "from pixelwise.data import build_dataset, collate" in doc
    ds = build_dataset("shapes", None, "val", num_train=4, num_val=4)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, *ds[0]["mask"].shape) and len(batch["target"]) == 2
    assert torch.equal(batch["mask"][1], ds[1]["mask"])


# --- 9: preprocess takes the checkpoint's contract dict ------------------------------------------

def test_preprocess_takes_the_checkpoints_input_dict(tmp_path):
    _, meta = pixelwise.load_checkpoint(checkpoint(tmp_path, input=InputSpec(resize=(8, 6)).to_dict()))
    img = images(1, (13, 17))[0]
    got = pixelwise.preprocess(img, meta["input"])
    assert got.shape == (3, 8, 6)
    assert torch.equal(got, pixelwise.preprocess(img, InputSpec.from_dict(meta["input"])))
    for bad in (None, (8, 8), "imagenet"):
        with pytest.raises(TypeError, match=re.escape("InputSpec.from_dict(meta['input'])")):
            pixelwise.preprocess(img, bad)  # type: ignore[arg-type]


# --- 10: messages that say the fix, in Python's words --------------------------------------------

@pytest.mark.parametrize("image, fix", [
    (np.random.default_rng(0).random((7, 9, 3)).astype(np.float32), "(img * 255).round().astype(np.uint8)"),
    (np.zeros((3, 7, 9), np.uint8), "img.transpose(1, 2, 0)"),
    (np.zeros((7, 9), np.uint8), "np.repeat(img[..., None], 3, -1)"),
    (np.zeros((7, 9, 1), np.uint8), "np.repeat(img, 3, -1)"),
    (np.zeros((7, 9, 4), np.uint8), "img[..., :3]"),
    (np.full((7, 9, 3), 100, np.int64), "img.astype(np.uint8)"),
    (np.zeros((1, 7, 9, 3), np.uint8), "img[0] (a batch of one image)"),
])
def test_wrong_image_formats_are_told_how_to_convert(image, fix):
    p = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    with pytest.raises(ValueError, match=r"preprocess expects uint8\[H, W, 3\].*" + re.escape(fix)):
        p.predict(image)


@pytest.mark.parametrize("image, fix", [
    (torch.rand(3, 7, 9), "img = image.detach().cpu().numpy(), then img.transpose(1, 2, 0) (channels first), then"),
    (torch.rand(7, 9, 3, requires_grad=True), "img = image.detach().cpu().numpy(), then (img * 255)"),
    (torch.rand(7, 9, 3).to_sparse(), "img = image.detach().to_dense().float().cpu().numpy()"),
    (np.zeros((7, 9, 3), np.uint8).tolist(), "(nested lists of pixel values: np.asarray(image, np.uint8))"),
    (torch.rand(1, 3, 7, 9), "then img[0] (a batch of one image), then img.transpose(1, 2, 0)"),
    (torch.zeros(7, 9, 3, dtype=torch.uint8) + 3, "np.ndarray"),  # a uint8 HWC tensor: numpy() alone
    ("photo.png", "(a path: pixelwise.data.io.read_image(path))"),
    ([np.zeros((7, 9, 3), np.uint8)], "(several images: predict_batch(images))"),
    (np.zeros((2, 7, 9, 3), np.uint8), "a batch of images: predict_batch(list(img))"),
    (np.zeros((3, 70, 2), np.uint8), "np.repeat(img[..., :1], 3, -1) (gray and alpha)"),  # not channels first
    (np.full((7, 9, 3), np.nan, np.float32), "every value is NaN or infinite"),
])
def test_inputs_that_are_not_arrays_or_batches_are_told_their_conversion(image, fix):
    """A tensor was told permute(1, 2, 0) whatever its layout (an HWC strip became a 70x3 mask), a
    path, a list and a batch were told nothing, HxWx2 was taken for channels first, and an all-NaN
    image raised numpy's RuntimeWarning."""
    p = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    if fix == "np.ndarray":  # the conversion named for it makes an array the predictor takes
        with pytest.raises(ValueError, match=re.escape("(a tensor: img = image.detach().cpu().numpy())")):
            p.predict(image)
        assert p.predict(image.cpu().numpy()).mask.shape == (7, 9)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"preprocess expects .*uint8\[H, W, 3\].*" + re.escape(fix)):
            p.predict(image)


def test_a_pil_image_is_told_the_conversion_the_cli_reads_it_with(tmp_path):
    """The hint np.asarray(image.convert('RGB')) turned a 16-bit image white and a float one black."""
    from pixelwise.data.io import pil_to_rgb, read_image

    p = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    sixteen = Image.fromarray((np.arange(63).reshape(7, 9) * 1000).astype(np.uint16))
    with pytest.raises(ValueError, match=re.escape("(a PIL image: pixelwise.data.io.pil_to_rgb(image)")):
        p.predict(sixteen)
    sixteen.save(tmp_path / "g.png")
    assert np.array_equal(pil_to_rgb(sixteen), read_image(tmp_path / "g.png"))
    assert len(np.unique(pil_to_rgb(sixteen))) > 10
    # a photo as a camera stores it, turned by its EXIF tag: the hint gave the stored pixels' mask
    # (transposed for orientations 5-8) where predict and read_image give the displayed image's
    rng = np.random.default_rng(0)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[274] = orientation
        Image.fromarray(rng.integers(0, 255, (5, 8, 3), dtype=np.uint8)).save(tmp_path / "o.png", exif=exif)
        with Image.open(tmp_path / "o.png") as photo:
            assert np.array_equal(pil_to_rgb(photo), read_image(tmp_path / "o.png")), orientation
            assert pil_to_rgb(photo).shape == ((8, 5, 3) if orientation >= 5 else (5, 8, 3))
    for mode in ("L", "RGBA", "P", "I;16"):  # one-strip TIFFs, which Pillow memory-maps: rows were scrambled
        exif = Image.Exif()
        exif[274] = 6
        Image.fromarray(rng.integers(0, 255, (5, 8), dtype=np.uint8)).convert(mode).save(tmp_path / "o.tif", exif=exif)
        with Image.open(tmp_path / "o.tif") as page:
            assert np.array_equal(pil_to_rgb(page), read_image(tmp_path / "o.tif")), mode
    # an EXIF block that is not one ('not a TIFF file' from getexif): the pixels, as before, unturned
    Image.fromarray(rng.integers(0, 255, (5, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png", exif=b"\xbc\xa5 no tiff")
    with Image.open(tmp_path / "x.png") as damaged:
        assert np.array_equal(pil_to_rgb(damaged), np.asarray(damaged.convert("RGB")))


def test_a_flipped_view_of_one_row_or_column_is_predicted():
    """numpy calls a view flipped along an axis of length 1 contiguous, so it was not copied and
    torch.from_numpy refused its negative stride (a traceback from torch)."""
    p = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    img = images(1, (30, 40))[0]
    assert np.array_equal(p.predict(img[5:4:-1]).mask, p.predict(img[5:6].copy()).mask)
    column = img[:, 7:8]
    assert np.array_equal(p.predict(column[:, ::-1]).mask, p.predict(column.copy()).mask)
    assert np.array_equal(p.predict_batch([img[:1, :1][::-1, ::-1]])[0].mask, p.predict(img[:1, :1].copy()).mask)


def test_a_one_channel_model_takes_a_gray_image():
    p = SemanticPredictor(unet(in_channels=1), {"model": "unet", "num_classes": 3})
    assert p.input_spec.channels == 1
    gray = np.random.default_rng(2).integers(0, 256, (21, 19), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, -1)
    want = p.predict(rgb)
    for image in (gray, gray[..., None]):
        got = p.predict(image)
        assert got.probs is not None and want.probs is not None
        assert torch.equal(got.probs, want.probs) and np.array_equal(got.mask, want.mask)
    assert np.array_equal(p.predict_batch([gray, rgb])[0].mask, want.mask)
    with pytest.raises(ValueError, match=re.escape("np.repeat(img[..., None], 3, -1)")):
        SemanticPredictor(unet(), {"model": "unet", "num_classes": 3}).predict(gray)  # RGB model: refused


def test_from_checkpoint_messages_speak_python(tmp_path):
    path = checkpoint(tmp_path)
    with pytest.raises(UserError, match="from_checkpoint takes no input_spec.*resize=.*native_size=True") as e:
        Predictor.from_checkpoint(path, input_spec=InputSpec(resize=(8, 8)))
    assert "--input-spec" not in str(e.value) and "like unet" not in str(e.value)
    with pytest.raises(UserError, match=r"give resize=\(8, 8\).*or native_size=True.*not both"):
        Predictor.from_checkpoint(path, resize=(8, 8), native_size=True)
    with pytest.raises(UserError, match=r"calib_data=.*--calib-data PATH"):
        Predictor.from_checkpoint(path, mode="int8")
    _, meta = pixelwise.load_checkpoint(path)
    spec = {**meta["input"], "resize": [8, 8]}  # a contract dict is taken as the input_spec too
    assert SemanticPredictor(unet(), meta, input_spec=spec).input_spec == InputSpec.from_dict(spec)
    with pytest.raises(TypeError, match=re.escape("InputSpec.from_dict(meta['input'])")):
        SemanticPredictor(unet(), meta, input_spec=(8, 8))  # type: ignore[arg-type]
    p = Predictor.from_checkpoint(path, device=None)
    assert p.device == torch.device("cpu")
    assert SemanticPredictor(unet(), device=None).device == torch.device("cpu")


def test_the_fast_mode_refusal_of_monte_carlo_dropout_names_the_api_words_too():
    """It spoke only of --mode and --mc-samples to a Python caller who gave mode= and mc_samples=."""
    model = unet(dropout=0.5)
    with pytest.raises(UserError, match=re.escape("--mode fast (mode='fast') does not apply to Monte-Carlo dropout "
                                                  "(--mc-samples, mc_samples=); use --mode eager (mode='eager')")):
        SemanticPredictor(model, {"model": "unet", "num_classes": 3}, mode="fast", mc_samples=2)


def test_the_meters_take_read_only_arrays_without_a_warning():
    """np.asarray of a PIL image is read-only; torch.as_tensor of one warns (once per process, so
    this runs in a fresh one) that it cannot share it: the meters copy such arrays instead."""
    import subprocess
    import sys

    code = """if True:
        import numpy as np
        from PIL import Image
        from pixelwise.metrics import BFMeter, BoundaryIoUMeter, ConfusionMeter
        a = np.asarray(Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) % 3))
        assert not a.flags.writeable
        cm = ConfusionMeter(3)
        cm.update(a, a)
        for meter in (BFMeter(3), BoundaryIoUMeter(3)):
            meter.update(a, a)
        assert cm.compute()["mIoU"] == 1.0
    """
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_instance_predictor_scales_boxes_and_masks_back_from_a_resize_contract():
    """With a resize contract the detector sees the image at (16, 24): its boxes come back scaled
    by each axis's ratio to the image's (32, 72) (x by 3, y by 2) and its masks upsampled to it.
    The detector is stubbed so that the expected boxes are worked by hand."""
    torch.manual_seed(0)
    detector = InstancePredictor(pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3),
                                 {"model": "maskrcnn_resnet18_fpn", "num_classes": 3},
                                 input_spec=InputSpec(resize=(16, 24)), score_thresh=0.5)
    seen = []
    mask = torch.zeros(2, 1, 16, 24)
    mask[0, 0, 2:6, 1:5] = 1.0  # rows 2-5, columns 1-4 of the model's input

    def runner(xs):
        seen.append(tuple(xs[0].shape))
        return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 1.0, 1.0]]), "labels": torch.tensor([1, 2]),
                 "scores": torch.tensor([0.9, 0.1]), "masks": mask}]

    detector.runner = runner
    out = detector.predict(np.zeros((32, 72, 3), np.uint8))
    assert seen == [(3, 16, 24)]
    assert torch.equal(out["boxes"], torch.tensor([[3.0, 4.0, 15.0, 12.0]]))  # the 0.1 detection is dropped
    assert out["labels"].tolist() == [1] and out["masks"].shape == (1, 32, 72)
    assert out["masks"][0, 5:11, 4:14].all() and not out["masks"][0, 13:].any() and not out["masks"][0, :, 16:].any()


# --- probe 22c: the Python API with odd arguments ------------------------------------------------


@pytest.mark.parametrize("make, words", [
    (lambda: BFMeter(2, tolerance=float("nan")), "tolerance must be a finite fraction"),
    (lambda: BFMeter(2, tolerance=-0.01), "tolerance must be a finite fraction"),
    (lambda: BoundaryIoUMeter(2, dilation=-0.5), "dilation must be a finite fraction"),
    (lambda: BoundaryIoUMeter(2, dilation=float("nan")), "dilation must be a finite fraction"),
    (lambda: RandMeter(foreground=255), "other than ignore_index=255"),
    (lambda: RandMeter(foreground=-1), "foreground must be the cell class"),
    (lambda: ConfusionMeter(0), "ConfusionMeter: num_classes must be a whole number >= 1, got 0"),
    (lambda: ConfusionMeter(-1), "ConfusionMeter: num_classes must be a whole number >= 1, got -1"),
    (lambda: BFMeter(0), "BFMeter: num_classes must be a whole number >= 1"),
])
def test_meters_refuse_settings_that_score_nothing(make, words):
    """A NaN or negative BF tolerance scored every image 0.0, a negative band width was taken as
    1 pixel, a Rand foreground of 255 or -1 gave None for every score, all without a word, and
    ConfusionMeter(-1) failed in torch.zeros."""
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


@pytest.mark.parametrize("call", [
    lambda: ConfusionMeter(2.5), lambda: ConfusionMeter("3"), lambda: ConfusionMeter(True),
    lambda: confusion_matrix(np.zeros(2, int), np.zeros(2, int), 2.0),
])
def test_a_class_count_that_is_not_a_whole_number_is_a_type_error_that_names_it(call):
    """torch said "zeros() takes 1 positional argument but 2 were given" or "bincount(): argument
    'minlength' must be int"."""
    with pytest.raises(TypeError, match="num_classes must be a whole number >= 1"):
        call()


def test_one_path_object_is_one_checkpoint_and_one_string_is_one_input(tmp_path):
    """evaluate_checkpoint(Path(...)) raised "'PosixPath' object is not iterable"; predict_files of
    one str read it letter by letter ("input t not found"), of one Path "not iterable"."""
    from pixelwise.inference.evaluate import evaluate_checkpoint
    from pixelwise.inference.writers import predict_files

    ck = checkpoint(tmp_path, classes=4)  # the shapes data's classes
    kw = dict(dataset_kwargs={"num_val": 1, "size": 32}, progress=False, bf=False)
    by_path = evaluate_checkpoint(ck, "shapes", None, **kw)  # ck: a pathlib.Path
    assert by_path["mIoU"] == evaluate_checkpoint(str(ck), "shapes", None, **kw)["mIoU"]
    Image.fromarray(images(1, (20, 24))[0]).save(tmp_path / "a.png")
    p = Predictor.from_checkpoint(ck)
    one = predict_files(p, str(tmp_path / "a.png"), tmp_path / "out1", progress=False)
    folder = predict_files(p, tmp_path / "a.png", tmp_path / "out2", progress=False)
    assert [q.name for q in one] == [q.name for q in folder] and len(one) == 1
    assert np.array_equal(np.asarray(Image.open(one[0])), np.asarray(Image.open(folder[0])))


def test_a_half_precision_model_is_told_to_become_float32():
    """A .half() or bfloat16 model failed inside its first convolution: "Input type (float) and
    bias type (c10::Half) should be the same"."""
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=re.escape("give model.float()")):
            SemanticPredictor(unet().to(dtype), {"model": "unet", "num_classes": 3})
    model = unet().half()
    fixed = SemanticPredictor(model.float(), {"model": "unet", "num_classes": 3})
    assert fixed.predict(images(1)[0]).mask.shape == (40, 40)


def test_arguments_of_the_wrong_kind_name_the_call_that_takes_them(tmp_path):
    """Each failed deep inside with an AttributeError or a weakref TypeError."""
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.trainer import fit
    from pixelwise.inference.writers import predict_files

    model = unet()
    meta = {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4}}
    with pytest.raises(TypeError, match=re.escape("model.load_state_dict(sd)")):
        pixelwise.save_checkpoint(tmp_path / "s.safetensors", model.state_dict(), meta)
    assert not (tmp_path / "s.safetensors").exists()
    with pytest.raises(TypeError, match=re.escape("SemanticPredictor.from_checkpoint(path)")):
        SemanticPredictor("runs/unet/best.safetensors")
    with pytest.raises(TypeError, match="meta must be the checkpoint's metadata dict"):
        SemanticPredictor(model, ["a", "b", "c"])
    with pytest.raises(TypeError, match=re.escape("fit(TrainConfig(**cfg))")):
        fit({"model": "unet", "dataset": "shapes", "out": str(tmp_path / "run")}, log=None)
    assert not (tmp_path / "run").exists()
    assert isinstance(TrainConfig(), TrainConfig)
    ck = checkpoint(tmp_path)
    with pytest.raises(TypeError, match=re.escape("Predictor.from_checkpoint(path)")):
        predict_files(str(ck), [str(ck)], tmp_path / "out")
    from pixelwise.inference.evaluate import evaluate_checkpoint

    for bad in ([1], "num_val=1", {1: 2}):  # a list was "'list' object has no attribute 'items'"
        with pytest.raises(TypeError, match="dataset_kwargs must map the reader's option names"):
            evaluate_checkpoint(ck, "shapes", None, dataset_kwargs=bad, progress=False)


def test_a_masked_array_with_masked_pixels_is_refused_and_one_without_predicts_as_its_data():
    """Its mask was ignored without a word: the masked pixels were predicted like any others."""
    predictor = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    img = images(1)[0]
    unmasked = predictor.predict(np.ma.masked_array(img)).mask
    assert np.array_equal(unmasked, predictor.predict(img).mask)
    masked = np.ma.masked_array(img)
    masked[3, 4] = np.ma.masked
    with pytest.raises(ValueError, match=re.escape("img.filled(0)")):
        predictor.predict(masked)


def test_a_structured_array_is_told_to_stack_its_fields():
    """A [H, W] array of (r, g, b) records got the gray hint np.repeat(img[..., None], 3, -1), which
    still failed; the hint given now gives the image itself."""
    predictor = SemanticPredictor(unet(), {"model": "unet", "num_classes": 3})
    img = images(1)[0]
    records = np.zeros(img.shape[:2], dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")])
    for i, field in enumerate("rgb"):
        records[field] = img[..., i]
    with pytest.raises(ValueError) as refused:
        predictor.predict(records)
    hint = re.search(r"convert it with (np\.stack\(\[.*\], -1\))", str(refused.value)).group(1)
    assert "np.repeat" not in str(refused.value)
    fixed = eval(hint, {"np": np, "img": records})  # the hint, run as the user would
    assert np.array_equal(fixed, img)


@pytest.mark.parametrize("fields, channels, hint", [
    ("rgba", 3, "np.stack([img['r'], img['g'], img['b']], -1) (fields r, g, b, a)"),  # the alpha left out
    ("rgb", 1, "img['r'] (a field)"),  # a one-channel contract takes one field, gray
    ("ya", 3, "img['y'] (a field)"),  # under three fields: no colour image to stack
])
def test_a_structured_arrays_hint_picks_the_fields_the_contract_takes(fields, channels, hint):
    """Three of four fields stack to the colour image; a one-channel contract, or fewer than three
    fields, is given the first field alone, which the check then takes (as a one-channel image)."""
    from pixelwise.preprocess import check_image

    img = np.arange(2 * 3 * len(fields), dtype=np.uint8).reshape(2, 3, len(fields))
    records = np.zeros((2, 3), dtype=[(f, "u1") for f in fields])
    for i, field in enumerate(fields):
        records[field] = img[..., i]
    with pytest.raises(ValueError) as refused:
        check_image(records, channels)
    assert str(refused.value).endswith(f"; convert it with {hint}")
    fixed = eval(hint.split(" (")[0], {"np": np, "img": records})  # the hint, run as the user would
    assert np.array_equal(fixed, img[..., :3] if "stack" in hint else img[..., 0])
    if channels == 1 or "stack" in hint:
        check_image(fixed, channels)


def test_train_config_takes_a_path_and_refuses_an_empty_one(tmp_path):
    """TrainConfig(out=Path(...)) was refused as "must be text"; out="" (an unset variable in a
    notebook or a recipe) trained into the default runs/<model>, which --overwrite empties."""
    from pixelwise.engine.config import TrainConfig

    assert TrainConfig(out=tmp_path / "run", data=tmp_path).out == str(tmp_path / "run")
    assert TrainConfig(data=tmp_path).data == str(tmp_path)
    for key in ("out", "data", "pretrained", "class_weights"):
        for empty in ("", "  "):
            with pytest.raises(UserError, match=f"^{key} is empty; give a path"):
                TrainConfig(**{key: empty})
    assert TrainConfig(out=None).out is None  # not given: the default folder
    with pytest.raises(UserError, match=re.escape("max_minutes is empty; give a value (or none)")):
        TrainConfig(max_minutes=" ")  # as --max-minutes ' ' is: only the word none clears it
    assert TrainConfig(max_minutes="none").max_minutes is None


def test_shapes_size_is_bounded_by_the_pixel_limit_as_image_files_are():
    """size=400000 made numpy's MemoryError ("Unable to allocate 596 GiB") at the first sample."""
    from pixelwise.data.io import max_image_pixels
    from pixelwise.data.shapes import ShapesDataset

    side = int(max_image_pixels() ** 0.5)
    assert ShapesDataset(size=side, num_train=1).size == side
    with pytest.raises(UserError, match=r"shapes size \d+ makes images of [\d,]+ pixels, above the limit"):
        ShapesDataset(size=side + 1, num_train=1)


def test_shapes_size_at_exactly_the_pixel_limit_is_taken():
    """The limit is the most pixels an image may have (as for image files): under --max-pixels 4096
    a 64x64 shapes image (4,096 pixels) is made, a 65x65 one is refused."""
    from pixelwise.data.io import set_max_image_pixels
    from pixelwise.data.shapes import ShapesDataset

    set_max_image_pixels(64 * 64)
    try:
        assert ShapesDataset(size=64, num_train=1).load(0).image.shape == (64, 64, 3)
        with pytest.raises(UserError, match=r"shapes size 65 makes images of 4,225 pixels, above the limit of 4,096"):
            ShapesDataset(size=65, num_train=1)
    finally:
        set_max_image_pixels(None)


@pytest.mark.parametrize("names, words", [
    (["a", "b", "a"], "classes 0 and 2 are both named 'a'"),
    (["a", " ", "c"], "class 1 has an empty name"),
])
def test_class_names_given_twice_or_empty_are_refused_where_they_are_made(tmp_path, names, words):
    """They were saved and scored: reports, the legend and the server's answers could not tell the
    two classes apart. A checkpoint that holds them is still read (older files may)."""
    from pixelwise.checkpoint import atomic_save_tensors, read_checkpoint

    meta = {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4}, "class_names": names}
    with pytest.raises(ValueError, match=re.escape(words)):
        pixelwise.save_checkpoint(tmp_path / "s.safetensors", unet(), meta)
    assert not (tmp_path / "s.safetensors").exists()
    good = checkpoint(tmp_path, "g", class_names=["a", "b", "c"])
    tensors, saved = read_checkpoint(good)
    old = {"pixelwise": json.dumps({**saved, "class_names": names})}
    atomic_save_tensors(tensors, tmp_path / "old.safetensors", old)
    assert pixelwise.load_checkpoint(tmp_path / "old.safetensors")[1]["class_names"] == names


def test_prediction_options_are_taken_at_their_bounds_and_refused_one_step_past_them():
    """The documented ranges, bounds included: batch_size from 1 to 4,096, mc_samples from 0 to
    1,000, score_thresh in [0, 1]; one step past each bound is a UserError that names the range."""
    meta = {"model": "unet", "num_classes": 3}
    model = unet()
    for size in (1, 4096):
        assert SemanticPredictor(model, meta, batch_size=size).batch_size == size
    for size in (0, 4097):
        with pytest.raises(UserError, match=f"--batch-size must be from 1 to 4,096, got {size}"):
            SemanticPredictor(model, meta, batch_size=size)
    assert MAX_MC_SAMPLES == 1000
    for samples in (0, 1000):
        check_mc_samples(samples)  # taken: no error
    for samples in (-1, 1001):
        with pytest.raises(UserError, match=f"--mc-samples must be from 0 to 1,000, got {samples}"):
            check_mc_samples(samples)
    torch.manual_seed(0)
    mask_rcnn = pixelwise.create_model("maskrcnn_resnet18_fpn", num_classes=3)
    for thresh in (0.0, 1.0):
        assert InstancePredictor(mask_rcnn, score_thresh=thresh).score_thresh == thresh
    for thresh in (-0.01, 1.01):
        with pytest.raises(UserError, match=re.escape(f"--score-thresh must be in [0, 1], got {thresh}")):
            InstancePredictor(mask_rcnn, score_thresh=thresh)


# --- 13th pass: a notebook user's hand-made arguments --------------------------------------------

@pytest.mark.parametrize("meta, words", [
    ({"palette": "red"}, "palette must be a list of [r, g, b] colours with values 0 to 255, and holds 'red'"),
    ({"palette": [[0, 0, 0], [1, 1, 1], [300, 0, 0]]}, "and holds [300, 0, 0]"),
    ({"palette": [[0, 0, 0]]}, "palette must hold a colour for each of the 3 classes, and holds 1"),
    ({"class_names": "abc"}, "class_names must be a list of names (text), one per class, and is 'abc'"),
    ({"num_classes": "3"}, "num_classes must be a whole number >= 1, and is '3'"),
])
def test_a_hand_made_meta_is_checked_as_save_checkpoint_checks_it(tmp_path, meta, words):
    """The predictor took them: predict_files then failed with "not enough values to unpack" or
    "bytes must be in range(0, 256)", a one-colour palette coloured every class black, "abc" named
    the classes a, b, c, and a num_classes of "3" was "'str' object cannot be interpreted as an integer"."""
    meta = {"model": "unet", "num_classes": 3, **meta}
    with pytest.raises(ValueError, match=re.escape(words)):
        SemanticPredictor(unet(), meta)
    with pytest.raises(ValueError):  # the same meta is refused by save_checkpoint
        pixelwise.save_checkpoint(tmp_path / "s.safetensors", unet(), {"model_kwargs": {"base_channels": 4}, **meta})


def test_an_input_contract_of_null_is_refused_by_name():
    """meta["input"] = None was "'NoneType' object has no attribute 'get'" in save_checkpoint and
    in the predictor."""
    meta = {"model": "unet", "num_classes": 3, "model_kwargs": {"base_channels": 4}, "input": None}
    with pytest.raises(UserError, match=re.escape("bad input contract None")):
        SemanticPredictor(unet(), meta)
    with pytest.raises(ValueError, match=re.escape("input is not an input contract (bad input contract None")):
        pixelwise.save_checkpoint("never-written.safetensors", unet(), meta)
    assert not Path("never-written.safetensors").exists()


@pytest.mark.parametrize("options, words", [
    ({"mc_samples": None}, "--mc-samples must be a whole number, got None"),
    ({"batch_size": None}, "--batch-size must be a whole number, got None"),
    ({"tta": ["flip"]}, "--tta ['flip'] is not one of: flip, d4, ms"),
])
def test_prediction_options_of_none_or_a_list_name_the_option(options, words):
    """"'<=' not supported between instances of 'int' and 'NoneType'" and "unhashable type: 'list'"."""
    with pytest.raises(UserError, match=re.escape(words)):
        SemanticPredictor(unet(), {"model": "unet", "num_classes": 3}, **options)


def test_from_checkpoints_takes_a_generator_of_paths(tmp_path):
    """"object of type 'generator' has no len()"."""
    path = checkpoint(tmp_path)
    assert isinstance(from_checkpoints(p for p in [path, path]), EnsemblePredictor)
    assert isinstance(from_checkpoints(p for p in [path]), SemanticPredictor)
    for paths in ([path], [path, path]):  # an ensemble refuses None as one checkpoint does (it read it as 0)
        with pytest.raises(UserError, match=re.escape("--mc-samples must be a whole number, got None")):
            from_checkpoints(paths, mc_samples=None)


def test_inspect_and_evaluate_name_what_they_take_for_a_path_or_a_list():
    """Each was an AttributeError: "'list' object has no attribute 'num_classes'", "'str' object
    has no attribute 'meta'"."""
    from pixelwise.data.inspect import inspect_dataset
    from pixelwise.inference.evaluate import evaluate_instances, evaluate_semantic

    ds = build_dataset("shapes", None, "val", num_val=1, size=32)
    with pytest.raises(TypeError, match=re.escape("inspect_dataset takes a dataset reader, such as "
                                                  "pixelwise.data.build_dataset(kind, root, split), got str")):
        inspect_dataset("data/camvid")
    with pytest.raises(TypeError, match=re.escape("evaluate_semantic takes a dataset reader")):
        evaluate_semantic(SemanticPredictor(unet(4), {"model": "unet", "num_classes": 4}), [ds[0]], progress=False)
    with pytest.raises(TypeError, match=re.escape("evaluate_semantic takes a SemanticPredictor, such as "
                                                  "Predictor.from_checkpoint(path)")):
        evaluate_semantic("runs/unet/best.safetensors", ds, progress=False)
    with pytest.raises(TypeError, match=re.escape("evaluate_instances takes an InstancePredictor")):
        evaluate_instances("runs/mrcnn/best.safetensors", ds, progress=False)


def test_fit_callbacks_of_a_generator_are_called_and_one_function_is_told_to_be_listed(tmp_path, monkeypatch):
    """A generator of callbacks was used up by fit's check of them: the run trained and no
    callback was ever called, without a word; one function was "'function' object is not iterable"."""
    from pixelwise.engine import trainer
    from pixelwise.engine.config import TrainConfig

    def on_event(event, state):
        pass

    monkeypatch.setattr(trainer, "_train", lambda cfg, info, device, log, callbacks, rc: {"callbacks": list(callbacks)})
    cfg = TrainConfig(model="unet", dataset="shapes", out=str(tmp_path / "run"), device="cpu")
    assert trainer.fit(cfg, log=None, callbacks=(cb for cb in [on_event]))["callbacks"] == [on_event]
    with pytest.raises(TypeError, match=re.escape("fit: callbacks must be a list of functions of (event, state); "
                                                  "for one, callbacks=[cb]")):
        trainer.fit(cfg, log=None, callbacks=on_event)
    assert not (tmp_path / "run").exists()
