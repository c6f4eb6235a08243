"""Seconds per optimizer step of a semantic model in float32: NCHW (as built) against channels-last
(`--channels-last` in training) and, with --compile, torch.compile of each; with --bf16, each layout
also under bf16 autocast (`--amp bf16` in training: fast with AMX, emulated without bf16 instructions).

    PYTHONPATH=src python benchmarks/bench_train_step.py --model unet \
        --model-kwargs '{"base_channels": 16, "batch_norm": true, "dropout": 0.5}' \
        --in-channels 1 --classes 2 --size 256x256 --batch 4 --threads 2

One step = forward, cross-entropy on fixed random labels, backward, Adam update, as the trainer
does. The layouts are timed interleaved, round by round (the machine is noisy), each from the same
initial weights; the ratio is NCHW's median over each layout's. Agreement: the loss of a first
step (dropout off) and the relative error of all its gradients against the same step in float64
(NCHW), |g - g64| / |g64|: float32 rounding, amplified by BatchNorm's cancellations, in every
layout; a layout that computed something else would be off by orders of magnitude more. bf16
keeps 8 bits of mantissa: for the CamVid U-Net of docs/recipes.md its gradients were 2.5e-1 off
(the loss 1e-4), so compare bf16 layouts with each other, not with the float32 ones.
Prints a line per layout; --json writes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pixelwise.models import create_model, forward_logits


def logits(forward: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The float32 logits of ``forward`` on ``x``, under bf16 autocast if ``bf16`` (as the trainer)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward_logits(forward, x)
    return out.float()


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        loss = F.cross_entropy(logits(model, x, bf16), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def gradients(model: torch.nn.Module, forward: torch.nn.Module, x: torch.Tensor,
              y: torch.Tensor, bf16: bool = False) -> tuple[float, torch.Tensor]:
    """Loss and all parameter gradients (one float64 vector) of one forward/backward through
    ``forward`` (the model or its compiled form), no update. Dropout is switched off for it: it
    draws its mask in memory order, so two layouts draw different (equally distributed) masks."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.eval()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(logits(forward, x, bf16), y)
    loss.backward()
    for m in dropouts:
        m.train()
    grads = torch.cat([p.grad.double().flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                       for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet")
    p.add_argument("--model-kwargs", default='{"base_channels": 16, "batch_norm": true, "dropout": 0.5}')
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--size", default="256x256")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per layout (after 2 warm-up steps)")
    p.add_argument("--compile", action="store_true", help="also torch.compile each layout (minutes of compiling)")
    p.add_argument("--bf16", action="store_true", help="also time each layout under bf16 autocast")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    kwargs = json.loads(args.model_kwargs)
    if args.in_channels != 3:
        kwargs["in_channels"] = args.in_channels
    base = create_model(args.model, num_classes=args.classes, **kwargs)
    x = torch.randn(args.batch, args.in_channels, h, w)
    y = torch.randint(0, args.classes, (args.batch, h, w))

    layouts = {"nchw": False, "channels_last": True}
    variants = [(f"{name}{'+compile' if c else ''}{'+bf16' if b else ''}", cl, c, b)
                for b in ([False, True] if args.bf16 else [False])
                for c in ([False, True] if args.compile else [False]) for name, cl in layouts.items()]
    # the independent reference: the same step of the NCHW model in float64
    exact = copy.deepcopy(base).train().double()
    _, reference = gradients(exact, exact, x.double(), y)
    steps, agreement = {}, {}
    for name, cl, compiled, bf16 in variants:
        model = copy.deepcopy(base).train()
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        if cl:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        runner = torch.compile(model) if compiled else model
        loss, grads = gradients(model, runner, xi, y, bf16)
        # all gradients as one vector, |float32 - float64| / |float64| (per tensor would mislead: a
        # convolution bias in front of BatchNorm has an exact gradient of 0, so only rounding noise)
        agreement[name] = {"loss": loss, "grad_rel_err": ((grads - reference).norm() / reference.norm()).item()}
        step = make_step(runner, xi, y, bf16)
        t = time.perf_counter()
        step()
        step()  # warm-up (and compiling)
        agreement[name]["warmup_s"] = time.perf_counter() - t
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    rows = []
    ref_median = statistics.median(times["nchw"])
    for name in steps:
        median = statistics.median(times[name])
        row = {"layout": name, "median_s": round(median, 4), "min_s": round(min(times[name]), 4),
               "speedup": round(ref_median / median, 3), "first_loss": agreement[name]["loss"],
               "grad_rel_err": agreement[name]["grad_rel_err"], "warmup_s": round(agreement[name]["warmup_s"], 1)}
        rows.append(row)
        print(f"{name:24s} median {median:.4f} s/step  min {row['min_s']:.4f}  x{row['speedup']:.2f}  "
              f"loss {row['first_loss']:.6f}  grad error vs float64 {row['grad_rel_err']:.1e}  "
              f"warm-up {row['warmup_s']} s")
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
