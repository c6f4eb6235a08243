"""Mask R-CNN (He et al., ICCV 2017): transform -> backbone + FPN -> RPN -> RoI heads.

Contract (pixelwise, deliberately unlike torchvision): ``model(images)`` returns detections
and ``model(images, targets)`` returns the dict of losses, whatever ``model.training`` says.
The mode only switches what it always switches in PyTorch: BatchNorm
statistics where the backbone trains them (from scratch; under pretrained weights they are
frozen), and the random ``min_size`` draw of multi-scale training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from pixelwise.models.maskrcnn.fpn import BackboneWithFPN
from pixelwise.models.maskrcnn.roi_heads import RoIHeads
from pixelwise.models.maskrcnn.rpn import RegionProposalNetwork
from pixelwise.models.maskrcnn.transform import ImageBatch, RCNNTransform


def check_targets(targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]], num_classes: int) -> None:
    """Raise ``ValueError`` naming the first malformed target (wrong keys, shapes, dtypes, masks
    of another size than their image (``sizes``: (H, W) of each), a label outside
    ``1..num_classes - 1``, a box that is not finite or has no area)."""
    if len(targets) != len(sizes):
        raise ValueError(f"got {len(sizes)} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        missing = {"boxes", "labels", "masks"} - set(t)
        if missing:
            raise ValueError(f"targets[{i}] lacks {sorted(missing)}; each target needs boxes, labels, masks")
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        if not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be float Tensor[K, 4], got {boxes.dtype}{list(boxes.shape)}")
        k = boxes.shape[0]
        if labels.shape != (k,) or labels.dtype != torch.int64:
            raise ValueError(
                f"targets[{i}]['labels'] must be int64 Tensor[{k}], got {labels.dtype}{list(labels.shape)}"
            )
        if masks.dim() != 3 or masks.shape[0] != k:
            raise ValueError(f"targets[{i}]['masks'] must be Tensor[{k}, H, W], got {list(masks.shape)}")
        if k and tuple(masks.shape[-2:]) != tuple(sizes[i]):
            raise ValueError(f"targets[{i}]['masks'] are {masks.shape[-2]}x{masks.shape[-1]} (H x W) but image {i} is "
                             f"{sizes[i][0]}x{sizes[i][1]}; each mask covers its whole image")
        outside = (labels < 1) | (labels >= num_classes)
        if outside.any():
            j = int(outside.nonzero()[0, 0])
            raise ValueError(f"targets[{i}]['labels'][{j}] = {int(labels[j])} is not a class: labels are 1.."
                             f"{num_classes - 1} (0 is the background)")
        infinite = ~torch.isfinite(boxes).all(dim=1)
        if infinite.any():
            j = int(infinite.nonzero()[0, 0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is not finite")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no area; boxes are "
                "x1, y1, x2, y2 with x2 > x1 and y2 > y1"
            )


class MaskRCNN(nn.Module):
    """``forward(images, targets=None)``.

    ``images``: list of ``Tensor[3, H_i, W_i]`` in [0, 1] (or already normalised when the
    transform was built with ``normalize=False``); sizes may differ.
    Without ``targets``: per image ``{"boxes" Tensor[D, 4] (x1, y1, x2, y2 in input pixels),
    "labels" int64 Tensor[D], "scores" Tensor[D], "masks" Tensor[D, 1, H_i, W_i]`` (probabilities)}``.
    With ``targets`` (per image ``boxes`` float Tensor[K, 4], ``labels`` int64 Tensor[K],
    ``masks`` uint8/bool Tensor[K, H_i, W_i]; K may be 0): ``{"loss_objectness",
    "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}``.
    """

    pretrained_note: str | None = None  # set by the builder when the file's class layers were not loaded

    def __init__(
        self,
        transform: RCNNTransform,
        backbone: BackboneWithFPN,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self._register_load_state_dict_pre_hook(self._fill_num_batches_tracked)

    @property
    def normalizes_input(self) -> bool:
        """Whether the model subtracts ``image_mean`` and divides by ``image_std`` itself (its
        input contract then hands it values in [0, 1]; see :class:`pixelwise.preprocess.InputSpec`)."""
        return self.transform.config.normalize

    @property
    def input_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.transform.config.image_mean), tuple(self.transform.config.image_std)

    def _fill_num_batches_tracked(self, state_dict: dict, prefix: str, *args) -> None:
        """Accept torchvision's published layout (FrozenBatchNorm2d, no ``num_batches_tracked``)
        in a model whose backbone has trainable BatchNorm: the missing counters start at 0."""
        for name, module in self.named_modules():
            key = f"{prefix}{name}.num_batches_tracked"
            has_stats = f"{prefix}{name}.running_mean" in state_dict
            if isinstance(module, nn.BatchNorm2d) and has_stats and key not in state_dict:
                state_dict[key] = torch.zeros((), dtype=torch.long)

    def _in_weight_dtype(self, batch: ImageBatch) -> ImageBatch:
        """The batch in the dtype of the weights: float images of any precision (float64 from
        numpy, say) are normalised and resized in their own, then given to the backbone in its."""
        weight = next(self.backbone.parameters(), None)
        if weight is None or batch.tensors.dtype == weight.dtype:
            return batch
        return batch._replace(tensors=batch.tensors.to(weight.dtype))

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if targets is not None:
            return self.compute_losses(images, targets)
        return self.predict(images)

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        batch = self._in_weight_dtype(self.transform(images)[0])  # checks the images first
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections = self.roi_heads(features, proposals, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def compute_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        classifier = self.roi_heads.box_predictor.get_submodule("cls_score")
        assert isinstance(classifier, nn.Linear)
        num_classes = classifier.out_features
        check_targets(targets, [(int(img.shape[-2]), int(img.shape[-1])) for img in images], num_classes)
        batch, targets = self.transform(images, targets)
        batch = self._in_weight_dtype(batch)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return {**rpn_losses, **roi_losses}
