"""pixelwise bench: modes, the GEMM peak of the dtype used, the accuracy guard, --train, --threads
(tiny models and sizes: no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from pixelwise.cli import main
from pixelwise.inference.bench import benchmark
from pixelwise.models import create_model
from pixelwise.models.maskrcnn.fast import reduced_precision_dtype


def test_fast_mode_reports_dtype_peak_and_agreement():
    model = create_model("unet", num_classes=3, base_channels=8)
    r = benchmark(model, (32, 48), mode="fast", repeats=1, model_name="unet")
    dtype = reduced_precision_dtype(torch.device("cpu"))
    assert r["dtype"] == str(dtype).split(".")[-1]
    assert "BN folded" in r["fast_path"] and 0.9 <= r["agreement"] <= 1.0
    assert r["utilization"] == pytest.approx(r["achieved_gflops"] / r["gemm_peak_gflops"])


def test_eager_has_no_agreement_and_train_adds_images_per_second():
    model = create_model("segnet_basic", num_classes=3)
    r = benchmark(model, (32, 48), mode="eager", repeats=1, train=True, threads=1)
    assert r["dtype"] == "float32" and r["agreement"] is None
    assert r["train_img_per_s"] > 0 and r["threads"] == 1


def test_cli_bench_onnx_mode_exports_and_times(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "segnet_basic", "--size", "32x48", "--mode", "onnx", "--repeats", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "onnx" and r["agreement"] >= 0.999 and r["precision"] == "float32"


@pytest.mark.parametrize("argv, message", [
    (["--size", "32x48"], "exactly one of"),
    (["--model", "unet", "--size", "big"], "size 'big'"),
    (["--model", "unet", "--size", "32x48", "--threads", "0"], "--threads"),
])
def test_cli_bench_bad_input(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and message in err and "\n" not in err
