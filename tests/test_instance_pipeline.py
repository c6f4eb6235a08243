"""Mask R-CNN through the same CLI as the semantic models: train -> eval -> predict."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import Predictor
from pixelwise.cli import main
from pixelwise.coco_eval import encode_mask
from pixelwise.data.base import Sample
from pixelwise.data.instance_crop import InstanceCrop, object_boxes
from pixelwise.data.palette import default_palette
from pixelwise.errors import UserError
from pixelwise.inference.evaluate import read_detections
from pixelwise.inference.writers import draw_instances, instance_maps, instances_json, write_instances

DATA = '{"num_train": 8, "num_val": 4, "num_test": 3, "size": 64, "max_objects": 3}'
MODEL = '{"min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32}'


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mrcnn")
    assert main(["train", "--model", "maskrcnn_resnet18_fpn", "--dataset", "shapes", "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--lr", "1e-4", "--optimizer", "adamw", "--no-progress",
                 "--model-kwargs", MODEL, "--dataset-kwargs", DATA]) == 0
    return out


def test_train_writes_instance_metrics(run):
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs_completed"] == 1
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_loss", "mask_AP", "mask_AP50", "box_AP"} <= set(header)
    from pixelwise import load_checkpoint

    model, meta = load_checkpoint(run / "best.safetensors")
    # Mask R-CNN normalises its own input, so its contract hands it values in [0, 1]
    assert meta["task"] == "instance" and model.normalizes_input and meta["input"]["normalize"] is False


def _detections(checkpoint, image):
    predictor = Predictor.from_checkpoint(checkpoint, score_thresh=0.0)
    return predictor.predict(image)


def test_maskrcnn_detections_do_not_depend_on_how_the_checkpoint_was_written(run, tmp_path):
    """Trainer checkpoint == create_model + save_checkpoint (API) == a checkpoint written before the
    input contract existed by a trainer that switched the model's normalisation off."""
    from pixelwise import create_model, load_checkpoint, save_checkpoint
    from pixelwise.checkpoint import atomic_save_tensors, read_checkpoint
    from pixelwise.data.shapes import ShapesDataset

    image = ShapesDataset(split="test", num_test=1, size=64).load(0).image
    trained, meta = load_checkpoint(run / "best.safetensors")
    api_model = create_model(meta["model"], num_classes=meta["num_classes"], **meta["model_kwargs"])
    api_model.load_state_dict(trained.state_dict())
    api_meta = {"model": meta["model"], "num_classes": meta["num_classes"], "model_kwargs": meta["model_kwargs"]}
    save_checkpoint(tmp_path / "api.safetensors", api_model, api_meta)
    state, old_meta = read_checkpoint(run / "best.safetensors")
    old_meta = {k: v for k, v in old_meta.items() if k != "input"}
    old_meta.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                    model_kwargs={**old_meta["model_kwargs"], "normalize": False})
    atomic_save_tensors(state, tmp_path / "old.safetensors", {"pixelwise": json.dumps(old_meta)})

    ref = _detections(run / "best.safetensors", image)
    assert len(ref["scores"]) > 0
    for other in ("api.safetensors", "old.safetensors"):
        det = _detections(tmp_path / other, image)
        assert torch.equal(det["labels"], ref["labels"]), other
        torch.testing.assert_close(det["scores"], ref["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(det["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)


def test_eval_reports_coco_keys(run, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--dataset", "shapes", "--split", "test",
                 "--dataset-kwargs", DATA, "--json", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())
    for key in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "boundary_AP", "boundary_AP75"):
        assert key in m and (m[key] is None or 0.0 <= m[key] <= 1.0 or np.isnan(m[key]))
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--dataset", "shapes", "--split", "test",
                 "--dataset-kwargs", DATA, "--json", str(out), "--overwrite", "--no-progress", "--no-bf"]) == 0
    m_no_bf = json.loads(out.read_text())
    assert not any(k.startswith("boundary_") for k in m_no_bf) and m_no_bf["mask_AP"] == m["mask_AP"]


def test_predict_writes_masks_ids_overlay_and_rle(run, tmp_path):
    from pixelwise.data.shapes import ShapesDataset

    img = ShapesDataset(split="test", num_test=1, size=64).load(0).image
    Image.fromarray(img).save(tmp_path / "scene.png")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "best.safetensors"), str(tmp_path / "scene.png"),
                 "--out", str(out), "--no-progress"]) == 0
    mask = Image.open(out / "scene.png")
    assert mask.mode == "P" and mask.size == (64, 64)
    ids = np.array(Image.open(out / "scene_instances.png"))
    doc = json.loads((out / "scene.json").read_text())
    assert doc["width"] == 64 and doc["height"] == 64
    assert ids.max() <= len(doc["instances"])
    from pycocotools import mask as mask_utils

    for inst in doc["instances"]:
        rle = {"size": inst["segmentation"]["size"], "counts": inst["segmentation"]["counts"].encode()}
        assert mask_utils.decode(rle).sum() == inst["area"]
    assert Image.open(out / "scene_overlay.png").size == (64, 64)


def test_instance_maps_higher_score_wins():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # highest score first
    masks[1, 1:3, 1:3] = True
    classes, ids = instance_maps(masks, np.array([3, 1]), (4, 4))
    assert classes[1, 1] == 3 and ids[1, 1] == 1  # overlap goes to the higher score
    assert classes[2, 2] == 1 and ids[2, 2] == 2 and ids[3, 3] == 0


def test_draw_instances_names_a_label_past_the_class_names_by_its_number():
    """A label the checkpoint has no name for (here 2 of two names) is written as its number, not an IndexError."""
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:6, 2:6] = True
    img = draw_instances(np.zeros((8, 8, 3), np.uint8), masks, np.array([[1.0, 1.0, 6.0, 6.0]]), np.array([2]),
                         np.array([0.9]), ["background", "shape"])
    assert img.size == (8, 8) and np.asarray(img)[4, 4].any()  # the instance is tinted


def test_write_instances_files_of_one_detection(tmp_path):
    masks = torch.zeros((1, 8, 10), dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    det = {"masks": masks, "boxes": torch.tensor([[3.0, 2.0, 7.0, 5.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9])}
    write_instances(tmp_path, "s", np.zeros((8, 10, 3), np.uint8), det, ["background", "shape"], default_palette(2))
    expected = masks[0].numpy().astype(np.uint8)  # class 1 and instance 1 where the mask is, 0 elsewhere
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s.png")), expected)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s_instances.png")), expected)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert (doc["width"], doc["height"]) == (10, 8)
    assert [(i["id"], i["label"], i["class_name"], i["area"]) for i in doc["instances"]] == [(1, 1, "shape", 12)]


def test_fast_mode_runs_maskrcnn_in_the_devices_reduced_precision(run):
    """`--mode fast` for Mask R-CNN: the optimize_for_inference copy in bfloat16 where the CPU has bf16
    kernels (float32 elsewhere), the predictor's output contract unchanged."""
    from pixelwise.data.shapes import ShapesDataset
    from pixelwise.models.maskrcnn.fast import FastMaskRCNN, reduced_precision_dtype

    predictor = Predictor.from_checkpoint(run / "best.safetensors", score_thresh=0.0, mode="fast")
    assert isinstance(predictor.runner, FastMaskRCNN)
    assert predictor.runner.dtype == reduced_precision_dtype(torch.device("cpu"))
    image = ShapesDataset(split="test", num_test=1, size=64).load(0).image
    det = predictor.predict(image)
    assert det["masks"].dtype == torch.bool and det["masks"].shape[1:] == (64, 64)
    assert det["boxes"].dtype == det["scores"].dtype == torch.float32


@pytest.mark.slow
def test_bfloat16_fast_path_keeps_a_trained_detectors_detections(tmp_path):
    """The issue's criterion on a trained detector (not the fixture's random heads, which have no
    margin between boxes): ResNet-18-FPN trained 4 minutes on 96-px shapes; the bfloat16 fast path
    keeps >= 95% of eager's detections above 0.5 at box IoU >= 0.9 (the 15-minute recipe: 98.8%)."""
    from pixelwise import load_checkpoint
    from pixelwise.data.shapes import ShapesDataset
    from pixelwise.models.maskrcnn.fast import detection_agreement, optimize_for_inference, reduced_precision_dtype

    if reduced_precision_dtype(torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU has no fast bfloat16")
    assert main(["train", "--config", "maskrcnn_shapes_cpu", "--out", str(tmp_path), "--max-minutes", "4",
                 "--no-progress"]) == 0
    model, _ = load_checkpoint(tmp_path / "last.safetensors")
    fast = optimize_for_inference(model)
    assert fast.dtype == torch.bfloat16
    ds = ShapesDataset(split="test", num_test=100)
    matched = total = 0
    for i in range(len(ds)):
        x = torch.from_numpy(ds.load(i).image).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            reference = model([x])[0]
        m, t = detection_agreement(reference, fast([x])[0])
        matched, total = matched + m, total + t
    assert total >= 100
    assert matched / total >= 0.95


def _mixed_size_coco(root):
    """A COCO split of four images of four sizes, one disc each (category id 5)."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate([(96, 128), (64, 80), (120, 90), (100, 60)]):
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 4) ** 2).astype(np.uint8)
        image = np.full((h, w, 3), 40, np.uint8)
        image[disc > 0] = (220, 40, 40)
        for split in ("train2017", "val2017"):
            Image.fromarray(image).save(root / split / f"{i}.png")
        ys, xs = np.nonzero(disc)
        rle = mask_utils.encode(np.asfortranarray(disc))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 5, "iscrowd": 0, "area": float(disc.sum()),
                            "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                            "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    (root / "annotations").mkdir(exist_ok=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 5, "name": "disc"}]}))
    return root


def test_maskrcnn_trains_on_images_of_different_sizes_in_one_batch(tmp_path, capsys):
    """Mask R-CNN takes a list of images of any sizes: a COCO set of mixed sizes trains and
    validates with batches of several images (it stacked them, and crashed, before)."""
    data = _mixed_size_coco(tmp_path / "coco")
    out = tmp_path / "run"
    args = ["train", "--model", "maskrcnn_resnet18_fpn", "--dataset", "coco", "--data", str(data), "--epochs", "1",
            "--batch-size", "2", "--no-progress", "--model-kwargs", MODEL]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 1
    from pixelwise.checkpoint import read_checkpoint

    assert read_checkpoint(out / "best.safetensors")[1]["category_ids"] == [0, 5]  # predictions' category_id
    # its own resizing is the model's: an augment resize (which validation could not score) is refused
    assert main([*args, "--out", str(tmp_path / "resized"), "--augment", '{"resize": [64, 64]}']) == 2
    assert "min_size" in capsys.readouterr().err and not (tmp_path / "resized").exists()


def test_a_score_threshold_that_is_not_a_number_is_named(run):
    with pytest.raises(UserError, match="--score-thresh must be a number, got '0.5'"):
        Predictor.from_checkpoint(run / "best.safetensors", score_thresh="0.5")


def test_object_boxes_keeps_every_nonempty_instance_and_drops_only_empty_ones():
    """The suite's only instance mask sat at the origin (x1 = y1 = 0), so a filter comparing y2 with
    x1 (instead of y2 with y1, or x2 with x1) passed. Hand-computed boxes (x2/y2 exclusive):
    a 10 x 4 object at x 30..39, y 0..3 -> [30, 0, 40, 4]; a 2 x 12 object at x 1..2, y 20..31
    -> [1, 20, 3, 32]; an empty mask is dropped."""
    inst = np.zeros((3, 40, 60), bool)
    inst[0, 0:4, 30:40] = True
    inst[2, 20:32, 1:3] = True  # inst[1] stays empty
    s = Sample(image=np.zeros((40, 60, 3), np.uint8), mask=np.zeros((40, 60), np.uint8),
               instance_masks=inst, instance_labels=np.array([1, 1, 1]), boxes=np.zeros((3, 4), np.float32))
    assert object_boxes(s).tolist() == [[30, 0, 40, 4], [1, 20, 3, 32]]


def test_object_boxes_from_the_semantic_mask_finds_every_component_or_none():
    """Every suite case had exactly one object, so reshape(1, 4) in place of reshape(-1, 4) passed.
    Hand-computed (8-connectivity, per class, background 0 and ignore 255 skipped): class 1 has
    two components, a diagonal pair counts as one; class 2 one; ignore none."""
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 1:4] = 1          # [1, 1, 4, 3]
    mask[5, 8], mask[6, 9] = 1, 1  # diagonal neighbours: one component [8, 5, 10, 7]
    mask[8:10, 0:2] = 2         # [0, 8, 2, 10]
    mask[0, 11] = 255
    s = Sample(image=np.zeros((10, 12, 3), np.uint8), mask=mask)
    assert sorted(object_boxes(s).tolist()) == sorted([[1, 1, 4, 3], [8, 5, 10, 7], [0, 8, 2, 10]])
    empty = Sample(image=np.zeros((10, 12, 3), np.uint8), mask=np.where(mask == 255, 255, 0).astype(np.uint8))
    assert object_boxes(empty).shape == (0, 4)


def test_instance_crop_window_follows_a_non_square_output_size():
    """Every suite case used a square size, so mixing up h and w (or an aspect of 1) passed.
    Hand-computed for size (h, w) = (10, 20), context 1: box [30, 10, 40, 20] -> h = max(10, 10 / 2)
    = 10, w = 20, centre (15, 35) -> window (y0, x0, h, w) = (10, 25, 10, 20); the crop is already
    10 x 20, so column c of the output holds image column 25 + c."""
    crop = InstanceCrop((10, 20), context=1.0)
    assert crop.size == (10, 20)
    assert crop.window(np.array([30, 10, 40, 20], np.float32)) == (10, 25, 10, 20)
    # a tall box with context 2: h = max(20 * 2, 4 * 2 / 2) = 40, w = 80, centre (20, 32)
    assert InstanceCrop((10, 20), context=2.0).window(np.array([30, 10, 34, 30], np.float32)) == (0, -8, 40, 80)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:40] = 2
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = np.arange(60)[None, :]
    out = crop(Sample(image=img, mask=mask))
    assert out.image.shape == (10, 20, 3) and out.mask.shape == (10, 20)
    assert out.image[0, :, 0].tolist() == list(range(25, 45))
    assert (out.mask[:, 5:15] == 2).all() and (out.mask[:, :5] == 0).all()


def test_instance_crop_refuses_a_context_that_is_not_positive():
    """Docstring/constructor: context must be positive; 0.5 (a tight crop) is allowed."""
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="context must be positive"):
            InstanceCrop((8, 8), context=bad)
    assert InstanceCrop((8, 8), context=0.5).context == 0.5


def test_instance_crop_pads_the_image_with_0_and_resizes_an_objectless_sample_whole():
    """Module docstring: outside the image the window is padded (image 0, mask ignore); a sample
    without objects is resized whole. Neither the image padding value nor the objectless path was
    checked. Hand-computed: object [0, 0, 4, 4], size 8, context 2 -> window (-2, -2, 8, 8)."""
    img = np.full((20, 20, 3), 50, np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[0:4, 0:4] = 1
    out = InstanceCrop((8, 8), context=2.0)(Sample(image=img, mask=mask))
    assert (out.image[:2] == 0).all() and (out.image[:, :2] == 0).all() and (out.image[2:, 2:] == 50).all()
    assert (out.mask[:2] == 255).all() and (out.mask[2:6, 2:6] == 1).all()
    # no object: the whole 6 x 8 sample, already the output size, comes back unchanged
    img2 = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    mask2 = np.zeros((6, 8), np.uint8)
    mask2[5, 7] = 255
    whole = InstanceCrop((6, 8))(Sample(image=img2, mask=mask2))
    assert np.array_equal(whole.image, img2) and np.array_equal(whole.mask, mask2)


def test_instance_crop_of_a_sample_with_no_instance_masks_gives_an_empty_stack_of_the_output_size():
    """A sample whose instance_masks is an empty [0, H, W] stack falls back to the class mask's
    components and must come out with a [0, oh, ow] stack (not [0, H, W]); unchecked before."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:10] = 1
    s = Sample(image=np.zeros((20, 30, 3), np.uint8), mask=mask, instance_masks=np.zeros((0, 20, 30), bool),
               instance_labels=np.zeros(0, np.int64), boxes=np.zeros((0, 4), np.float32))
    out = InstanceCrop((8, 12), context=1.5)(s)
    assert out.instance_masks.shape == (0, 8, 12) and len(out.instance_labels) == 0


def test_eval_predictions_of_an_instance_model_gives_eval_checkpoints_numbers(run, tmp_path):
    """predict --score-thresh 0 keeps every detection the model gives, as eval ranks them: the AP of
    its <stem>.json files is eval --checkpoint's, key for key (scores and boxes are written as the
    float32 values they are)."""
    from pixelwise.data.shapes import ShapesDataset

    ds = ShapesDataset(split="test", **json.loads(DATA))
    (tmp_path / "in").mkdir()
    for i in range(len(ds)):
        sample = ds.load(i)
        Image.fromarray(sample.image).save(tmp_path / "in" / f"{sample.name}.png")
    from pixelwise import create_model, load_checkpoint, save_checkpoint

    # every detection the model scores (its box_score_thresh at 0): a one-epoch model may give none
    # above 0.05, and the two evaluations should rank many, not agree on nothing
    trained, meta = load_checkpoint(run / "best.safetensors")
    kwargs = {**meta["model_kwargs"], "box_score_thresh": 0.0}
    model = create_model(meta["model"], meta["num_classes"], **kwargs)
    model.load_state_dict(trained.state_dict())
    save_checkpoint(tmp_path / "all.safetensors", model, {**meta, "model_kwargs": kwargs})
    ck, out = str(tmp_path / "all.safetensors"), tmp_path / "pred"
    assert main(["predict", "--checkpoint", ck, str(tmp_path / "in"), "--out", str(out), "--score-thresh", "0",
                 "--no-progress"]) == 0
    scored = [tmp_path / "ck.json", tmp_path / "pred.json"]
    common = ["--dataset", "shapes", "--split", "test", "--dataset-kwargs", DATA, "--no-progress"]
    assert main(["eval", "--checkpoint", ck, *common, "--json", str(scored[0])]) == 0
    assert main(["eval", "--predictions", str(out), *common, "--json", str(scored[1])]) == 0
    by_model, by_files = (json.loads(p.read_text()) for p in scored)
    keys = [k for k in by_model if k.startswith(("mask_", "box_", "boundary_"))]
    found = [len(json.loads(p.read_text())["instances"]) for p in out.glob("*.json")]
    assert len(keys) == 18 and len(found) == len(ds) and min(found) >= 10  # many detections to rank
    assert {k: by_files[k] for k in keys} == {k: by_model[k] for k in keys}  # --json writes NaN as null
    records = by_files["provenance"]["predictions"]["records"]
    assert len(records) == 1 and records[0]["score_thresh"] == 0.0


def _truth_json(sample, names, **change) -> dict:
    """The ground truth of ``sample`` written as predict writes detections, each object with score 0.9."""
    from pixelwise.coco_eval import encode_mask

    instances = []
    for k, (mask, label, box) in enumerate(zip(sample.instance_masks, sample.instance_labels, sample.boxes)):
        rle = encode_mask(mask)
        instances.append({"id": k + 1, "label": int(label), "class_name": names[int(label)], "score": 0.9,
                          "box": [float(v) for v in box], "area": int(mask.sum()),
                          "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    doc = {"width": sample.image.shape[1], "height": sample.image.shape[0], "instances": instances}
    for key, value in change.items():
        doc["instances"][0][key] = value
    return doc


def test_eval_predictions_of_the_ground_truth_scores_one_and_names_a_bad_file(tmp_path, capsys):
    from pixelwise.data.shapes import CLASS_NAMES, ShapesDataset
    from pixelwise.inference.evaluate import evaluate_predictions

    kwargs = {"num_val": 3, "size": 48, "max_objects": 3}
    ds = ShapesDataset(split="val", **kwargs)
    for i in range(len(ds)):
        sample = ds.load(i)
        (tmp_path / f"{sample.name}.json").write_text(json.dumps(_truth_json(sample, CLASS_NAMES)))
    metrics = evaluate_predictions(tmp_path, "shapes", None, "val", dataset_kwargs=kwargs, bf=False, progress=False)
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["box_AP"] == pytest.approx(1.0)
    assert metrics["provenance"]["predictions"]["records"] == [None]  # no mask PNG beside: no record
    first = ds.load(0)
    for change, words in (({"label": 9}, "instance 1 has label 9, not one of the data's classes 1-3"),
                          ({"class_name": "square"}, "which the data names"),
                          ({"score": 1.5}, "has score 1.5, not a number in [0, 1]"),
                          ({"box": [1, 2, 3]}, "not four numbers"),
                          ({"segmentation": {"size": [48, 40], "counts": "PP"}}, "has an RLE of size [48, 40]"),
                          ({"segmentation": {"size": [48, 48], "counts": "0"}}, "cover")):
        (tmp_path / f"{first.name}.json").write_text(json.dumps(_truth_json(first, CLASS_NAMES, **change)))
        with pytest.raises(UserError, match=re.escape(words)):
            evaluate_predictions(tmp_path, "shapes", None, "val", dataset_kwargs=kwargs, bf=False, progress=False)
    (tmp_path / f"{first.name}.json").write_text("{")
    assert main(["eval", "--predictions", str(tmp_path), "--dataset", "shapes", "--split", "val",
                 "--dataset-kwargs", json.dumps(kwargs), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pixelwise: error: {tmp_path / first.name}.json: not readable"), err
    assert len(err.splitlines()) == 1



def test_eval_predictions_refuses_a_coco_xywh_box_rather_than_scoring_it_as_corners(tmp_path):
    """Another tool's <stem>.json with COCO boxes [x, y, width, height]: read as x1, y1, x2, y2 it
    gave corners with x2 < x1, and box AP fell to about a third without a word."""
    from pixelwise.data.shapes import CLASS_NAMES, ShapesDataset
    from pixelwise.inference.evaluate import evaluate_predictions

    kwargs = {"num_val": 2, "size": 48, "max_objects": 3}
    ds = ShapesDataset(split="val", **kwargs)
    for i in range(len(ds)):
        sample = ds.load(i)
        doc = _truth_json(sample, CLASS_NAMES)
        for inst in doc["instances"]:
            x1, y1, x2, y2 = inst["box"]
            inst["box"] = [x1 + 10, y1 + 10, 2.0, 2.0]  # x, y, width, height of a small object past x = 2
        (tmp_path / f"{sample.name}.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape("whose x2 < x1 or y2 < y1: not the corners x1, y1, x2, y2")):
        evaluate_predictions(tmp_path, "shapes", None, "val", dataset_kwargs=kwargs, bf=False, progress=False)


def _block(h, w, top, left, bottom, right):
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.mark.parametrize(("boxes", "masks", "want"), [
    ([[10, 8, 40, 32]], [_block(64, 64, 8, 10, 40, 50)], (1, 1)),  # COCO x, y, w, h of the mask; x2 >= x1 all the same
    ([[10, 8, 50, 40]], [_block(64, 64, 8, 10, 40, 50)], None),  # its corners
    ([[2, 3, 20, 20]], [_block(48, 48, 3, 2, 23, 22)], None),  # near the origin: too close to tell (IoU 0.77)
    ([[1, 1, 10, 10]], [_block(48, 48, 1, 1, 11, 11)], None),  # a mask a pixel past its box (a pasted mask)
    ([[0, 0, 30, 30]], [_block(48, 48, 5, 5, 20, 20)], None),  # a model's box around a smaller mask
    ([[0, 0, 20, 20]], [_block(48, 48, 0, 0, 20, 20)], None),  # at the origin both readings are one box
    ([[2, 3, 20, 20]], [np.zeros((48, 48), bool)], None),  # an empty mask says nothing
    # a flat mask, rows 1-4: its extent [4, 1, 14, 5] to its last row is the x, y, w, h reading (IoU 1, not 0.45)
    ([[4, 1, 10, 4]], [_block(32, 32, 1, 4, 5, 14)], (1, 1)),
    ([[10, 8, 40, 1]], [_block(64, 64, 8, 10, 9, 50)], (1, 1)),  # a mask one row high, a line
    ([[10, 8, 40, 32], [5, 5, 9, 9], [6, 6, 15, 15]],  # one of three fits as x, y, w, h: not more than half
     [_block(64, 64, 8, 10, 40, 50), _block(64, 64, 5, 5, 9, 9), _block(64, 64, 6, 6, 15, 15)], None),
    ([[10, 8, 40, 32], [4, 4, 10, 10], [6, 6, 15, 15]],  # two of three do
     [_block(64, 64, 8, 10, 40, 50), _block(64, 64, 4, 4, 14, 14), _block(64, 64, 6, 6, 15, 15)], (2, 3)),
])
def test_corners_misread_tells_a_width_height_box_from_corners_by_its_mask(boxes, masks, want):
    from pixelwise.inference.evaluate import corners_misread

    assert corners_misread([[float(v) for v in b] for b in boxes], masks) == want


def test_eval_predictions_refuses_width_height_boxes_that_pass_as_corners(tmp_path):
    """A COCO box [x, y, width, height] with width >= x and height >= y passed the corner check
    (x2 >= x1, y2 >= y1) and was scored as a smaller box: box AP fell without a word."""
    from pixelwise.coco_eval import encode_mask
    from pixelwise.inference.evaluate import read_detections

    def doc(box):
        rle = encode_mask(_block(64, 64, 8, 10, 40, 50))
        return {"width": 64, "height": 64, "instances": [
            {"label": 1, "score": 0.9, "box": box,
             "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}}]}

    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc([10, 8, 50, 40])))
    assert read_detections(path, (64, 64), ["background", "a"])["boxes"].tolist() == [[10, 8, 50, 40]]
    path.write_text(json.dumps(doc([10, 8, 40, 32])))
    with pytest.raises(UserError, match=re.escape("the boxes of 1 of its 1 instances fit their masks as [x, y, "
                                                  "width, height] (COCO's bbox)")):
        read_detections(path, (64, 64), ["background", "a"])


def test_eval_predictions_missing_the_first_images_detections_names_it_rather_than_scoring_the_pngs(tmp_path):
    """predict writes <stem>.png (the class map) beside <stem>.json: with the first image's .json gone
    the folder was taken for masks and scored as semantic ones (mIoU, no AP) without a word."""
    from pixelwise.data.shapes import CLASS_NAMES, ShapesDataset
    from pixelwise.inference.evaluate import evaluate_predictions

    kwargs = {"num_val": 3, "size": 48, "max_objects": 3}
    ds = ShapesDataset(split="val", **kwargs)
    for i in range(len(ds)):
        sample = ds.load(i)
        Image.fromarray(sample.mask).save(tmp_path / f"{sample.name}.png")
        if i:
            (tmp_path / f"{sample.name}.json").write_text(json.dumps(_truth_json(sample, CLASS_NAMES)))
    first = ds.load(0).name
    with pytest.raises(UserError, match=re.escape(f"has no detections {first}.json")):
        evaluate_predictions(tmp_path, "shapes", None, "val", dataset_kwargs=kwargs, bf=False, progress=False)


def _one_detection(tmp_path, **change):
    """A <stem>.json of one 8x8 image holding one detection (a 2x3 block, class 1 of 3), with ``change``."""
    mask = np.zeros((8, 8), bool)
    mask[1:3, 2:5] = True
    rle = encode_mask(mask)
    inst = {"label": 1, "class_name": "a", "score": 0.5, "box": [2.0, 1.0, 5.0, 3.0],
            "segmentation": {"size": [8, 8], "counts": rle["counts"].decode("ascii")}}
    inst.update(change)
    for key in [k for k, v in inst.items() if v is None]:
        del inst[key]
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"width": 8, "height": 8, "instances": [inst]}))
    return path, mask


def test_read_detections_refuses_a_label_one_past_the_classes_and_a_bool_score_or_box(tmp_path):
    """Labels are 1..len(class_names)-1 (0 is background): label 3 of 3 names is outside even without a
    class_name to compare; true is not the score 1 nor a coordinate (JSON's booleans are not numbers), and
    a score written as text is a refusal, not a TypeError from the finiteness check."""
    names = ["background", "a", "b"]
    path, mask = _one_detection(tmp_path, label=2, class_name=None)
    det = read_detections(path, (8, 8), names)
    assert det["labels"].tolist() == [2] and det["scores"].tolist() == [0.5]
    assert det["boxes"].tolist() == [[2.0, 1.0, 5.0, 3.0]] and np.array_equal(det["masks"][0].numpy(), mask)
    for change, words in (({"label": 3, "class_name": None}, "has label 3, not one of the data's classes 1-2"),
                          ({"score": True}, "has score True, not a number in [0, 1]"),
                          ({"score": "0.5"}, "has score '0.5', not a number in [0, 1]"),
                          ({"box": [2, 1, True, 3]}, "not four numbers")):
        path, _ = _one_detection(tmp_path, **change)
        with pytest.raises(UserError, match=re.escape(words)):
            read_detections(path, (8, 8), names)


def test_read_detections_says_a_class_name_that_is_not_text_is_not_text(tmp_path):
    """A class_name of 1 (a number, not a name) is refused as not text, rather than as the name of
    another class than the data's."""
    for name in (1, ["a"]):
        path, _ = _one_detection(tmp_path, class_name=name)
        with pytest.raises(UserError, match=re.escape(f"instance 1 has class_name {name!r}, not text")):
            read_detections(path, (8, 8), ["background", "a", "b"])


def test_read_detections_refuses_a_category_id_that_is_not_the_datas_id_of_its_named_class(tmp_path):
    """A predict file of a model trained on data whose "a" had COCO id 3, scored on data whose "a" has
    id 5: eval --checkpoint refuses that pairing by its category ids, but with a class_name present
    the file's category_id was never compared, and the detections were scored without a word."""
    names, ids = ["background", "a", "b"], [0, 5, 9]
    path, _ = _one_detection(tmp_path, category_id=5)
    assert read_detections(path, (8, 8), names, ids)["labels"].tolist() == [1]
    path, _ = _one_detection(tmp_path, category_id=3)
    with pytest.raises(UserError, match=re.escape("has label 1 and category_id 3, but the data's class 1 'a' "
                                                  "has category id 5")):
        read_detections(path, (8, 8), names, ids)


def test_read_detections_names_a_missing_width_or_height_as_missing(tmp_path):
    """A hand-written file without "width" was refused as "for a Nonex8 image"."""
    path, _ = _one_detection(tmp_path)
    doc = json.loads(path.read_text())
    del doc["width"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError) as err:
        read_detections(path, (8, 8), ["background", "a", "b"])
    assert "None" not in str(err.value) and "width" in str(err.value), str(err.value)


def test_instances_json_writes_float32_scores_and_boxes_that_read_back_unchanged(tmp_path):
    """predict's <stem>.json holds each score and box coordinate as the shortest decimal of its float32
    (0.1, not 0.10000000149011612 nor a rounded 0.12346), so read_detections gets the model's float32
    values back bit for bit (and eval --predictions ranks them as eval --checkpoint does)."""
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 3:6, 2:7] = True
    det = {"masks": masks, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.1, 0.123456789]),
           "boxes": torch.tensor([[1.0, 1.0, 4.0, 3.0], [2.25, 3.0, 6.999999, 5.5]])}
    doc = instances_json(det, (6, 7), ["background", "a", "b"])
    assert [(i["label"], i["class_name"], i["area"]) for i in doc["instances"]] == [(1, "a", 6), (2, "b", 15)]
    text = json.dumps(doc)
    assert '"score": 0.1,' in text and '"score": 0.12345679,' in text and "6.999999" in text
    (tmp_path / "x.json").write_text(text)
    back = read_detections(tmp_path / "x.json", (6, 7), ["background", "a", "b"])
    assert torch.equal(back["scores"], det["scores"]) and torch.equal(back["boxes"], det["boxes"])
    assert torch.equal(back["labels"], det["labels"]) and torch.equal(back["masks"], masks)


def test_instance_crop_pads_the_weight_map_with_0_outside_the_image():
    """Module docstring: outside the image the window is padded with weight 0 (no loss there). The
    only weight-map test compared InstanceCrop with itself, so any fill passed. Hand-computed as
    above: object [0, 0, 4, 4], size 8, context 2 -> window (-2, -2, 8, 8), already the output size."""
    mask = np.zeros((20, 20), np.uint8)
    mask[0:4, 0:4] = 1
    weight = np.full((20, 20), 3.0, np.float32)
    out = InstanceCrop((8, 8), context=2.0)(Sample(image=np.zeros((20, 20, 3), np.uint8), mask=mask, weight=weight))
    assert out.weight.shape == (8, 8)
    assert (out.weight[:2] == 0).all() and (out.weight[:, :2] == 0).all() and (out.weight[2:, 2:] == 3).all()


def test_instance_crop_resizes_the_image_bilinearly_and_the_mask_by_nearest():
    """The crop is resized with the image interpolated linearly (labels by nearest); no test
    resampled a crop, so resizing the image by nearest passed. Hand-computed: box [30, 10, 40, 20],
    size (20, 40), context 1 -> window (10, 25, 10, 20), upscaled 2x; output column x reads window
    column x / 2 - 1/4 (pixel centres), clamped to [0, 19]; on the ramp 4 * column that is
    4 * (25 + x / 2 - 1/4) = 99 + 2 x inside, 100 and 176 at the two ends."""
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:40] = 2
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = 4 * np.arange(60)[None, :]
    out = InstanceCrop((20, 40), context=1.0)(Sample(image=img, mask=mask))
    want = [100] + [99 + 2 * x for x in range(1, 39)] + [176]
    assert out.image.shape == (20, 40, 3)
    for row in out.image[..., 0]:
        assert row.tolist() == want
    assert set(np.unique(out.mask)) == {0, 2} and (out.mask[:, 10:30] == 2).all()
