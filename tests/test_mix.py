"""ClassMix (pixelwise.data.mix.class_mix) against a naive per-pixel reading of its definition."""

import pytest
import torch

from pixelwise.data.mix import class_mix
from pixelwise.engine.config import TrainConfig
from pixelwise.errors import UserError


def batch_of(n, classes=5, size=12, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, classes, (n, size, size), generator=g)
    if ignore:
        mask[:, :2] = 255
    return {"image": torch.rand(n, 3, size, size, generator=g), "mask": mask,
            "weight": torch.rand(n, size, size, generator=g), "name": [f"im{i}" for i in range(n)]}


def test_every_image_gets_half_the_classes_of_the_next_one_with_their_labels_and_weights():
    b = batch_of(4)
    torch.manual_seed(1)
    m = class_mix(b, 1.0)
    assert m["name"] == b["name"]
    for i in range(4):
        j = (i + 1) % 4
        pasted = m["mask"][i] != b["mask"][i]
        # the pasted classes: those of image j whose every pixel was copied
        source = set(b["mask"][j].unique().tolist()) - {255}
        chosen = {c for c in source if bool((m["mask"][i][b["mask"][j] == c] == c).all())
                  and bool(torch.equal(m["image"][i][:, b["mask"][j] == c], b["image"][j][:, b["mask"][j] == c]))}
        assert len(chosen) >= (len(source) + 1) // 2
        for y in range(12):
            for x in range(12):
                take = int(b["mask"][j, y, x]) in chosen
                src = j if take else i
                assert m["mask"][i, y, x] == b["mask"][src, y, x]
                assert torch.equal(m["image"][i, :, y, x], b["image"][src, :, y, x])
                assert m["weight"][i, y, x] == b["weight"][src, y, x]
        assert 255 not in m["mask"][i][pasted & (b["mask"][j] == 255)].tolist()
        assert pasted.any()


def test_exactly_half_rounded_up_is_chosen():
    # image 1 holds classes 0-4 in distinct columns, image 0 is all class 7: the pasted columns count them
    mask = torch.stack([torch.full((5, 5), 7), torch.arange(5).repeat(5, 1)])
    b = {"image": torch.zeros(2, 1, 5, 5), "mask": mask}
    for seed in range(20):
        torch.manual_seed(seed)
        m = class_mix(b, 1.0)
        assert len(set(m["mask"][0].unique().tolist()) - {7}) == 3


def test_off_or_a_batch_of_one_changes_nothing():
    b = batch_of(3)
    assert class_mix(b, 0.0) is b
    one = batch_of(1)
    assert class_mix(one, 1.0) is one
    torch.manual_seed(0)
    m = class_mix(b, 0.5)  # the sources stay unmixed
    assert torch.equal(b["mask"], batch_of(3)["mask"]) and torch.equal(b["image"], batch_of(3)["image"])
    assert m["mask"].shape == b["mask"].shape


def test_probability_out_of_range_is_refused():
    assert TrainConfig(classmix=1.0).classmix == 1.0
    with pytest.raises(UserError, match="classmix"):
        TrainConfig(classmix=1.5)
    with pytest.raises(UserError, match="classmix"):
        TrainConfig(classmix=-0.1)


def test_classmix_is_refused_for_instance_models_with_one_line(tmp_path, capsys):
    from pixelwise.cli import main

    assert main(["train", "--model", "maskrcnn_resnet50_fpn", "--dataset", "shapes", "--classmix", "0.5",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixelwise: error: classmix") and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["top", "stage"])
def test_an_ignore_label_other_than_255_is_refused_before_training(tmp_path, capsys, where):
    # the losses, the metrics and ClassMix ignore 255; padding labelled 11 would be learnt as a class
    from pixelwise.cli import main

    aug = '{"crop": [32, 32], "ignore_index": 11}'
    config = tmp_path / "stages.yaml"
    config.write_text(f'stages: [{{"epochs": 1, "augment": {aug}}}]\n')
    extra = ["--augment", aug] if where == "top" else ["--config", str(config)]
    assert main(["train", "--model", "unet", "--dataset", "shapes", "--out", str(tmp_path / "r"),
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixelwise: error: augment ignore_index 11") and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_each_image_is_mixed_with_probability_p(p):
    """Two one-class images (classes 0 and 1): a mixed image is the other one's class everywhere.
    Over 400 seeded draws the share mixed is p within 5 standard deviations (sd <= 10)."""
    batch = {"image": torch.zeros(2, 1, 4, 4), "mask": torch.stack([torch.zeros(4, 4, dtype=torch.long),
                                                                     torch.ones(4, 4, dtype=torch.long)])}
    torch.manual_seed(0)
    mixed = 0
    for _ in range(200):
        out = class_mix(batch, p)
        for i in range(2):
            assert torch.equal(out["mask"][i], batch["mask"][i]) or torch.equal(out["mask"][i], batch["mask"][1 - i])
            mixed += int(not torch.equal(out["mask"][i], batch["mask"][i]))
    assert abs(mixed - 400 * p) < 50


def test_a_source_with_only_ignored_pixels_skips_that_image_alone():
    # image 1 is all 255: image 0 (its receiver) stays as it is, images 1 and 2 are still mixed
    mask = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255),
                        torch.ones(4, 4, dtype=torch.long)])
    b = {"image": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone(), "mask": mask}
    torch.manual_seed(0)
    m = class_mix(b, 1.0)
    assert torch.equal(m["mask"][0], mask[0]) and torch.equal(m["image"][0], b["image"][0])
    assert torch.equal(m["mask"][1], mask[2]) and torch.equal(m["image"][1], b["image"][2])  # class 1: all of image 2
    assert torch.equal(m["mask"][2], mask[0]) and torch.equal(m["image"][2], b["image"][0])
