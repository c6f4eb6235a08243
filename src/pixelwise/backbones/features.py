"""The encoder contract: what a decoder may rely on, as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    """One encoder stage.

    ``name`` is the stage's key (``"pool3"``, ``"layer4"``); ``channels`` the channels of its
    output; ``stride`` the input-to-output reduction (a stage output of a ``H x W`` input is
    ``ceil``/``floor`` of ``H / stride`` depending on the backbone's padding rules)."""

    name: str
    channels: int
    stride: int
