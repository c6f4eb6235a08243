"""Load on ``pixelwise serve``: N concurrent clients on loopback for a bounded time.

Starts ``pixelwise serve`` in a subprocess on a free 127.0.0.1 port (a small U-Net made here
unless ``--checkpoint``), then runs ``--clients`` concurrent clients, each posting the same image
to ``/api/predict`` again and again for ``--seconds`` (each request also times out after
``--timeout``), and prints one JSON document: requests, answers by status, throughput (answered
200 per second), client-side latency p50/p95/p99 of the 200s, the server's own ``ms`` and
``queue_ms``, and the machine (cores, load average before and after: this benchmark shares the
machine with whatever else runs on it).

    python benchmarks/serve_load.py --clients 32 --seconds 30
    python benchmarks/serve_load.py --clients 100 --queue 16 --seconds 20   # overload: some 503s

Traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from pixelwise import create_model, save_checkpoint
from pixelwise.data.shapes import CLASS_NAMES, PALETTE, ShapesDataset

SMALL_UNET = {"base_channels": 8, "batch_norm": True, "dropout": 0.0}


def small_checkpoint(folder: Path) -> Path:
    """A U-Net with base 8 channels (0.49M parameters) for the shapes classes, random weights
    (the work per image is what matters here, not the masks)."""
    torch.manual_seed(0)
    path = folder / "unet8.safetensors"
    save_checkpoint(path, create_model("unet", num_classes=4, **SMALL_UNET).eval(),
                    {"model": "unet", "num_classes": 4, "model_kwargs": SMALL_UNET, "task": "semantic",
                     "class_names": CLASS_NAMES, "palette": PALETTE})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, workers: int, queue: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixelwise", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--workers", str(workers), "--queue", str(queue), "--log-level", "warning"]
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("pixelwise serve exited:\n" + log.read_text()[-2000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("pixelwise serve did not answer within 120 s")


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def load(url: str, image: bytes, clients: int, seconds: float, timeout: float) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    server_ms: list[float] = []
    queue_ms: list[float] = []
    retry_after: list[int] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one_client() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = await client.post("/api/predict", files={"image": ("scene.png", image, "image/png")})
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - start) * 1000)
                    body = r.json()
                    server_ms.append(body["ms"])
                    queue_ms.append(body["queue_ms"])
                elif r.status_code == 503:
                    retry_after.append(int(r.headers.get("retry-after", "0")))
                    await asyncio.sleep(0.05)  # a client that is told to wait does not hammer

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - began

    ok = statuses.get(200, 0)
    return {
        "clients": clients, "seconds": round(wall, 1), "requests": sum(statuses.values()),
        "status": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "throughput_per_s": round(ok / wall, 2),
        "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                       "p99": percentile(latencies, 99), "max": percentile(latencies, 100)},
        "server_ms_p50": percentile(server_ms, 50), "queue_ms_p50": percentile(queue_ms, 50),
        "retry_after_s": sorted(set(retry_after)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="default: a small U-Net (base 8) made in a temporary folder")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0, help="how long the clients send (bounded)")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--size", type=int, default=256, help="side of the square test image (a shapes scene)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--queue", type=int, default=64)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else small_checkpoint(Path(tmp))
        buf_path = Path(tmp) / "scene.png"
        Image.fromarray(ShapesDataset(split="test", num_test=1, size=args.size).load(0).image).save(buf_path)
        image = buf_path.read_bytes()
        port = free_port()
        load_before = os.getloadavg()
        server = start_server(checkpoint, port, args.workers, args.queue, Path(tmp) / "server.log")
        try:
            result = asyncio.run(load(f"http://127.0.0.1:{port}", image, args.clients, args.seconds, args.timeout))
        finally:
            server.terminate()
            server.wait(30)
        result.update({
            "model": "unet base 8 (0.49M parameters, random weights)" if not args.checkpoint else str(checkpoint),
            "image": f"{args.size}x{args.size} PNG ({len(image)} bytes)", "workers": args.workers, "queue": args.queue,
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "loadavg_before": [round(v, 2) for v in load_before],
                        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                        "note": "client and server share this machine with whatever else runs on it"},
        })
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
