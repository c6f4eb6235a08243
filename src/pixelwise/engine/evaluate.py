"""``pixelwise eval``: a checkpoint on a dataset split, image by image through the same
:class:`~pixelwise.inference.predictor.Predictor` that ``predict`` uses, so the metrics equal
those computed from the masks ``predict`` writes."""

from __future__ import annotations

import torch
from tqdm import tqdm

from pixelwise.data import build_dataset
from pixelwise.errors import UserError
from pixelwise.inference.predictor import Predictor
from pixelwise.metrics import ConfusionMeter


def evaluate_checkpoint(checkpoint: str, dataset: str, data: str | None, split: str = "val", *,
                        tile: int | None = None, tta: bool = False, device: str = "cpu",
                        dataset_kwargs: dict | None = None, progress: bool = True) -> dict:
    predictor = Predictor.from_checkpoint(checkpoint, device, tile=tile, tta=tta)
    ds = build_dataset(dataset, data, split, **(dataset_kwargs or {}))
    if predictor.task == "instance":
        from pixelwise.engine.instance import evaluate_instance_predictor

        return evaluate_instance_predictor(predictor, ds, progress=progress)
    if ds.num_classes != predictor.meta["num_classes"]:
        raise UserError(f"{checkpoint} predicts {predictor.meta['num_classes']} classes but the {dataset} "
                        f"data has {ds.num_classes}; evaluate on the dataset it was trained for")
    meter = ConfusionMeter(ds.num_classes)
    for i in tqdm(range(len(ds)), desc="eval", disable=not progress, dynamic_ncols=True):
        sample = ds.load(i)
        pred = predictor.predict(sample.image)
        meter.update(torch.from_numpy(pred.mask), torch.from_numpy(sample.mask))
    metrics = meter.compute(list(ds.class_names))
    metrics["num_images"] = len(ds)
    return metrics
