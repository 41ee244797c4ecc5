"""Training throughput: Ray Train (1 and 2 workers) vs a plain single-process PyTorch loop.

    python jobs/bench_train.py                       # synthetic shard set, 64 px, CPU
    python jobs/bench_train.py --data data/faces/<version> --input-size 112 --epochs 3

Every variant trains the same HMHN on the same shards with the same per-epoch frame draw
(frames_per_video per training video, decoded + augmented on CPU) and batch size. Throughput is
training samples per second of the epochs after the first (the first pays for start-up),
evaluation excluded. The plain loop decodes in its own process with `--threads` torch threads,
by default the threads a single Ray Train worker gets on this cluster, so compute is like for like.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hmhn import HMHNConfig, hmhn_loss  # noqa: E402
from hmhn.data import open_shardset, sample_train_frames, write_synthetic_shardset  # noqa: E402
from hmhn.image import to_model_input  # noqa: E402
from hmhn.train import TrainConfig, build_model, make_optimizer, run_training  # noqa: E402


def plain_loop(config: TrainConfig, threads: int) -> list[float]:
    """samples/s per epoch of a single-process loop doing the same work as one Ray Train worker."""
    torch.set_num_threads(threads)
    index = open_shardset(config.data)
    model = build_model(config, index.train_mean())
    optimizer, scheduler = make_optimizer(model, config)
    train_rows = index.select("train", with_frames=True)
    videos = [train_rows.slice(i, 1) for i in range(train_rows.num_rows)]
    rates = []
    for _ in range(config.epochs):
        model.train()
        started, samples = time.perf_counter(), 0
        images, labels = [], []
        order = np.random.default_rng().permutation(len(videos))
        for i in order:
            row = videos[i]  # one index row, as the Ray Data UDF gets it
            frames = sample_train_frames({n: row.column(n).to_numpy(zero_copy_only=False) for n in row.column_names},
                                         index.root, config.frames_per_video, config.model.input_size)
            images.append(frames["image"])
            labels.append(frames["label"])
            pool_x, pool_y = np.concatenate(images), np.concatenate(labels)
            last = i == order[-1]
            while len(pool_x) >= config.batch_size or (last and len(pool_x)):
                x = to_model_input(torch.from_numpy(pool_x[:config.batch_size]))
                y = torch.from_numpy(pool_y[:config.batch_size])
                loss, _ = hmhn_loss(model(x), y, config.loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                samples += len(y)
                pool_x, pool_y = pool_x[config.batch_size:], pool_y[config.batch_size:]
            images, labels = [pool_x], [pool_y]
        scheduler.step()
        rates.append(samples / (time.perf_counter() - started))
    return rates


def ray_train(config: TrainConfig, workers: int, tmp: str) -> list[float]:
    result = run_training(dataclasses.replace(config, workers=workers, register=False,
                                              run_name=f"bench-{workers}w-{time.time_ns()}",
                                              storage_path=f"{tmp}/ray_results",
                                              mlflow_uri=f"sqlite:///{tmp}/bench-mlflow.db"))
    return [m["samples_per_s"] for m in result.history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shard set (default: a synthetic one in a temp folder)")
    parser.add_argument("--videos", type=int, default=12, help="training videos of the synthetic shard set")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frames-per-video", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the plain loop "
                                                                 "(default: what one Ray worker gets)")
    args = parser.parse_args(argv)

    from pipeline.ray_utils import cluster_cpus, init_ray
    from pipeline.resources import alive_nodes, plan_training

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_synthetic_shardset(f"{tmp}/synth000", {"train": args.videos, "dev": 2},
                                                     frames_per_video=32, size=args.input_size)
        config = TrainConfig(data=data, epochs=args.epochs, batch_size=args.batch_size,
                             frames_per_video=args.frames_per_video, eval_batch_size=64,
                             model=HMHNConfig(input_size=args.input_size))
        init_ray()
        cpus = cluster_cpus()
        threads = args.threads or plan_training(alive_nodes(), 1, False).threads
        steady = lambda rates: float(np.mean(rates[1:] if len(rates) > 1 else rates))  # noqa: E731
        results = {"plain": steady(plain_loop(config, threads))}
        for workers in args.workers:
            results[f"ray_{workers}w"] = steady(ray_train(config, workers, tmp))
    print(f"\nHMHN {args.input_size}px, batch {args.batch_size}/worker, {args.frames_per_video} frames/video/epoch, "
          f"{cpus:g} CPUs, plain loop {threads} thread(s); samples/s of epochs 2..{args.epochs}:")
    print(f"  plain PyTorch loop     {results['plain']:8.1f}")
    for workers in args.workers:
        rate = results[f"ray_{workers}w"]
        print(f"  Ray Train {workers} worker(s)  {rate:8.1f}   x{rate / results['plain']:.2f} of plain"
              + (f", x{rate / results['ray_1w']:.2f} of 1 worker" if workers != 1 and "ray_1w" in results else ""))
    print(json.dumps({"input_size": args.input_size, "cpus": cpus, "plain_threads": threads, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
