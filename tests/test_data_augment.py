"""Augmentation presets: valid mask values only, image/mask/weight/instances stay aligned."""

from __future__ import annotations

import numpy as np
import pytest

from pixelwise.data import augment
from pixelwise.data.augment import (
    Augment,
    build_transform,
    elastic_of,
    eval_preset,
    resize_of,
    resize_sample,
    train_preset,
)
from pixelwise.data.base import Sample
from pixelwise.errors import UserError
from pixelwise.preprocess import MAX_INPUT_PIXELS
from pixelwise.sample import boxes_from_masks


def _blocky(h=48, w=64, classes=5, block=8, seed=0):
    """Image whose red channel encodes the class (class*40) in constant blocks; mask = class."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, classes, (h // block, w // block)).astype(np.uint8)
    mask = np.kron(cells, np.ones((block, block), np.uint8))
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = mask * 40
    image[..., 1] = 7
    return Sample(image=image, mask=mask, weight=mask.astype(np.float32) + 1.0)


def test_crop_pad_flip_exact_alignment_and_ignore_padding():
    s = _blocky()
    t = train_preset(crop=(64, 80), scale=None, jitter=False)  # no resampling: alignment must be exact
    for seed in range(5):
        np.random.seed(seed)
        o = t(s)
        assert o.image.shape == (64, 80, 3) and o.mask.shape == (64, 80) and o.mask.dtype == np.uint8
        pad = o.mask == 255
        assert pad.sum() == 64 * 80 - 48 * 64  # exactly the padded area is ignored
        assert (o.image[pad] == 0).all() and (o.weight[pad] == 0).all()
        np.testing.assert_array_equal(o.image[~pad, 0], o.mask[~pad] * 40)
        np.testing.assert_array_equal(o.weight[~pad], o.mask[~pad] + 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_scaled_crop_keeps_valid_values_and_aligns(seed):
    s = _blocky(seed=seed)
    np.random.seed(seed)
    o = train_preset(crop=(40, 40), scale=(0.5, 2.0), jitter=True)(s)
    assert set(np.unique(o.mask)) <= set(range(5)) | {255}  # nearest: no interpolated labels
    assert set(np.unique(o.weight)) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    valid = o.mask != 255
    np.testing.assert_array_equal(o.weight[valid], o.mask[valid] + 1.0)
    # the image is bilinear: away from block edges the encoded class must agree with the mask
    if valid.sum() > 100:
        without_jitter = train_preset(crop=(40, 40), scale=(0.5, 2.0), jitter=False)
        np.random.seed(seed)
        o2 = without_jitter(s)
        m = o2.mask.astype(int)
        # interior pixels: the mask is constant over the 5x5 neighbourhood and not at the crop border
        # (nearest and bilinear sampling may put a block edge one output pixel apart)
        pad = np.pad(m, 2, mode="edge")
        interior = np.zeros_like(m, bool)
        interior[2:-2, 2:-2] = True
        for dy in range(5):
            for dx in range(5):
                interior &= pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] == m
        interior &= m != 255
        agree = np.abs(o2.image[..., 0].astype(int) - m * 40) <= 2
        assert interior.sum() > 20 and agree[interior].mean() > 0.98


def test_instances_and_boxes_follow_the_mask():
    h, w = 60, 80
    inst = np.zeros((3, h, w), bool)
    inst[0, 5:25, 5:35] = True
    inst[1, 30:55, 50:75] = True
    inst[2, 40:44, 2:6] = True
    mask = np.zeros((h, w), np.uint8)
    labels = np.array([1, 2, 3])
    for m, lab in zip(inst, labels):
        mask[m] = lab
    image = np.zeros((h, w, 3), np.uint8)
    s = Sample(image=image, mask=mask, instance_masks=inst, instance_labels=labels,
               boxes=boxes_from_masks(inst))
    t = train_preset(crop=(48, 48), scale=(0.75, 1.5), jitter=False)
    for seed in range(8):
        np.random.seed(seed)
        o = t(s)
        assert o.instance_masks.dtype == bool and o.instance_masks.shape[1:] == (48, 48)
        assert len(o.instance_masks) == len(o.instance_labels) == len(o.boxes)
        for m, lab, box in zip(o.instance_masks, o.instance_labels, o.boxes):
            assert m.any() and (o.mask[m] == lab).all()
            np.testing.assert_array_equal(box, boxes_from_masks(m[None])[0])
        kept = set(o.instance_labels.tolist())
        present = set(np.unique(o.mask).tolist()) - {0, 255}
        assert kept == present  # an instance is dropped exactly when it left the crop


def test_flip_moves_boxes():
    inst = np.zeros((1, 10, 20), bool)
    inst[0, 2:5, 1:4] = True
    s = Sample(image=np.zeros((10, 20, 3), np.uint8), mask=inst[0].astype(np.uint8),
               instance_masks=inst, instance_labels=np.array([1]), boxes=boxes_from_masks(inst))
    t = train_preset(crop=None, flip=True, jitter=False)
    seen = set()
    for seed in range(10):
        np.random.seed(seed)
        seen.add(tuple(t(s).boxes[0].tolist()))
    assert seen == {(1.0, 2.0, 4.0, 5.0), (16.0, 2.0, 19.0, 5.0)}


def test_numpy_seed_makes_it_reproducible():
    s = _blocky()
    t = train_preset(crop=(32, 32))
    np.random.seed(3)
    a = t(s)
    np.random.seed(3)
    b = t(s)
    np.random.seed(4)
    c = t(s)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_eval_preset_resize_nearest_and_identity():
    s = _blocky()
    assert eval_preset()(s) is s
    o = eval_preset((24, 32))(s)
    assert o.image.shape == (24, 32, 3) and o.mask.shape == (24, 32)
    np.testing.assert_array_equal(o.mask, s.mask[::2, ::2])  # nearest on exact halving


def test_a_resize_drops_the_instances_it_erases():
    """A 1-pixel line vanishes in a 9x11 -> 4x4 resize: its instance is dropped with its label, as
    every other geometric step does (an empty box [0, 0, 0, 0] was kept, which Mask R-CNN refuses)."""
    inst = np.zeros((3, 9, 11), bool)
    inst[0, :, 5] = True  # a vertical line in column 5: 11 -> 4 samples columns 1, 4, 6, 9
    inst[1, 4, :] = True  # a horizontal line in row 4: 9 -> 4 samples rows 1, 3, 5, 7
    inst[2, 2:8, 1:10] = True  # a block that survives
    mask = np.where(inst[2], 3, np.where(inst[0], 1, np.where(inst[1], 2, 0))).astype(np.uint8)
    s = Sample(image=np.zeros((9, 11, 3), np.uint8), mask=mask, instance_masks=inst,
               instance_labels=np.array([1, 2, 3]), boxes=boxes_from_masks(inst))
    for t in (eval_preset((4, 4)), train_preset(resize=(4, 4), flip=False, jitter=False, scale=None)):
        o = t(s)
        assert o.instance_masks.shape == (1, 4, 4) and o.instance_labels.tolist() == [3]
        assert o.boxes.tolist() == boxes_from_masks(o.instance_masks).tolist()
        assert (o.boxes[:, 2:] > o.boxes[:, :2]).all()


def test_build_transform_keys():
    t = build_transform({"crop": [32, 40], "scale": [0.5, 1.5], "flip": False, "jitter": False}, train=True)
    assert isinstance(t, Augment)
    assert [type(x).__name__ for x in t.transforms] == ["RandomScale", "PadIfNeeded", "RandomCrop"]
    assert t(_blocky()).mask.shape == (32, 40)
    assert build_transform({"crop": 16, "scale": None}, train=True)(_blocky()).mask.shape == (16, 16)
    assert build_transform({"crop": [32, 40]}, train=False).transforms == []
    assert build_transform({"resize": [24, 32]}, train=False)(_blocky()).mask.shape == (24, 32)
    assert build_transform(None, train=False)(_blocky()).mask.shape == (48, 64)
    with pytest.raises(UserError, match="'rotate'"):
        build_transform({"rotate": 10}, train=True)
    with pytest.raises(UserError, match="'crop'"):
        build_transform({"crop": [32]}, train=True)
    with pytest.raises(UserError, match="'flip'"):
        build_transform({"flip": "yes"}, train=True)
    with pytest.raises(UserError, match="'ignore_index'"):
        build_transform({"ignore_index": 300}, train=True)
    t = build_transform({"crop": [80, 80], "scale": None, "ignore_index": 7, "flip": False}, train=True)
    o = t(Sample(image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8)))
    assert (o.mask == 7).sum() == 80 * 80 - 16


def test_rotate90_with_flip_draws_the_8_symmetries_of_the_square_evenly():
    """Each output is exactly one of the 8 rotations/flips of the input (image, mask and weight
    alike), and 800 draws hit each about 100 times."""
    s = _blocky(h=32, w=32, seed=3)
    symmetries = [np.rot90(m, k) for k in range(4) for m in (s.mask, s.mask[:, ::-1])]
    assert len({m.tobytes() for m in symmetries}) == 8
    t = build_transform({"rotate90": True, "flip": True, "jitter": False}, train=True)
    counts = np.zeros(8, dtype=int)
    np.random.seed(0)
    for _ in range(800):
        o = t(s)
        hit = [k for k, m in enumerate(symmetries) if np.array_equal(o.mask, m)]
        assert len(hit) == 1
        np.testing.assert_array_equal(o.image[..., 0], o.mask * 40)
        np.testing.assert_array_equal(o.weight, o.mask + 1.0)
        counts[hit[0]] += 1
    assert counts.min() >= 65 and counts.max() <= 135, counts  # binomial(800, 1/8): sd 9.4
    assert [type(x).__name__ for x in t.transforms][:1] == ["RandomRotate90"]
    assert "RandomRotate90" not in [type(x).__name__ for x in build_transform({}, train=True).transforms]
    with pytest.raises(UserError, match="'rotate90'"):
        build_transform({"rotate90": 1}, train=True)


def test_a_scale_without_a_crop_is_refused_not_dropped():
    with pytest.raises(UserError, match="random scaling comes with a crop"):
        build_transform({"scale": [0.5, 2.0]}, train=True)
    assert "RandomScale" in repr(build_transform({"scale": [0.5, 2.0], "crop": [16, 16]}, train=True))
    assert "RandomScale" not in repr(build_transform({"scale": None}, train=True))


@pytest.mark.parametrize("size, to", [((90, 120), (60, 80)), ((90, 120), (45, 60)), ((90, 120), (63, 84)),
                                      ((120, 160), (270, 360)), ((360, 480), (270, 360))])
def test_resized_labels_stay_on_their_pixels(size, to):
    """Labels resized to a size take the label nearest each output pixel's centre, where bilinear
    image resizing samples: a ramp image and a ramp mask stay level (OpenCV's INTER_NEAREST takes
    floor(i / s), shifting labels up to a source pixel up-left of their image on every downscale)."""
    from pixelwise.preprocess import resize_image, resize_labels

    h, w = size
    rows = np.arange(h, dtype=np.float64)[:, None].repeat(w, 1)
    image = np.dstack([np.clip(rows / (h - 1) * 250, 0, 250)] * 3).round().astype(np.uint8)  # a ramp over rows
    labels = (rows / (h - 1) * 250).round().astype(np.uint8)  # the same ramp as labels
    got_image = resize_image(image, to)[..., 0].astype(np.float64)
    got_labels = resize_labels(labels, to).astype(np.float64)
    step = 250 / (h - 1)  # one source row, in ramp units
    # never further than half a source row (plus the uint8 rounding of the image), i.e. the nearest
    assert np.abs(got_labels - got_image).max() / step <= 0.5 + 1.0 / step + 1e-9
    if (h / to[0]) % 2:  # an even factor puts every centre on a tie between two rows: either is nearest
        bias = (got_labels - got_image).mean() / step  # ties break one way (OpenCV 4.9 and 5 differ): < 0.5
        assert abs(bias) < 0.4, f"labels sit {bias:+.2f} source rows from their image"


def test_resize_labels_keeps_a_single_channel_and_the_dtype():
    """OpenCV dropped the channel of [H, W, 1] and gave int64 labels back as int32."""
    from pixelwise.preprocess import resize_labels

    labels = np.arange(16, dtype=np.int64).reshape(4, 4)
    out = resize_labels(labels[..., None], (2, 2))
    assert out.shape == (2, 2, 1) and out.dtype == np.int64
    assert resize_labels(labels, (8, 8)).dtype == np.int64



def test_a_sample_without_instances_goes_through_every_augmentation():
    """An image with no object (a COCO image without annotations: kept by default) or whose objects
    a resize erased gave numpy nothing to infer -1 from in reshape: a ValueError in training."""
    inst = np.zeros((1, 40, 40), bool)
    inst[0, 1, 1] = True  # one pixel that a 5x5 resize does not sample: the flip after it then gets none
    none = np.zeros((0, 40, 40), bool)
    resize = train_preset(resize=(5, 5), jitter=False)
    cases = [(inst, np.array([1]), [resize]),
             (none, np.zeros(0, np.int64), [resize, train_preset(crop=(16, 16), jitter=False),
                                             build_transform({"elastic": {"sigma": 4, "grid": 3}, "jitter": False},
                                                             train=True)])]
    for masks, labels, transforms in cases:
        s = Sample(image=np.zeros((40, 40, 3), np.uint8), mask=masks.any(0).astype(np.uint8), instance_masks=masks,
                   instance_labels=labels, boxes=boxes_from_masks(masks))
        for t in transforms:
            o = t(s)
            assert o.instance_masks.shape == (0, *o.mask.shape) and o.instance_labels.shape == (0,)
            assert o.boxes.shape == (0, 4)


def test_documented_defaults_of_scale_and_elastic(monkeypatch):
    """docs/training.md: a crop adds random scaling 0.5-2 (the factors drawn, recorded where the
    image is scaled, not read from albumentations' version-dependent attributes); `elastic: true`
    is the U-Net paper's 3x3 grid with 10 px, and a mapping that sets one of the two keeps the
    other's default."""
    drawn: list[float] = []
    scale = augment._scale
    monkeypatch.setattr(augment, "_scale", lambda img, factor, how: drawn.append(factor) or scale(img, factor, how))
    sample = Sample(image=np.zeros((8, 8, 3), np.uint8), mask=np.zeros((8, 8), np.uint8))
    steps = {"flip": False, "jitter": False}
    for aug, (lo, hi) in [(train_preset(crop=(8, 8), **steps), (0.5, 2.0)),
                          (build_transform({"crop": [8, 8], **steps}, train=True), (0.5, 2.0)),
                          (build_transform({"crop": [8, 8], "scale": [0.75, 1.5], **steps}, train=True), (0.75, 1.5))]:
        drawn.clear()
        np.random.seed(0)
        for _ in range(300):
            aug(sample)
        # 300 uniform draws: the extremes lie within a tenth of the range's ends (chance of a miss < 1e-13)
        assert lo <= min(drawn) < lo + (hi - lo) / 10 and hi - (hi - lo) / 10 < max(drawn) <= hi, (lo, hi)
    for value, sigma, grid in [(True, 10.0, 3), ({}, 10.0, 3), ({"grid": 4}, 10.0, 4), ({"sigma": 2}, 2.0, 3)]:
        deform = elastic_of(value)
        assert (deform.sigma, deform.grid) == (sigma, grid), value


@pytest.mark.parametrize("ignore, ok", [(0, True), (255, True), (-1, False), (256, False), (True, False)])
def test_augment_ignore_index_is_a_label_value(ignore, ok):
    if ok:
        assert build_transform({"ignore_index": ignore}, train=True).ignore_index == ignore
    else:
        with pytest.raises(UserError, match="ignore_index"):
            build_transform({"ignore_index": ignore}, train=True)


def _tiny(seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 4, (3, 4)).astype(np.uint8)
    image = np.repeat((mask * 50)[..., None], 3, 2).astype(np.uint8)
    weight = rng.random((3, 4)).astype(np.float32) + 0.5
    return Sample(image=image, mask=mask, weight=weight)


def test_a_resize_moves_the_weight_map_with_the_mask():
    """resize_sample / eval_preset(resize) / train_preset(resize): the weight map is resized nearest,
    like the mask (module docstring). Reference: an exact 2x upscale repeats each pixel 2x2."""
    s = _tiny()
    up = lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1)  # noqa: E731  (nearest, integer factor)
    for out in (resize_sample(s, (6, 8)), eval_preset(resize=(6, 8))(s),
                train_preset(resize=(6, 8), scale=None, flip=False, jitter=False)(s)):
        assert out.weight.shape == (6, 8) and out.weight.dtype == np.float32
        np.testing.assert_array_equal(out.mask, up(s.mask))
        np.testing.assert_array_equal(out.weight, up(s.weight))


def test_each_call_draws_a_fresh_crop_from_the_whole_range():
    """Augment reseeds albumentations from numpy's global RNG on each call: the draws must not
    collapse onto a few pipeline seeds. A 8x8 crop (+ flip) of a 64x64 image has 57*57*2 = 6498
    equally likely outcomes; 300 calls from one numpy seed hit about 293 distinct ones (birthday
    bound), far more than 100. (A seed range of 61 values, 2*31 - 1, gives at most 61.)"""
    image = np.zeros((64, 64, 3), np.uint8)
    mask = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)  # a crop's mask tells its place
    s = Sample(image=image, mask=mask)
    t = train_preset(crop=(8, 8), scale=None, flip=True, jitter=False)
    np.random.seed(0)
    seen = {t(s).mask.tobytes() for _ in range(150)}
    np.random.seed(1)
    seen |= {t(s).mask.tobytes() for _ in range(150)}
    assert len(seen) > 100


def test_flip_and_colour_jitter_have_the_documented_strengths():
    """train_preset's docstring and docs/recipes.md's ablation table: horizontal flip p=0.5, colour
    jitter p=0.8 with brightness, contrast and saturation +-0.25 and hue +-0.02."""
    t = train_preset()
    by = {type(x).__name__: x for x in t.transforms}
    assert by["HorizontalFlip"].p == 0.5
    cj = by["ColorJitter"]
    assert cj.p == 0.8
    for name in ("brightness", "contrast", "saturation"):
        assert tuple(getattr(cj, name)) == (0.75, 1.25), name
    assert tuple(cj.hue) == (-0.02, 0.02)


@pytest.mark.parametrize("value", [[2.5, 4], [4, 7.25], 3.5, [float("inf"), 4], [float("nan"), 4]])
def test_a_size_that_is_not_a_whole_number_is_refused_not_truncated(value):
    """crop/resize take two positive integers (docs/data.md); a float with a fraction is an error,
    not silently int()-truncated (2.5 -> 2); whole floats such as 4.0 are accepted."""
    for key in ("crop", "resize"):
        with pytest.raises(UserError, match="positive integers"):
            build_transform({key: value}, train=True)
    assert build_transform({"crop": [4.0, 6.0]}, train=True).transforms  # whole floats are fine


@pytest.mark.parametrize("h, w", [(MAX_INPUT_PIXELS + 1, 1), (1, MAX_INPUT_PIXELS + 1),
                                  (MAX_INPUT_PIXELS // 2 + 1, 2)])
def test_the_pixel_limit_counts_height_times_width_of_a_tall_or_wide_size(h, w):
    """The per-image pixel limit is h * w, whichever side is long (the existing tests use squares)."""
    for key in ("crop", "resize"):
        with pytest.raises(UserError, match=f"{h}x{w} is {h * w:,} pixels"):
            build_transform({key: [h, w]}, train=True)
    assert build_transform({"crop": [MAX_INPUT_PIXELS // 2, 2]}, train=True).transforms  # at the limit: allowed


def test_the_pixel_limit_is_the_documented_268_megapixels():
    """2**28 = 268,435,456 pixels (a 16384 x 16384 image) is the largest size asked for (sample.py)."""
    assert build_transform({"crop": [16384, 16384]}, train=True).transforms
    with pytest.raises(UserError, match="16384x16385 is 268,451,840 pixels per image, above 268,435,456"):
        build_transform({"resize": [16384, 16385]}, train=True)


def test_resize_of_keeps_height_and_width_apart():
    """resize_of is what the trainer stores as the checkpoint's input size: [h, w] -> (h, w),
    one int -> a square, nothing -> None."""
    assert resize_of({"resize": [3, 5]}) == (3, 5)
    assert resize_of({"resize": "7x2"}) == (7, 2)
    assert resize_of({"resize": 6}) == (6, 6)
    assert resize_of({}) is None and resize_of(None) is None


def test_build_transform_defaults_are_flip_and_jitter_without_quarter_turns():
    """build_transform's keys are all optional; their defaults are train_preset's (docs/data.md):
    flip=True, jitter=True, rotate90=False; a bool key set to false removes its step."""
    names = lambda aug: [type(t).__name__ for t in aug.transforms]  # noqa: E731
    assert names(build_transform({}, train=True)) == ["HorizontalFlip", "ColorJitter"]
    assert names(build_transform({"jitter": False}, train=True)) == ["HorizontalFlip"]
    assert names(build_transform({"flip": False}, train=True)) == ["ColorJitter"]
    assert names(build_transform({"rotate90": True, "flip": False, "jitter": False}, train=True)) == ["RandomRotate90"]


@pytest.mark.parametrize("low, ok", [(0.05, False), (0.0, False), (-0.5, False), (0.1, True)])
def test_the_smallest_random_scale_is_a_tenth(low, ok):
    """augment scale's low end must be >= MIN_SCALE = 0.1 (a smaller factor shrinks an image to less
    than a pixel); 0.1 itself is allowed."""
    cfg = {"crop": 8, "scale": [low, 1.0]}
    if ok:
        assert "RandomScale" in [type(t).__name__ for t in build_transform(cfg, train=True).transforms]
    else:
        with pytest.raises(UserError, match="need 0.1 <= low <= high"):
            build_transform(cfg, train=True)


def test_a_scale_range_starting_at_one_still_enlarges():
    """Only scale (1.0, 1.0) means no scaling: (1.0, 2.0) enlarges. A crop of the image's own size
    without flip or jitter is the image itself unless the image was scaled first."""
    s = _blocky()
    t = train_preset(crop=(48, 64), scale=(1.0, 2.0), flip=False, jitter=False)
    same = train_preset(crop=(48, 64), scale=(1.0, 1.0), flip=False, jitter=False)
    changed = 0
    for seed in range(6):
        np.random.seed(seed)
        changed += not np.array_equal(t(s).image, s.image)
        np.random.seed(seed)
        np.testing.assert_array_equal(same(s).image, s.image)
    assert changed >= 5


def test_random_scale_keeps_the_aspect_of_a_non_square_image():
    """Scale 0.5 (low = high) with a crop of the image's size: the 48x64 sample becomes 24x32 (both
    sides halved, image, mask and weight together), padded to 48x64 with ignore around it."""
    s = _blocky()
    t = train_preset(crop=(48, 64), scale=(0.5, 0.5), flip=False, jitter=False)
    np.random.seed(0)
    o = t(s)
    kept = np.argwhere(o.mask != 255)
    (top, left), (bottom, right) = kept.min(0), kept.max(0) + 1
    assert (bottom - top, right - left) == (24, 32) and len(kept) == 24 * 32
    np.testing.assert_array_equal(o.mask[top:bottom, left:right], s.mask[::2, ::2])  # 8-pixel blocks: exact
    np.testing.assert_array_equal(o.weight[top:bottom, left:right], s.mask[::2, ::2] + 1.0)
