"""pixelwise bench: modes, the GEMM peak of the dtype used, the accuracy guard, --train, --threads
(tiny models and sizes: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import types

import pytest
import torch
import torch.nn as nn

from pixelwise.cli import main
from pixelwise.errors import UserError
from pixelwise.inference import bench
from pixelwise.inference.bench import benchmark
from pixelwise.models import create_model
from pixelwise.models.maskrcnn import fast as maskrcnn_fast
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


def test_bench_feeds_a_gray_model_its_one_channel(tmp_path):
    """A 1-channel checkpoint (the ISBI U-Net) or its ONNX file got a 3-channel input: a traceback
    in every mode, and no FLOPs for the ONNX file."""
    from pixelwise import save_checkpoint

    model = create_model("unet", num_classes=2, base_channels=4, in_channels=1).eval()
    ckpt = tmp_path / "gray.safetensors"
    save_checkpoint(ckpt, model, {"model": "unet", "num_classes": 2, "model_kwargs": {"base_channels": 4,
                                                                                    "in_channels": 1}})
    runs = [["--checkpoint", str(ckpt)], ["--checkpoint", str(ckpt), "--mode", "fast"]]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "g.onnx")]) == 0
        runs.append(["--onnx", str(tmp_path / "g.onnx")])
    for i, run in enumerate(runs):
        out = tmp_path / f"{i}.json"
        assert main(["bench", *run, "--size", "32x48", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["gflops_per_img"] > 0 and r["img_per_s"] > 0, run


@pytest.mark.parametrize("argv, message", [
    (["--size", "32x48"], "exactly one of"),
    (["--model", "unet", "--size", "big"], "size 'big'"),
    (["--model", "unet", "--size", "32x48", "--threads", "0"], "--threads"),
    # --num-classes is refused with a checkpoint (it has its own classes), as export refuses it
    (["--checkpoint", "missing.safetensors", "--num-classes", "7", "--size", "32x48"],
     "--num-classes goes with --model"),
    (["--onnx", "missing.onnx", "--num-classes", "7", "--size", "32x48"], "--num-classes goes with --model"),
    (["--model", "unet", "--num-classes", "0", "--size", "32x48"], "--num-classes must be at least 1"),
    # --compile means something only for the semantic fast path
    (["--model", "enet", "--size", "32x48", "--compile"], "--compile goes with --mode fast"),
    (["--model", "enet", "--size", "32x48", "--mode", "int8", "--compile"], "--compile goes with --mode fast"),
    (["--model", "enet", "--size", "32x48", "--mode", "onnx", "--compile"], "--compile goes with --mode fast"),
    (["--model", "maskrcnn_resnet18_fpn", "--size", "32x48", "--mode", "fast", "--compile"],
     "--compile goes with --mode fast (semantic models)"),
])
def test_cli_bench_bad_input(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelwise: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("measured, why", [(1e-9, "below the achieved"), (float("nan"), "no float32 GEMM")])
def test_utilization_is_never_above_the_peak(monkeypatch, measured, why):
    # a "peak" below the achieved rate (torch._int_mm without VNNI) is no ceiling: no peak, no
    # utilization, and the reason; as where no GEMM of the dtype can be measured at all (NaN)
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: measured)
    r = benchmark(create_model("segnet_basic", num_classes=3), (32, 48), repeats=1)
    assert r["achieved_gflops"] > 0
    assert r["gemm_peak_gflops"] is None and r["utilization"] is None and why in r["peak_note"]


def test_a_real_peak_has_no_note():
    r = benchmark(create_model("segnet_basic", num_classes=3), (32, 48), repeats=1)
    if r["gemm_peak_gflops"] is not None:
        assert r["peak_note"] is None and 0 < r["utilization"] <= 1


def test_compile_is_refused_where_nothing_would_be_compiled():
    # Mask R-CNN's fast path ignores torch.compile: no compile_s for a run that compiled nothing
    with pytest.raises(UserError, match="--compile goes with --mode fast"):
        benchmark(create_model("maskrcnn_resnet18_fpn", num_classes=3), (32, 48), mode="fast", task="instance",
                  repeats=1, compile=True)
    for mode in ("eager", "int8", "onnx"):
        with pytest.raises(UserError, match="--compile goes with --mode fast"):
            benchmark(create_model("segnet_basic", num_classes=3), (32, 48), mode=mode, repeats=1, compile=True)


@pytest.mark.parametrize("mode", ["fast", "int8"])
def test_peak_memory_is_read_before_any_float32_reference_pass(monkeypatch, mode):
    # peak_mem_mb is the mode's own: the FLOP count and the agreement reference run the float32
    # model on the input, and must come after the peak is read
    model = create_model("unet", num_classes=3, base_channels=8, batch_norm=True)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(module is model))
    seen = {}
    monkeypatch.setattr(bench, "peak_memory_mb", lambda dev: seen.setdefault("eager_calls", sum(calls)) or 1.0)
    resets = []
    monkeypatch.setattr(bench, "reset_peak_memory", lambda dev: resets.append(sum(calls)) or True)
    r = benchmark(model, (32, 48), mode=mode, repeats=1, model_name="unet")
    assert resets == [0] and seen["eager_calls"] == 0, (resets, seen)
    assert sum(calls) >= 2 and r["agreement"] is not None and r["gflops_per_img"] > 0  # counted afterwards


def test_peak_rss_can_be_reset_on_linux():
    np = pytest.importorskip("numpy")
    if not bench.reset_peak_memory(torch.device("cpu")):
        pytest.skip("this system cannot reset the peak resident set")
    before = bench.peak_rss_mb()
    block = np.ones(40 * 2**20)  # 320 MiB, touched
    del block
    grown = bench.peak_rss_mb()
    assert grown >= before + 200
    assert bench.reset_peak_memory(torch.device("cpu"))
    assert bench.peak_rss_mb() < grown - 200


def test_fast_mode_says_which_precision_and_keeps_unmeasured_models_in_float32(monkeypatch):
    # a CPU with bf16 kernels: segnet_basic's bf16 accuracy was never measured, so it runs float32
    monkeypatch.setattr(maskrcnn_fast, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    r = benchmark(create_model("segnet_basic", num_classes=3), (32, 48), mode="fast", repeats=1,
                  model_name="segnet_basic")
    assert r["dtype"] == "float32" and "float32 weights (bfloat16 not measured for segnet_basic)" in r["fast_path"]


def test_bench_of_a_bare_onnx_export_counts_no_flops_it_cannot_know(tmp_path):
    """export_onnx of a Python model without a checkpoint's metadata: bench rebuilt the default
    architecture (1.505 GFLOPs for a 0.006-GFLOP U-Net), or refused the class name 'UNet'."""
    pytest.importorskip("onnxruntime")
    from pixelwise.inference.export import export_onnx

    model = create_model("unet", num_classes=3, base_channels=4).eval()
    for i, name in enumerate(["unet", None]):
        path = tmp_path / f"bare{i}.onnx"
        export_onnx(model, path, model_name=name or "", sizes=[(1, 32, 32)])
        out = tmp_path / f"{i}.json"
        assert main(["bench", "--onnx", str(path), "--size", "32x32", "--repeats", "1", "--threads", "1",
                     "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["gflops_per_img"] is None and r["img_per_s"] > 0, r


def test_the_auxiliary_head_is_neither_run_nor_counted_at_inference():
    """An aux_loss checkpoint's FCN head was computed and thrown away by eager and fast inference
    (7% of fcn_resnet50's work) and counted in bench's FLOPs, which onnx and int8 do not run."""
    from pixelwise.models import forward_logits

    with_aux = create_model("deeplabv3plus_resnet18", num_classes=3, aux_loss=True).eval()
    without = create_model("deeplabv3plus_resnet18", num_classes=3).eval()
    without.load_state_dict({k: v for k, v in with_aux.state_dict().items() if not k.startswith("aux_classifier.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(with_aux, x), with_aux(x)["out"])  # the same logits
        assert set(with_aux(x)) == {"out", "aux"}  # forward stays torchvision's
    aux_flops = bench.count_flops(lambda: create_model("deeplabv3plus_resnet18", num_classes=3, aux_loss=True),
                                  (64, 64))
    assert aux_flops == bench.count_flops(lambda: create_model("deeplabv3plus_resnet18", num_classes=3), (64, 64))
    r = benchmark(with_aux, (64, 64), mode="eager", repeats=1, threads=1)
    assert r["gflops_per_img"] * 1e9 == pytest.approx(aux_flops)


def test_float32_on_an_ampere_gpu_is_reported_as_tf32(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 on Ampere and later (torch's default), while bench
    said dtype float32 and took the strict float32 matmul rate (1/7 of an H100's TF32) as the peak."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert bench.convolutions_in_tf32(cuda, torch.float32)
    assert not bench.convolutions_in_tf32(cuda, torch.bfloat16)
    assert not bench.convolutions_in_tf32(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not bench.convolutions_in_tf32(cuda, torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no TF32
    assert not bench.convolutions_in_tf32(cuda, torch.float32)
    before = torch.backends.cuda.matmul.allow_tf32
    bench.gemm_peak_gflops(torch.device("cpu"), n=64, repeats=1)
    assert torch.backends.cuda.matmul.allow_tf32 == before  # the caller's setting is left as it was


def test_benchmark_puts_the_callers_model_and_threads_back():
    """benchmark() left torch's thread count at its threads= and the caller's model in eval mode."""
    model = create_model("enet", num_classes=3).train()
    before = torch.get_num_threads()
    r = benchmark(model, (32, 32), repeats=1, threads=1)
    assert r["threads"] == 1 and torch.get_num_threads() == before and model.training


def test_the_peak_memory_of_a_bench_started_from_a_large_process_is_its_own():
    """ru_maxrss keeps the peak of the process a bench is started from (across exec): a tiny U-Net
    benched from a script that held 1.5 GiB reported 1,510 MiB."""
    import subprocess
    import sys

    np = pytest.importorskip("numpy")
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak resident set is read from /proc on Linux")
    block = np.ones(80 * 2**20)  # 640 MiB, touched, held while the child starts
    child = subprocess.run([sys.executable, "-c", "from pixelwise.inference.bench import peak_rss_mb; "
                            "print(peak_rss_mb())"], capture_output=True, text=True, check=True)
    del block
    assert float(child.stdout) < 400, child.stdout


def test_agreement_is_the_share_of_pixels_whose_argmax_is_float32s(monkeypatch):
    # a "fast" runner whose classes are swapped on the top half of the image: agreement exactly 0.5
    model = nn.Conv2d(3, 2, 1)

    def flipped(x):
        with torch.no_grad():
            out = model(x)
        top = out[:, :, : x.shape[2] // 2]
        return torch.cat([top.flip(1), out[:, :, x.shape[2] // 2:]], 2)

    monkeypatch.setattr(bench, "make_runner", lambda *args, **kwargs: flipped)
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: 1e6)
    r = benchmark(model, (32, 48), mode="fast", repeats=1)
    assert r["agreement"] == 0.5


def test_int8_is_calibrated_on_other_images_of_the_timed_size(monkeypatch):
    seen = {}
    model = nn.Conv2d(3, 2, 1)

    def runner(model, mode, model_name, dev, calibration=None, measuring=False):
        seen["calibration"] = calibration
        return lambda x: seen.setdefault("timed", x) is not None and model(x)

    monkeypatch.setattr(bench, "make_runner", runner)
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: 1e6)
    r = benchmark(model, (24, 40), batch=2, mode="int8", repeats=1)
    calibration, timed = seen["calibration"], seen["timed"]
    assert r["calibrate_s"] >= 0 and len(calibration) == bench.INT8_CALIBRATION
    assert all(tuple(c.shape) == (1, 3, 24, 40) for c in calibration)
    assert not any(torch.equal(c[0], image) for c in calibration for image in timed)


def test_the_gemm_peak_of_float32_on_a_tf32_device_is_timed_in_tf32(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "convolutions_in_tf32", lambda device, dtype: True)
    monkeypatch.setattr(bench, "_best_seconds",
                        lambda fn, device, repeats: seen.append(torch.backends.cuda.matmul.allow_tf32) or 2.0)
    before = torch.backends.cuda.matmul.allow_tf32  # torch's own setter: not monkeypatch's to restore
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert bench.gemm_peak_gflops(torch.device("cpu"), n=64) == pytest.approx(2 * 64**3 / 2.0 / 1e9)
        assert seen == [True] and torch.backends.cuda.matmul.allow_tf32 is False  # and the caller's given back
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_peak_memory_is_in_mib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    assert bench.peak_memory_mb(torch.device("cuda")) == 3.0
    # without /proc (other systems): getrusage's ru_maxrss, in bytes on macOS and KiB elsewhere
    resource = pytest.importorskip("resource")
    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(bench, "open", no_proc, raising=False)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**20))
    monkeypatch.setattr(bench.sys, "platform", "darwin")
    assert bench.peak_rss_mb() == 3.0
    monkeypatch.setattr(bench.sys, "platform", "linux")
    assert bench.peak_rss_mb() == 3 * 1024


def test_train_steps_are_timed_at_most_three_times(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "train_step_speed", lambda model, x, task, repeats: seen.append(repeats) or 1.0)
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: 1e6)
    for repeats in (1, 2, 7):
        benchmark(nn.Conv2d(3, 2, 1), (8, 8), repeats=repeats, train=True)
    assert seen == [1, 2, 3]


def test_the_temporary_onnx_file_is_exported_at_the_benchmarks_size_and_left_nowhere_on_failure(monkeypatch,
                                                                                               tmp_path):
    seen = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench, "export_onnx", lambda model, path, sizes=None: seen.append(sizes))
    path = bench._export_temporary(nn.Conv2d(3, 2, 1), torch.zeros(2, 3, 24, 40))
    assert seen == [[(2, 24, 40)]] and path.startswith(str(tmp_path))

    def failing(model, path, sizes=None):
        raise RuntimeError("export failed")

    monkeypatch.setattr(bench, "export_onnx", failing)
    with pytest.raises(RuntimeError, match="export failed"):
        bench._export_temporary(nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 8, 8))
    assert [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[-1]]  # only the first, successful one


def test_count_flops_defaults_to_a_512_square_three_channel_input():
    # a 1x1 convolution 3 -> 2 channels: 2 FLOPs (multiply, add) per weight per output pixel
    assert bench.count_flops(lambda: nn.Conv2d(3, 2, 1, bias=False)) == 2 * 3 * 2 * 512 * 512


def test_peak_notes_name_the_gemm_kernel():
    cpu = torch.device("cpu")
    assert bench.peak_and_note(math.nan, None, torch.float32, cpu) == (
        None, "no float32 GEMM (matmul) on cpu in this torch: no peak to compare with")
    peak, note = bench.peak_and_note(1.0, 2.0, torch.int8, cpu)
    assert peak is None and note.startswith("the measured int8 GEMM rate (torch._int_mm, 1 G/s) is below the "
                                            "achieved 2 G/s")
    assert bench.peak_and_note(3.0, 2.0, torch.bfloat16, cpu) == (3.0, None)


def test_the_peak_resident_set_can_be_reset_where_linux_allows_it():
    if os.access("/proc/self/clear_refs", os.W_OK):
        assert bench.reset_peak_memory(torch.device("cpu")) is True


def test_instance_fast_mode_times_the_fast_instance_runner_on_a_list_of_images(monkeypatch):
    # (a real Mask R-CNN takes seconds a forward at random weights: the runner is stubbed)
    seen = []

    def instance_runner(model, mode, model_name):
        def run(images):
            seen.append((mode, [tuple(image.shape) for image in images]))
            return [{}] * len(images)
        run.dtype = torch.bfloat16
        return run

    monkeypatch.setattr(bench, "instance_runner", instance_runner)
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: 1e6)
    r = benchmark(nn.Identity(), (24, 40), batch=2, mode="fast", task="instance", repeats=1, flops=1e9)
    assert seen and all(s == ("fast", [(3, 24, 40), (3, 24, 40)]) for s in seen)
    assert r["dtype"] == "bfloat16" and r["agreement"] is None
    assert r["fast_path"].startswith("optimize_for_inference") and "bfloat16 convolutions" in r["fast_path"]


def test_a_peak_below_the_achieved_rate_blames_vnni_only_for_int8_on_a_cpu_without_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = ("the measured {} GEMM rate ({}, 1 G/s) is below the achieved 2 G/s, so it is no ceiling{}; "
             "no utilization reported")
    vnni = ": without VNNI it is a slow reference kernel, the quantised convolutions are not"
    monkeypatch.setattr(bench, "cpu_has_vnni", lambda: False)
    assert bench.peak_and_note(1.0, 2.0, torch.float32, cpu) == (None, plain.format("float32", "matmul", ""))
    assert bench.peak_and_note(1.0, 2.0, torch.int8, cuda) == (None, plain.format("int8", "torch._int_mm", ""))
    assert bench.peak_and_note(1.0, 2.0, torch.int8, cpu) == (None, plain.format("int8", "torch._int_mm", vnni))
    monkeypatch.setattr(bench, "cpu_has_vnni", lambda: True)
    assert bench.peak_and_note(1.0, 2.0, torch.int8, cpu) == (None, plain.format("int8", "torch._int_mm", ""))


def test_train_speed_counts_the_images_of_the_batch_per_second(monkeypatch):
    """Images per second of a step: the batch (not another dimension of it) over the step's time; a
    batch of one for a BatchNorm model is run as two (BatchNorm needs two values per channel)."""
    monkeypatch.setattr(bench, "_best_seconds", lambda fn, device, repeats: fn() or 0.5)
    x = torch.rand(3, 3, 4, 8)
    assert bench.train_step_speed(nn.Conv2d(3, 2, 1), x, "semantic") == 6.0
    with_bn = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    assert bench.train_step_speed(with_bn, x[:1], "semantic") == 4.0
    assert bench.train_step_speed(nn.Conv2d(3, 2, 1), x[:1], "semantic") == 2.0


def test_the_int8_gemm_peak_counts_two_ops_per_multiply_add_and_is_timed_at_256_without_vnni(monkeypatch):
    monkeypatch.setattr(bench, "_best_seconds", lambda fn, device, repeats: 2.0)
    monkeypatch.setattr(bench, "cpu_has_vnni", lambda: True)
    assert bench.gemm_peak_gflops(torch.device("cpu"), torch.int8, n=64) == pytest.approx(2 * 64**3 / 2.0 / 1e9)
    monkeypatch.setattr(bench, "cpu_has_vnni", lambda: False)  # the slow reference kernel: a smaller matrix
    assert bench.gemm_peak_gflops(torch.device("cpu"), torch.int8, n=1024) == pytest.approx(2 * 256**3 / 2.0 / 1e9)


def test_the_rates_of_a_bench_are_worked_from_the_best_time_the_batch_and_the_flops(monkeypatch):
    """Hand-worked: a bias-free 1x1 convolution 3 -> 2 on 8x8 is 2 * 3 * 2 * 64 = 768 FLOPs an image;
    a batch of 2 in 0.25 s is 8 images/s, 125 ms an image, 2 * 768 / 0.25 FLOP/s achieved."""
    monkeypatch.setattr(bench, "_best_seconds", lambda fn, device, repeats: (fn(), 0.25)[1])
    monkeypatch.setattr(bench, "gemm_peak_gflops", lambda device, dtype=None: 1e-3)
    r = benchmark(nn.Conv2d(3, 2, 1, bias=False), (8, 8), batch=2, repeats=1)
    assert (r["img_per_s"], r["ms_per_img"]) == (8.0, 125.0)
    assert r["gflops_per_img"] == pytest.approx(768e-9)
    assert r["achieved_gflops"] == pytest.approx(2 * 768 / 0.25 / 1e9)
    assert r["utilization"] == pytest.approx(2 * 768 / 0.25 / 1e9 / 1e-3) and r["gemm_peak_gflops"] == 1e-3
