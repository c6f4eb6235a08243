"""The encoder contract and the weight loader shared by the backbones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pixelwise.errors import UserError


@dataclass(frozen=True)
class FeatureInfo:
    """One encoder stage, as data: what a decoder may rely on.

    ``name`` is the stage's key (``"pool3"``, ``"layer4"``); ``channels`` the channels of its
    output; ``stride`` the input-to-output reduction (a stage output of a ``H x W`` input is
    ``ceil``/``floor`` of ``H / stride`` depending on the backbone's padding rules)."""

    name: str
    channels: int
    stride: int


def load_weights(pretrained: str, url: str) -> dict[str, Tensor]:
    """``"imagenet"`` -> the state dict at ``url`` (downloaded once into the torch hub cache);
    a path to a ``.pth``/``.pt`` (read with ``weights_only=True``) or ``.safetensors`` file ->
    its state dict. A checkpoint dict holding ``"state_dict"`` or ``"model"`` is unwrapped."""
    if pretrained == "imagenet":
        return torch.hub.load_state_dict_from_url(url, progress=True, map_location="cpu", weights_only=True)
    path = Path(pretrained)
    if not path.is_file():
        raise UserError(f"{pretrained}: weights file not found; pass pretrained='imagenet' or a path to a "
                        ".pth/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file becomes one line for the user
            raise UserError(f"{path}: cannot read weights ({type(err).__name__}); it must be a plain "
                            "state dict saved with torch.save") from err
    else:
        raise UserError(f"{path}: unknown weights format {path.suffix!r}; use .pth, .pt or .safetensors")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def load_matching(model: torch.nn.Module, state: dict[str, Tensor], where: str, optional: tuple[str, ...] = ()
                  ) -> None:
    """``model.load_state_dict(state, strict=True)`` except that keys starting with a prefix in
    ``optional`` may be absent from ``state`` or have another shape (a classifier with another
    number of classes); those keep their fresh initialisation. Mismatches raise :class:`UserError`."""
    own = model.state_dict()
    state = dict(state)
    for key in list(state):
        if key.startswith(optional) and key in own and own[key].shape != state[key].shape:
            del state[key]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{where}: weight {k} has shape {tuple(state[k].shape)}, the model needs "
                        f"{tuple(own[k].shape)}; check the model name and its arguments")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit {type(model).__name__}: missing {missing[:3]}"
                        f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''}")
