import numpy as np
import pytest
import torch

from pixelwise.metrics import ConfusionMeter, confusion_matrix, segmentation_metrics


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    # truth 0: pred 0,1 ; truth 1: pred 1,1,0 ; truth 2: pred 2,0 ; the 255 pixel is ignored
    expected = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert torch.equal(cm, expected)
    m = segmentation_metrics(cm, ["a", "b", "c"])
    assert m["pixel_acc"] == pytest.approx(4 / 7)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    ious = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
    assert [c["iou"] for c in m["per_class"]] == pytest.approx(ious)
    assert m["mIoU"] == pytest.approx(sum(ious) / 3)
    assert m["fwIoU"] == pytest.approx(2 / 7 * ious[0] + 3 / 7 * ious[1] + 2 / 7 * ious[2])
    dice = [2 * 1 / (2 + 3), 2 * 2 / (3 + 3), 2 * 1 / (2 + 1)]
    assert m["dice"] == pytest.approx(sum(dice) / 3)


def test_absent_class_rule():
    # class 2 absent from truth and prediction -> null and left out; class 3 predicted only -> IoU 0
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])
    m = segmentation_metrics(confusion_matrix(pred, target, 4))
    pc = m["per_class"]
    assert pc[2]["iou"] is None and pc[2]["acc"] is None and pc[2]["dice"] is None
    assert pc[3]["iou"] == 0.0 and pc[3]["acc"] is None
    assert m["mIoU"] == pytest.approx((1 / 2 + 1.0 + 0.0) / 3)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 1.0) / 2)


def test_one_pixel_class_has_an_accuracy_and_rows_carry_names_and_pixels():
    # class 1 has exactly one ground-truth pixel, predicted as 0: its accuracy is 0/1 = 0 (not null),
    # so the class average is (2/2 + 0/1) / 2 = 0.5
    target = torch.tensor([0, 0, 1])
    pred = torch.tensor([0, 0, 0])
    m = segmentation_metrics(confusion_matrix(pred, target, 2), ["road", "car"])
    assert [c["acc"] for c in m["per_class"]] == [1.0, 0.0]
    assert m["mean_acc"] == pytest.approx(0.5)
    assert [c["iou"] for c in m["per_class"]] == pytest.approx([2 / 3, 0.0])
    assert [(c["name"], c["pixels"]) for c in m["per_class"]] == [("road", 2), ("car", 1)]
    unnamed = segmentation_metrics(confusion_matrix(pred, target, 2))
    assert [c["name"] for c in unnamed["per_class"]] == ["0", "1"]


def test_meter_matches_numpy_reference():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, (4, 30, 40))
    t[rng.random(t.shape) < 0.1] = 255
    p = rng.integers(0, 5, (4, 30, 40))
    meter = ConfusionMeter(5)
    for i in range(4):
        meter.update(torch.from_numpy(p[i]), torch.from_numpy(t[i]))
    ref = np.zeros((5, 5), np.int64)
    for tv, pv in zip(t.ravel(), p.ravel()):
        if tv != 255:
            ref[tv, pv] += 1
    assert np.array_equal(meter.cm.numpy(), ref)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3)
    with pytest.raises(TypeError, match="integer class labels"):  # 0.6 and 1.2 must not become 0 and 1
        confusion_matrix(torch.tensor([0.6, 1.2]), torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="integer class labels"):
        ConfusionMeter(2).update(np.array([0, 1]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 names for a 3-class"):
        segmentation_metrics(torch.eye(3, dtype=torch.int64), ["a", "b"])


def test_meter_takes_numpy_and_torch_alike():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    p = rng.integers(0, 4, (20, 30))
    a, b = ConfusionMeter(4), ConfusionMeter(4)
    a.update(p, t)
    b.update(torch.from_numpy(p), torch.from_numpy(t))
    assert torch.equal(a.cm, b.cm) and int(a.cm.sum()) == 600
