"""Inference: predictors (semantic and instance), tiling, test-time augmentation, Monte-Carlo
dropout, file writers, scoring a checkpoint on a dataset, and benchmarking."""

from pixelwise.inference.predictor import InstancePredictor, Prediction, Predictor, SemanticPredictor

__all__ = ["InstancePredictor", "Prediction", "Predictor", "SemanticPredictor"]
