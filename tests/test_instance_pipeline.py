"""Mask R-CNN through the same CLI as the semantic models: train -> eval -> predict."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import Predictor
from pixelwise.cli import main
from pixelwise.errors import UserError
from pixelwise.inference.writers import instance_maps

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
    for key in ("mask_AP", "mask_AP50", "mask_AP75", "box_AP"):
        assert key in m and (m[key] is None or 0.0 <= m[key] <= 1.0 or np.isnan(m[key]))


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
