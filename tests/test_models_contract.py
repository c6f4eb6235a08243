"""Contract tests over every registered model (DESIGN.md: one contract, every model)."""

import pytest
import torch

from pixelwise import create_model, list_models, load_checkpoint, save_checkpoint
from pixelwise.models.registry import UnknownModelError, model_info, register_model

DESIGN_NAMES = {"fcn32s", "fcn16s", "fcn8s", "fcn_resnet50", "fcn_resnet101", "segnet", "segnet_basic",
                "bayesian_segnet", "deconvnet", "unet", "deeplabv3_resnet50", "deeplabv3_resnet101",
                "deeplabv3plus_resnet50", "maskrcnn_resnet50_fpn"}
SEMANTIC = list_models("semantic")
SMALL = [n for n in SEMANTIC if n not in ("fcn32s", "fcn16s", "fcn8s", "deconvnet")]  # < 60M parameters


def test_every_design_model_is_registered():
    assert set(list_models()) >= DESIGN_NAMES
    for name in list_models():
        assert model_info(name).paper, f"{name} cites no paper"


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        register_model("unet")(lambda num_classes, pretrained=None: None)


def test_unknown_model_message_lists_choices():
    with pytest.raises(KeyError, match="unet"):
        create_model("unet3000", num_classes=2)


def test_unknown_model_message_suggests_the_closest_name_only_where_there_is_one():
    choices = ", ".join(list_models())
    with pytest.raises(UnknownModelError) as caught:
        model_info("unett")
    assert str(caught.value) == f"unknown model 'unett'; did you mean 'unet'? choose one of: {choices}"
    with pytest.raises(UnknownModelError) as caught:
        model_info("zzzz")
    assert str(caught.value) == f"unknown model 'zzzz'; choose one of: {choices}"


@pytest.mark.parametrize("name", SEMANTIC)
def test_semantic_output_at_any_input_size(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 61))
    assert out.shape == (1, 5, 45, 61)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    path = tmp_path / f"{name}.safetensors"
    save_checkpoint(path, model, {"model": name, "num_classes": 3})
    loaded, _ = load_checkpoint(path)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, "3", None, True])
def test_create_model_refuses_a_class_count_that_is_not_a_positive_whole_number(num_classes):
    from pixelwise import create_model
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match="num_classes must be a whole number >= 1"):
        create_model("unet", num_classes, base_channels=4)


def test_a_semantic_predictor_refuses_more_classes_than_a_mask_holds():
    from pixelwise import SemanticPredictor, create_model
    from pixelwise.errors import UserError

    model = torch.nn.Conv2d(3, 256, 1)  # a model of the caller's own: create_model refuses 256 classes itself
    with pytest.raises(UserError, match="256 classes; pixelwise's masks hold class ids 0-254"):
        SemanticPredictor(model, {"num_classes": 256})
    most = SemanticPredictor(create_model("unet", 255, base_channels=4), {"num_classes": 255})
    assert most.class_names[-1] == "class_254"


@pytest.mark.parametrize("num_classes, words", [(1, "one class is class 0 everywhere"), (256, "class ids 0-254")])
def test_create_model_refuses_a_semantic_class_count_a_mask_cannot_use(num_classes, words):
    """One class predicted class 0 everywhere without a word, and 256 saved and exported (13 s of
    checks) before predict refused them."""
    from pixelwise import create_model
    from pixelwise.errors import UserError

    for name in ("unet", "segnet_basic", "fcn32s"):
        with pytest.raises(UserError, match=f"num_classes must be from 2 to 255 for a semantic model, got "
                                            f"{num_classes}: .*{words}"):
            create_model(name, num_classes)
    with torch.device("meta"):
        assert create_model("unet", 2, base_channels=4) is not None


def test_an_empty_pretrained_and_a_file_torch_did_not_write_are_named(tmp_path):
    from pixelwise import create_model
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match="pretrained is empty"):
        create_model("unet", 3, pretrained="", base_channels=4)  # was silently random weights
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(UserError, match="not a file torch.save wrote, or it is damaged"):
        create_model("unet", 3, pretrained=str(tmp_path / "notes.pth"), base_channels=4)
