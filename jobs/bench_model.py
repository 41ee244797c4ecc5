"""Benchmark HMHN training throughput: images/s of a full train step (forward, loss, backward, Adam).

CPU: fp32 eager at each input size. GPU (when present): fp32 eager as the baseline, beside bf16
autocast + channels_last. Warm-up steps are excluded. Not a test: figures go to docs/MODEL.md.

    .venv/bin/python jobs/bench_model.py                     # defaults: 112 and 224 px, a few steps
    .venv/bin/python jobs/bench_model.py --sizes 112 --cpu-batch 16 --steps 5 --threads 2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hmhn import HMHN, HMHNConfig, LossConfig, hmhn_loss  # noqa: E402
from pipeline.cli import add_config_arguments, build_config, job_parser, parse_args  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = field(default=(112, 224), metadata={"help": "input sizes in pixels"})
    cpu_batch: int = field(default=8, metadata={"help": "images per step on CPU"})
    gpu_batch: int = field(default=64, metadata={"help": "images per step on GPU"})
    steps: int = field(default=3, metadata={"help": "timed steps per setting (CPU; GPU runs 5x as many)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps first (CPU; GPU runs 3x as many)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    num_heads: int = field(default=4, metadata={"help": "MAB heads"})
    skip_cpu: bool = field(default=False, metadata={"help": "only benchmark the GPU"})


def train_step_throughput(model: HMHN, batch: int, size: int, device: torch.device, steps: int, warmup: int,
                          bf16_channels_last: bool) -> float:
    """Images/s of full train steps (fwd + loss + bwd + Adam) on random images."""
    memory_format = torch.channels_last if bf16_channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = torch.rand(batch, device=device) * 63
    loss_config = LossConfig()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_channels_last):
            total, _ = hmhn_loss(model(images), targets, loss_config)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    add_config_arguments(parser, BenchConfig, "benchmark")
    return parser


def main(argv: list[str] | None = None) -> None:
    config = build_config(BenchConfig, parse_args(build_parser(), argv))
    if config.threads > 0:
        torch.set_num_threads(config.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.1f}")
    counts = HMHN(HMHNConfig(num_heads=config.num_heads)).parameter_counts()
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"{'device':<6} {'size':>4} {'batch':>5}  {'mode':<26} {'img/s':>8}")

    def report(device: torch.device, size: int, batch: int, mode: str, value: float, baseline: float | None) -> None:
        ratio = f"  ({value / baseline:.2f}x fp32)" if baseline else ""
        print(f"{device.type:<6} {size:>4} {batch:>5}  {mode:<26} {value:>8.1f}{ratio}", flush=True)

    for size in config.sizes:
        if config.skip_cpu:
            break
        torch.manual_seed(0)
        model = HMHN(HMHNConfig(input_size=size, num_heads=config.num_heads))
        value = train_step_throughput(model, config.cpu_batch, size, torch.device("cpu"), config.steps,
                                      config.warmup, bf16_channels_last=False)
        report(torch.device("cpu"), size, config.cpu_batch, "fp32 eager", value, None)

    if not torch.cuda.is_available():
        print("no GPU present: GPU rows skipped")
        return
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}")
    for size in config.sizes:
        torch.manual_seed(0)
        baseline = train_step_throughput(HMHN(HMHNConfig(input_size=size, num_heads=config.num_heads)),
                                         config.gpu_batch, size, device, 5 * config.steps, 3 * config.warmup,
                                         bf16_channels_last=False)
        report(device, size, config.gpu_batch, "fp32 eager (baseline)", baseline, None)
        torch.manual_seed(0)
        fast = train_step_throughput(HMHN(HMHNConfig(input_size=size, num_heads=config.num_heads)),
                                     config.gpu_batch, size, device, 5 * config.steps, 3 * config.warmup,
                                     bf16_channels_last=True)
        report(device, size, config.gpu_batch, "bf16 autocast+channels_last", fast, baseline)
        print(f"       peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
