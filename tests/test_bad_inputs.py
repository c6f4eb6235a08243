"""Every verb answers every foreseeable bad input with one line ``pixelwise: error: <what, which
file or flag, the fix>`` on stderr and exit status 2: no traceback, and no file outside the
verb's output folder changed (issue 11). Each row: the arguments (``{ws}`` is the workspace
below), a fragment of the expected message, and the output folder the verb may touch."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise import Predictor, create_model, save_checkpoint
from pixelwise.cli import main
from pixelwise.errors import UserError

KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
CKPT = "{ws}/model.safetensors"
IMG = "{ws}/images/a.png"
MRCNN = "{ws}/mrcnn.safetensors"
NO_USER = "~pixelwise_no_such_user"
SHAPES = ["--dataset", "shapes", "--dataset-kwargs", '{"num_val": 2, "num_test": 2, "size": 32}']

ROWS: list[tuple[str, list[str], str]] = [
    # --- train ---------------------------------------------------------------------------------
    ("train: unknown YAML key", ["train", "--config", "{ws}/typo.yaml", "--out", "{ws}/out"],
     "typo.yaml: unknown config key 'epoch'; did you mean 'epochs'?"),
    ("train: YAML value of the wrong type", ["train", "--config", "{ws}/lr.yaml", "--out", "{ws}/out"],
     "lr.yaml: lr must be a number > 0, got 'fast'"),
    ("train: YAML value out of range", ["train", "--config", "{ws}/momentum.yaml", "--out", "{ws}/out"],
     "momentum.yaml: momentum must be a number >= 0 and < 1, got 'high'"),
    ("train: --data for the generated shapes", ["train", "--model", "unet", *SHAPES, "--data", "{ws}/run", "--out",
                                                "{ws}/out"], "the shapes dataset is generated, it reads no folder"),
    ("eval: --data for the generated shapes", ["eval", "--checkpoint", CKPT, *SHAPES, "--data", "{ws}/run"],
     "leave --data out, or name the kind of dataset in that folder with --dataset"),
    ("train: not YAML", ["train", "--config", "{ws}/broken.yaml", "--out", "{ws}/out"],
     "broken.yaml line 2 column 1: expected ',' or ']'"),
    ("train: recipe not found", ["train", "--config", "unet_camvd", "--out", "{ws}/out"],
     "neither a file nor a bundled recipe"),
    ("train: model option misspelt", ["train", "--model-kwargs", '{"base_chanels": 4}', "--out", "{ws}/out"],
     "unet has no option 'base_chanels'; did you mean 'base_channels'?"),
    ("train: model option refused", ["train", "--model-kwargs", '{"padding": "full"}', "--out", "{ws}/out"],
     "padding must be 'same' or 'valid', got 'full'"),
    ("train: no width", ["train", "--model-kwargs", '{"base_channels": 0}', "--out", "{ws}/out"],
     "base_channels must be a whole number >= 1, got 0"),
    ("train: a negative width", ["train", "--model-kwargs", '{"base_channels": -4}', "--out", "{ws}/out"],
     "base_channels must be a whole number >= 1, got -4"),
    ("train: deeplab with batches of one", ["train", "--model", "deeplabv3plus_resnet18", *SHAPES, "--batch-size", "1",
                                           "--out", "{ws}/out"], "trains on at least 2 images per batch"),
    ("train: a scale that shrinks images to nothing", ["train", *SHAPES, "--crop", "24x24", "--augment",
                                                       '{"scale": [0.01, 0.02]}', "--out", "{ws}/out"],
     "need 0.1 <= low <= high"),
    ("train: a scale given in percent", ["train", *SHAPES, "--crop", "24x24", "--augment", '{"scale": [50, 200]}',
                                        "--out", "{ws}/out"], "need high <= 10 (factors of the image's size"),
    ("train: an infinite elastic sigma", ["train", *SHAPES, "--augment", '{"elastic": {"sigma": Infinity}}',
                                          "--out", "{ws}/out"], "elastic sigma must be a number of pixels from 0 to"),
    ("train: model option of the wrong type", ["train", "--model-kwargs", '{"base_channels": "wide"}',
                                               "--out", "{ws}/out"],
     "option 'base_channels' must be an integer (default 64), got 'wide'"),
    ("train: model kwargs not JSON", ["train", "--model-kwargs", "{base_channels: 4}", "--out", "{ws}/out"],
     "--model-kwargs must be a JSON object"),
    ("train: unknown model", ["train", "--model", "unett", "--out", "{ws}/out"],
     "unknown model 'unett'; did you mean 'unet'?"),
    ("train: no CUDA", ["train", "--device", "cuda", "--out", "{ws}/out"], "--device cuda"),
    ("train: zero epochs", ["train", "--epochs", "0", "--out", "{ws}/out"], "--epochs must be an integer >= 1, got 0"),
    ("train: negative lr", ["train", "--lr", "-0.1", "--out", "{ws}/out"], "--lr must be a number > 0, got -0.1"),
    ("train: choice misspelt", ["train", "--optimizer", "adm", "--out", "{ws}/out"],
     "--optimizer 'adm' is not one of: sgd, adam, adamw; did you mean 'adam'?"),
    ("train: bad crop", ["train", "--crop", "0x32", "--out", "{ws}/out"], "must look like 256x320"),
    ("train: flag misspelt", ["train", "--epohcs", "3", "--out", "{ws}/out"],
     "unrecognized argument '--epohcs'; did you mean '--epochs'?"),
    ("train: out holds a run", ["train", "--out", "{ws}/run"], "already holds a run"),
    ("train: resume without a run", ["train", "--resume", "--out", "{ws}/out"], "cannot resume"),
    ("train: resume and overwrite", ["train", "--resume", "--overwrite", "--out", "{ws}/run"],
     "give only one of them"),
    ("train: out is a file", ["train", "--out", "{ws}/notes.txt"], "is a file; give a folder"),
    ("train: out under a file", ["train", "--out", "{ws}/notes.txt/run"],
     "--out {ws}/notes.txt/run: {ws}/notes.txt is a file, not a folder"),
    ("train: sparse labels", ["train", "--dataset", "folder", "--data", "{ws}/sparse", "--train-split", "all",
                              "--val-split", "all", "--out", "{ws}/out"],
     "label values 200 outside the 2 classes"),
    ("train: dataset folder missing", ["train", "--dataset", "folder", "--data", "{ws}/nowhere", "--out",
                                       "{ws}/out"], "{ws}/nowhere: no such folder; give the folder that holds images/"),
    ("train: dataset option misspelt", ["train", "--dataset-kwargs", '{"num_trian": 8}', "--out", "{ws}/out"],
     "shapes has no option 'num_trian'; did you mean 'num_train'?"),
    ("train: dataset kind misspelt", ["train", "--dataset", "shape", "--out", "{ws}/out"],
     "unknown dataset kind 'shape'; did you mean 'shapes'?"),
    ("train: pretrained file missing", ["train", "--pretrained", "{ws}/nope.pth", "--out", "{ws}/out"],
     "no such file"),
    # --- eval ----------------------------------------------------------------------------------
    ("eval: a pickle as checkpoint", ["eval", "--checkpoint", "{ws}/model.pth", *SHAPES],
     "pixelwise never loads as a checkpoint"),
    ("eval: metadata not JSON", ["eval", "--checkpoint", "{ws}/badmeta.safetensors", *SHAPES],
     "metadata is not valid JSON"),
    ("eval: truncated checkpoint", ["eval", "--checkpoint", "{ws}/cut.safetensors", *SHAPES], "was it truncated?"),
    ("eval: checkpoint missing", ["eval", "--checkpoint", "{ws}/none.safetensors", *SHAPES], "not found"),
    ("eval: no CUDA", ["eval", "--checkpoint", CKPT, *SHAPES, "--device", "cuda"], "--device cuda"),
    ("eval: tile too small", ["eval", "--checkpoint", CKPT, *SHAPES, "--tile", "8"],
     "--tile must be at least 16 pixels, got 8"),
    ("eval: json over the checkpoint", ["eval", "--checkpoint", CKPT, *SHAPES, "--json", CKPT],
     "would write over the input"),
    ("eval: json over the run's own summary", ["eval", "--checkpoint", CKPT, *SHAPES, "--json",
                                                "{ws}/run/metrics.json"], "exists; pass --overwrite to replace it"),
    ("eval: json into the dataset's images", ["eval", "--checkpoint", "{ws}/two.safetensors", "--dataset", "folder",
                                              "--data", "{ws}/clean", "--split", "all", "--json",
                                              "{ws}/clean/images/c9.jpg"], "is inside the input folder"),
    ("eval: json as the dataset's classes.json", ["eval", "--checkpoint", "{ws}/two.safetensors", "--dataset",
                                                  "folder", "--data", "{ws}/clean", "--split", "all", "--json",
                                                  "{ws}/clean/classes.json"], "is inside the input folder"),
    ("train: a setting nothing uses", ["train", *SHAPES, "--gamma", "0.5", "--out", "{ws}/out"],
     "gamma 0.5 acts only with schedule step, which this run does not use"),
    ("train: a warm-up that starts above the peak", ["train", *SHAPES, "--warmup-factor", "2", "--out", "{ws}/out"],
     "warmup_factor 2: the warm-up starts at lr x this"),
    ("eval: json under a file", ["eval", "--checkpoint", CKPT, *SHAPES, "--json", "{ws}/notes.txt/eval.json"],
     "--json {ws}/notes.txt/eval.json: {ws}/notes.txt is a file, not a folder"),
    ("eval: data with problems", ["eval", "--checkpoint", "{ws}/two.safetensors", "--dataset", "folder",
                                  "--data", "{ws}/sparse", "--split", "all"], "pass --skip-invalid"),
    ("eval: arguments missing", ["eval"], "the following arguments are required: --dataset"),
    ("eval: neither checkpoint nor onnx", ["eval", *SHAPES], "or --predictions DIR to score masks already made"),
    ("eval: unknown split", ["eval", "--checkpoint", CKPT, "--dataset", "folder", "--data", "{ws}/sparse",
                             "--split", "tset"], "has splits all, train, val"),
    # --- predict -------------------------------------------------------------------------------
    ("predict: overlap out of range", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out", "--tile", "16",
                                       "--overlap", "1.5"], "--overlap must be a fraction in [0, 1), got 1.5"),
    ("predict: tile too small", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out", "--tile", "8"],
     "--tile must be at least 16"),
    ("predict: input missing", ["predict", "--checkpoint", CKPT, "{ws}/images/none.png", "--out", "{ws}/out"],
     "not found"),
    ("predict: bad resize", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out", "--resize", "0x5"],
     "must look like 256x320"),
    ("predict: resize above the pixel limit", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                                "--resize", "100000x100000"],
     "--resize 100000x100000: 10,000,000,000 pixels per model input is above the limit"),
    ("predict: calibration without int8", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                           "--calib-images", "5"], "--calib-images calibrates --mode int8"),
    ("export: calibration without int8", ["export", "--checkpoint", CKPT, "--out", "{ws}/m.onnx", "--calib-crop",
                                          "64"], "--calib-crop calibrates --int8; add --int8"),
    ("export: classes of a checkpoint", ["export", "--checkpoint", CKPT, "--out", "{ws}/m.onnx", "--num-classes",
                                         "3"], "--num-classes goes with --model"),
    ("predict: resize empty", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out", "--resize", ""],
     "--resize is empty"),
    ("predict: tile 0 for an instance model", ["predict", "--checkpoint", MRCNN, IMG, "--out", "{ws}/out",
                                               "--tile", "0"], "--tile does not apply to instance models"),
    ("predict: int8 for an instance model, before calibration", ["predict", "--checkpoint", MRCNN, IMG, "--out",
                                                                  "{ws}/out", "--mode", "int8"],
     "--mode int8 is not offered for instance models"),
    ("serve: int8 for an instance model, before calibration", ["serve", "--checkpoint", MRCNN, "--mode", "int8"],
     "--mode int8 is not offered for instance models"),  # serve's --checkpoint, a string, was read letter by letter
    ("serve: int8 for an ONNX file, before calibration", ["serve", "--checkpoint", "{ws}/m.onnx", "--mode", "int8",
                                                          "--calib-dataset", "folder", "--calib-data", "{ws}/none"],
     "--mode int8 does not apply to an ONNX file"),
    ("predict: mc-samples and int8, before calibration", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                                           "--mc-samples", "2", "--mode", "int8", "--calib-dataset",
                                                           "folder", "--calib-data", "{ws}/none"],
     "--mc-samples runs Monte-Carlo dropout, in --mode eager only"),
    ("predict: mc-samples and fast for a model without dropout", ["predict", "--checkpoint", CKPT, IMG, "--out",
                                                                  "{ws}/out", "--mc-samples", "2", "--mode", "fast"],
     "needs a model with dropout layers"),  # was 'use --mode eager', which was then refused for that reason
    ("predict: mc-samples and fast for an ensemble without dropout", ["predict", "--checkpoint", CKPT, "--checkpoint",
                                                                      CKPT, IMG, "--out", "{ws}/out", "--mc-samples",
                                                                      "2", "--mode", "fast"], "has any; leave it out"),
    ("eval: instance model on semantic data", ["eval", "--checkpoint", MRCNN, "--dataset", "folder", "--data",
                                               "{ws}/clean", "--split", "all"], "has no instance annotations"),
    ("train: instance model on semantic data", ["train", "--model", "maskrcnn_resnet18_fpn", "--dataset", "folder",
                                                "--data", "{ws}/clean", "--out", "{ws}/out"],
     "has no instance annotations"),
    ("predict: MC dropout without dropout", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                             "--mc-samples", "2"], "needs a model with dropout layers"),
    ("predict: instance option on a semantic model", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                                      "--score-thresh", "0.3"], "--score-thresh does not apply"),
    ("predict: no CUDA", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out", "--device", "cuda"],
     "--device cuda"),
    ("predict: larger than the pixel limit", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                              "--max-pixels", "100"], "pass --max-pixels 1024"),
    ("predict: pixel limit not positive", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/out",
                                           "--max-pixels", "0"], "--max-pixels must be a positive number"),
    ("predict: truncated input", ["predict", "--checkpoint", CKPT, "{ws}/broken", "--out", "{ws}/out"],
     "1 of 2 input(s) cannot be read, nothing was written: {ws}/broken/cut.png: unreadable or truncated"),
    ("predict: out holds an input", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/images"],
     "--out {ws}/images holds the input {ws}/images/a.png"),
    ("predict: out is a file", ["predict", "--checkpoint", CKPT, IMG, "--out", "{ws}/notes.txt"],
     "is a file; give a folder"),
    ("predict: folder without images", ["predict", "--checkpoint", CKPT, "{ws}/run", "--out", "{ws}/out"],
     "no images found in {ws}/run"),
    # --- bench ---------------------------------------------------------------------------------
    ("bench: zero batch", ["bench", "--model", "unet", "--size", "32", "--batch", "0"],
     "--batch must be from 1 to 4,096, got 0"),
    ("bench: bad size", ["bench", "--model", "unet", "--size", "big"], "--size 'big' must look like 256x320"),
    ("bench: model and checkpoint", ["bench", "--model", "unet", "--checkpoint", CKPT, "--size", "32"],
     "exactly one of --model NAME, --checkpoint FILE or --onnx FILE"),
    ("bench: no CUDA", ["bench", "--model", "unet", "--size", "32", "--device", "cuda"], "--device cuda"),
    ("bench: a size no image has", ["bench", "--model", "unet", "--size", "99999x99999"],
     "--size 99999x99999: 9,999,800,001 pixels per image is above the limit"),
    ("bench: an ONNX file as checkpoint", ["bench", "--checkpoint", "{ws}/real.onnx", "--size", "32"],
     "real.onnx is an ONNX file; give it as --onnx"),
    ("bench: json over a file of the user's", ["bench", "--model", "unet", "--size", "32", "--json",
                                               "{ws}/notes.txt"], "--json {ws}/notes.txt exists; pass --overwrite"),
    ("bench: unknown mode", ["bench", "--model", "unet", "--size", "32", "--mode", "tensorrt"],
     "invalid choice: 'tensorrt'"),
    ("bench: json over the checkpoint", ["bench", "--checkpoint", CKPT, "--size", "32", "--json", CKPT],
     "would write over the input"),
    ("bench: json under a file", ["bench", "--model", "unet", "--size", "32", "--json", "{ws}/notes.txt/a/b.json"],
     "{ws}/notes.txt is a file, not a folder"),
    # --- export --------------------------------------------------------------------------------
    ("export: unknown format", ["export", "--checkpoint", CKPT, "--format", "tflite", "--out", "{ws}/m.onnx"],
     "--format 'tflite' is not supported"),
    ("export: checkpoint missing", ["export", "--checkpoint", "{ws}/none.safetensors", "--out", "{ws}/m.onnx"],
     "not found"),
    ("export: out under a file", ["export", "--checkpoint", CKPT, "--out", "{ws}/notes.txt/m.onnx"],
     "{ws}/notes.txt is a file, not a folder"),
    ("export: out is a folder", ["export", "--checkpoint", CKPT, "--out", "{ws}/exported.onnx"],
     "is a folder; give the name of a file"),
    ("export: opset too old", ["export", "--checkpoint", CKPT, "--out", "{ws}/m.onnx", "--opset", "9"],
     "--opset 9 is not supported: give 11 to"),
    ("export: opset too old for int8", ["export", "--checkpoint", CKPT, "--out", "{ws}/m.onnx", "--opset", "12",
                                        "--int8", "--calib-dataset", "shapes"],
     "--opset 12 is not supported with int8: give 13 to"),
    ("export: opset too new", ["export", "--checkpoint", CKPT, "--out", "{ws}/m.onnx", "--opset", "99"],
     "--opset 99 is not supported"),
    ("export: out over the checkpoint", ["export", "--checkpoint", CKPT, "--out", CKPT], ".onnx"),
    # --- serve (each fails before the server starts) --------------------------------------------
    ("serve: a pickle as checkpoint", ["serve", "--checkpoint", "{ws}/model.pth"],
     "pixelwise never loads as a checkpoint"),
    ("serve: port out of range", ["serve", "--checkpoint", CKPT, "--port", "99999"],
     "--port must be between 0 and 65535, got 99999"),
    ("serve: pixel limit not positive", ["serve", "--checkpoint", CKPT, "--max-pixels", "0"],
     "--max-pixels must be a positive number of pixels, got 0"),
    ("serve: no workers", ["serve", "--checkpoint", CKPT, "--workers", "0"], "--workers must be at least 1, got 0"),
    ("serve: keep-uploads is a file", ["serve", "--checkpoint", CKPT, "--keep-uploads", "{ws}/notes.txt"],
     "--keep-uploads {ws}/notes.txt: {ws}/notes.txt is a file, not a folder"),
    ("serve: samples folder missing", ["serve", "--checkpoint", CKPT, "--samples", "{ws}/nowhere"],
     "--samples {ws}/nowhere: not a folder"),
    ("serve: tile too small", ["serve", "--checkpoint", CKPT, "--tile", "8"], "--tile must be at least 16"),
    ("serve: empty host", ["serve", "--checkpoint", CKPT, "--host", ""], "--host is empty"),
    ("serve: upload limit not a number", ["serve", "--checkpoint", CKPT, "--max-upload-mb", "nan"],
     "--max-upload-mb must be a positive number of MB, got nan"),
    ("serve: upload limit zero", ["serve", "--checkpoint", CKPT, "--max-upload-mb", "0"],
     "--max-upload-mb must be a positive number of MB, got 0.0"),
    ("serve: negative time limit", ["serve", "--checkpoint", CKPT, "--timeout", "-1"],
     "--timeout must be a positive number of seconds (0 for no limit), got -1"),
    ("serve: keep-uploads under a file", ["serve", "--checkpoint", CKPT, "--keep-uploads", "{ws}/notes.txt/up"],
     "--keep-uploads {ws}/notes.txt/up: {ws}/notes.txt is a file, not a folder"),
    # --- models, recipes, data inspect, demo, the command itself --------------------------------
    ("models: unknown flag", ["models", "--all"], "unrecognized argument '--all'"),
    ("recipes: extra argument", ["recipes", "unet"], "unrecognized argument 'unet'"),
    ("data inspect: folder missing", ["data", "inspect", "--dataset", "folder", "--data", "{ws}/nowhere"],
     "no such folder"),
    ("data inspect: folder of another layout", ["data", "inspect", "--dataset", "folder", "--data", "{ws}/run"],
     "expected images/ and masks/"),
    ("data inspect: options not JSON", ["data", "inspect", "--dataset", "shapes", "--dataset-kwargs", "{num_val: 2}"],
     "--dataset-kwargs must be a JSON object, e.g. '{\"num_train\": 200}'"),
    ("data inspect: json over a file of the user's", ["data", "inspect", *SHAPES, "--split", "val", "--json",
                                                       "{ws}/notes.txt"], "exists; pass --overwrite"),
    ("data inspect: json is a folder", ["data", "inspect", *SHAPES, "--split", "val", "--json", "{ws}/run"],
     "is a folder; give the name of a file"),
    ("data: no action", ["data"], "the following arguments are required: ACTION"),
    ("demo: out holds a run", ["demo", "--out", "{ws}/run", "--quick"],
     "already holds a run (metrics.json); replace it with --overwrite, or give another --out"),
    ("demo: out is a file", ["demo", "--out", "{ws}/notes.txt", "--quick"], "is a file; give a folder"),
    ("pixelwise: unknown verb", ["trian"], "invalid choice: 'trian'"),
    # --- a ~user of no such user (or ~ without a home): pathlib's RuntimeError was a traceback ---------
    ("train: out under an unknown user's home", ["train", "--out", NO_USER + "/run"],
     f"--out {NO_USER}/run: cannot expand {NO_USER}"),
    ("train: data under an unknown user's home", ["train", "--dataset", "folder", "--data", NO_USER + "/d",
                                                  "--out", "{ws}/out"], f"--data {NO_USER}/d: cannot expand"),
    ("train: config under an unknown user's home", ["train", "--config", NO_USER + "/c.yaml", "--out", "{ws}/out"],
     f"--config {NO_USER}/c.yaml: cannot expand"),
    ("train: config whose out is under an unknown user's home", ["train", "--config", "{ws}/home_out.yaml"],
     f"out: cannot expand {NO_USER}"),
    ("eval: json under an unknown user's home", ["eval", "--checkpoint", CKPT, *SHAPES, "--json",
                                                 NO_USER + "/e.json"], f"--json {NO_USER}/e.json: cannot expand"),
    ("export: out under an unknown user's home", ["export", "--checkpoint", CKPT, "--out", NO_USER + "/m.onnx"],
     f"--out {NO_USER}/m.onnx: cannot expand"),
    ("bench: json under an unknown user's home", ["bench", "--model", "unet", "--size", "32", "--json",
                                                  NO_USER + "/b.json"], f"--json {NO_USER}/b.json: cannot expand"),
    ("data inspect: data under an unknown user's home", ["data", "inspect", "--dataset", "folder", "--data",
                                                         NO_USER + "/d"], f"--data {NO_USER}/d: cannot expand"),
    ("predict: an input under an unknown user's home",
     ["predict", "--checkpoint", CKPT, NO_USER + "/a.png", "--out", "{ws}/out"],
     f"an INPUT {NO_USER}/a.png: cannot expand {NO_USER}"),
    ("eval: predictions' json over a file of the user's",
     ["eval", "--predictions", "{ws}/run", *SHAPES, "--json", "{ws}/notes.txt"],
     "--json {ws}/notes.txt exists; pass --overwrite"),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of good and bad inputs."""
    ws = tmp_path_factory.mktemp("ws")
    torch.manual_seed(0)
    save_checkpoint(ws / "model.safetensors", create_model("unet", num_classes=4, **KW),
                    {"model": "unet", "num_classes": 4, "model_kwargs": KW})
    save_checkpoint(ws / "two.safetensors", create_model("unet", num_classes=2, **KW),
                    {"model": "unet", "num_classes": 2, "model_kwargs": KW})
    torch.save({"w": torch.zeros(2)}, ws / "model.pth")
    data = (ws / "model.safetensors").read_bytes()
    (ws / "cut.safetensors").write_bytes(data[: len(data) // 2])
    header = json.dumps({"__metadata__": {"pixelwise": "{not json"}, "w": {"dtype": "F32", "shape": [1],
                                                                           "data_offsets": [0, 4]}}).encode()
    (ws / "badmeta.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (ws / "typo.yaml").write_text("model: unet\nepoch: 3\n")
    (ws / "lr.yaml").write_text("model: unet\nlr: fast\n")
    (ws / "momentum.yaml").write_text("optimizer: sgd\nmomentum: high\n")
    (ws / "broken.yaml").write_text("model: [unet\n")
    (ws / "home_out.yaml").write_text(f"model: unet\nout: {NO_USER}/run\n")
    (ws / "notes.txt").write_text("mine")
    (ws / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(ws / "images" / "a.png")
    (ws / "broken").mkdir()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(ws / "broken" / "ok.png")
    good = ws / "broken" / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:2000])
    (ws / "run").mkdir()
    (ws / "exported.onnx").mkdir()  # a folder with a file's name
    (ws / "real.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # how an ONNX protobuf starts
    (ws / "run" / "metrics.json").write_text("{}")
    (ws / "run" / "config.yaml").write_text("model: unet\n")
    mrcnn = {"min_size": 64, "max_size": 64}
    save_checkpoint(ws / "mrcnn.safetensors", create_model("maskrcnn_resnet18_fpn", num_classes=4, **mrcnn),
                    {"model": "maskrcnn_resnet18_fpn", "num_classes": 4, "model_kwargs": mrcnn})
    for sub in ("images", "masks"):
        (ws / "clean" / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(ws / "clean" / "images" / f"c{i}.png")
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(ws / "clean" / "masks" / f"c{i}.png")
    for sub in ("images", "masks"):
        (ws / "sparse" / sub).mkdir(parents=True)
    for i, label in enumerate([1, 1, 200, 1]):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(ws / "sparse" / "images" / f"s{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[:8] = label
        Image.fromarray(mask).save(ws / "sparse" / "masks" / f"s{i}.png")
    return ws


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_relative_to(skip)}


def test_the_api_names_an_option_that_does_not_apply_to_the_task_before_what_goes_with_it(ws):
    """from_checkpoint(maskrcnn, overlap=0.5) said 'give tile', and with tile: 'does not apply'."""
    from pixelwise import Predictor
    from pixelwise.errors import UserError

    with pytest.raises(UserError, match="--overlap does not apply to instance models"):
        Predictor.from_checkpoint(MRCNN.replace("{ws}", str(ws)), overlap=0.5)


def test_the_table_has_at_least_30_rows_over_every_verb():
    verbs = {args[0] for _, args, _ in ROWS}
    assert len(ROWS) >= 30
    assert {"train", "eval", "predict", "bench", "models", "recipes", "data", "demo", "serve"} <= verbs


@pytest.mark.parametrize("name, args, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, capfd, monkeypatch, name, args, message):
    if args[0] == "serve":
        pytest.importorskip("fastapi", reason="serve needs the serve extra (pip install -e '.[serve]')")
        import pixelwise.serve.app

        def started(*a, **k):
            raise AssertionError("the server started: the bad input was not caught")

        monkeypatch.setattr(pixelwise.serve.app, "run", started)
        if "--port" not in args:
            args = [*args, "--port", "0"]  # any free port: the default 8000 may be taken on this machine
    argv = [a.replace("{ws}", str(ws)) for a in args]
    out = ws / "out"
    before = snapshot(ws, out)
    code = main(argv)
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(err) == 1, err
    assert err[0].startswith("pixelwise: error: ") and "Traceback" not in captured.err
    assert message.replace("{ws}", str(ws)) in err[0], err[0]
    assert snapshot(ws, out) == before  # nothing outside the output folder changed


def test_the_real_command_prints_one_line(ws):
    """The installed entry point, not only main(): no traceback, no usage block."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pixelwise", "eval", "--checkpoint", str(ws / "model.pth"),
                           "--dataset", "shapes"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pixelwise: error: "), proc.stderr


def test_a_quoted_tilde_is_the_home_folder_for_every_verb_not_a_folder_named_tilde(ws, tmp_path, monkeypatch, capfd):
    """``predict --out '~/p'`` (or ``--out=~/p``, which bash leaves as it is) made a folder named ``~`` in the
    current one, and ``--checkpoint '~/m.safetensors'`` was 'not found', where ``train --out '~/run'`` expanded."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "m.safetensors").write_bytes((ws / "model.safetensors").read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["predict", "--checkpoint", "~/m.safetensors", str(ws / "images" / "a.png"), "--out", "~/p",
                 "--no-progress"]) == 0, capfd.readouterr().err
    assert (home / "p" / "a.png").is_file()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("verb", [["data", "inspect", "--dataset", "shapes", "--split", "val", "--no-progress",
                                   "--dataset-kwargs", '{"num_val": 2, "size": 32}']])
def test_a_broken_link_as_json_is_refused_before_the_work_and_named_as_a_link(verb, tmp_path, capsys):
    """``--json r.json`` where r.json is a link to a file that does not exist passed the check (the
    resolved target does not exist), the whole command ran, and the end said ``r.json appeared while
    this command ran (another pixelwise writing there?)``: nothing appeared, the link was there before.
    Same for ``export --out`` and ``eval --json``."""
    link = tmp_path / "r.json"
    link.symlink_to(tmp_path / "gone" / "r.json")
    assert main([*verb, "--json", str(link)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: ")
    assert "appeared while this command ran" not in err[0] and "link" in err[0], err[0]
    assert "median" not in captured.out  # refused before the report was made
    assert link.is_symlink() and not (tmp_path / "gone").exists()
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    assert main([*verb, "--json", str(loop)]) == 2
    err = capsys.readouterr().err.strip()
    assert "loop.json is a symbolic link loop (it points to" in err and "does not exist" not in err, err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_pipe_or_device_as_json_is_refused_not_replaced_by_a_file(tmp_path, capsys, overwrite):
    """``--json /dev/stdout`` (a link to the terminal or a pipe) was refused with ``exists; pass
    --overwrite to replace it``; with --overwrite the atomic rename replaced the link (as root in a
    container: the system's /dev/stdout) or a named pipe with a regular file, after the whole work.
    A pipe or device is not a file to replace: one line before the work, and it stays as it was."""
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    link = tmp_path / "stdout"
    link.symlink_to(pipe)  # as /dev/stdout -> /proc/self/fd/1 -> the pipe a shell's `| jq` reads
    verb = ["data", "inspect", "--dataset", "shapes", "--split", "val", "--no-progress",
            "--dataset-kwargs", '{"num_val": 2, "size": 32}']
    for target in (pipe, link):
        assert main([*verb, "--json", str(target), *overwrite]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pixelwise: error: ") and "pass --overwrite" not in err[0], err
        assert "pipe" in err[0] and "median" not in captured.out
        assert stat.S_ISFIFO(os.stat(pipe).st_mode) and link.is_symlink()


def _tiny_unet_checkpoint(path, meta_extra=None):
    model = create_model("unet", num_classes=2, base_channels=4)
    meta = {"model": "unet", "model_kwargs": {"base_channels": 4}, "num_classes": 2, "class_names": ["a", "b"],
            **(meta_extra or {})}
    save_checkpoint(path, model, meta)
    return path


def test_flag_of_the_other_task_names_file_and_fix(tmp_path):
    ck = _tiny_unet_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(UserError) as err:
        Predictor.from_checkpoint(ck, score_thresh=0.3)
    assert str(err.value) == (f"--score-thresh does not apply to semantic models like unet ({ck}); "
                              "leave --score-thresh out")


def test_training_images_note_names_the_held_out_split(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray((rng.random((16, 16)) > 0.5).astype(np.uint8)).save(root / "masks" / f"s{i}.png")
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b"]}))
    ck = _tiny_unet_checkpoint(tmp_path / "m.safetensors", {"dataset": "folder", "data": {
        "dataset_kwargs": {}, "train_split": "train", "val_split": "val"}})
    assert main(["eval", "--checkpoint", str(ck), "--dataset", "folder", "--data", str(root),
                 "--split", "all", "--no-bf", "--json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "9 of the 10 images of the all split" in err
    assert err.rstrip().endswith("score its held-out split with --split val --dataset-kwargs '{}'")
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["dataset"]["held_out_split"] == "val"
