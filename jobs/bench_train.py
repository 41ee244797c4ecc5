"""Training throughput: Ray Train (the production run, default sizing) vs the plain PyTorch loop a
user would run instead.

    python jobs/bench_train.py                       # synthetic shard set, 64 px, CPU, 3 rounds
    python jobs/bench_train.py --threads 1           # the plain loop pinned to 1 torch thread
    python jobs/bench_train.py --data data/faces/<version> --input-size 112 --epochs 4

* Baseline ("plain"): one process, no Ray, the machine's default torch threads (`--threads N`
  overrides). It runs the production pieces: `build_model`, `make_optimizer` and `train_step`
  (the worker loop's step: HMHN, AdamW groups, HMHN loss) from hmhn.train, and per video the Ray
  Data UDF `sample_train_frames` (row-group reads, JPEG decode, augmentation) from hmhn.data, with
  a local shuffle buffer of the size the workers use, `--batch-size` batches, drop_last. Decoding
  happens inline, as in a plain script.
* Ray Train: `hmhn.train.run_training` itself (Ray Data pipeline + Ray Train workers sized by
  pipeline/resources.plan_training with the default sizing), MLflow into a temp store, no model
  registration. Its figure is the `samples_per_s` the workers report.

Throughput = training samples/s of the epochs after the first (the median over them; the first
pays for start-up), evaluation excluded. Rounds alternate the arms (plain, Ray 1 worker, Ray 2
workers, plain, ...), each in its own process and with Ray running only during the Ray arms, so
that load from other jobs on a shared machine hits every arm alike; the figures are medians over
the rounds, beside them every round's ratio, and each arm's best epoch over all rounds (other
jobs only ever slow an epoch down, so on a busy machine the best epochs are the better estimate of
what each arm does on its own). Prints a table, the load average, and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from pipeline.cli import job_parser, parse_args  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # before anything else can change it

from hmhn import HMHNConfig  # noqa: E402
from hmhn.data import open_shardset, sample_train_frames, write_synthetic_shardset  # noqa: E402
from hmhn.train import SHUFFLE_BUFFER_MAX_ROWS, TrainConfig, build_model, make_optimizer, train_step  # noqa: E402


class ShuffleBuffer:
    """A local shuffle buffer like Ray Data's (`local_shuffle_buffer_size`): random batches once it
    holds `rows` rows; O(batch) per batch (the holes are filled from the tail)."""

    def __init__(self, rows: int, extra: int, shape: tuple[int, ...]):
        self.rows = rows
        self.x = np.empty((rows + extra, *shape), np.uint8)
        self.y = np.empty(rows + extra, np.float32)
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.n + len(x) > len(self.x):
            self.x = np.concatenate([self.x, np.empty_like(self.x[:len(x)])])
            self.y = np.concatenate([self.y, np.empty_like(self.y[:len(y)])])
        self.x[self.n:self.n + len(x)], self.y[self.n:self.n + len(y)] = x, y
        self.n += len(x)

    def take(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.choice(self.n, size=k, replace=False)
        x, y = self.x[pick], self.y[pick]  # copies
        tail = np.setdiff1d(np.arange(self.n - k, self.n), pick)
        holes = pick[pick < self.n - k]
        self.x[holes], self.y[holes] = self.x[tail], self.y[tail]
        self.n -= k
        return x, y


def plain_loop(config: TrainConfig, threads: int = 0) -> list[float]:
    """samples/s per epoch of a single-process loop doing the work of the Ray Train run in one process."""
    if threads:
        torch.set_num_threads(threads)
    index = open_shardset(config.data)
    model = build_model(config, index.train_mean())
    optimizer, scheduler = make_optimizer(model, config)
    device = torch.device("cpu")
    rows = index.select("train", with_frames=True)
    videos = [{n: rows.slice(i, 1).column(n).to_numpy(zero_copy_only=False) for n in rows.column_names}
              for i in range(rows.num_rows)]  # one index row each, as the Ray Data UDF gets them
    size = config.model.input_size
    buffer_rows = max(4 * config.batch_size, min(len(videos) * config.frames_per_video, SHUFFLE_BUFFER_MAX_ROWS))
    rng = np.random.default_rng()
    rates = []
    for _ in range(config.epochs):
        model.train()
        started, samples = time.perf_counter(), 0
        pool = ShuffleBuffer(buffer_rows, config.frames_per_video, (size, size, 3))
        order = rng.permutation(len(videos))
        for k, i in enumerate(order):
            frames = sample_train_frames(videos[i], index.root, config.frames_per_video, size, config.augmentation)
            pool.add(frames["image"], frames["label"])
            last = k == len(order) - 1
            while pool.n >= buffer_rows or (last and pool.n >= config.batch_size):  # drop_last, like the workers
                x, y = pool.take(config.batch_size, rng)
                train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y), config, device)
                samples += len(y)
        scheduler.step()
        rates.append(samples / (time.perf_counter() - started))
    return rates


def ray_arm(config: TrainConfig, workers: list[int], tmp: str) -> dict:
    from hmhn.train import run_training
    from pipeline.ray_utils import init_ray
    from pipeline.resources import alive_nodes, plan_training

    init_ray()
    out = {}
    for n in workers:
        plan = plan_training(alive_nodes(), n, False)
        result = run_training(dataclasses.replace(config, workers=n, register=False,
                                                  run_name=f"bench-{n}w-{time.time_ns()}",
                                                  storage_path=f"{tmp}/ray_results",
                                                  mlflow_uri=f"sqlite:///{tmp}/bench-mlflow.db"))
        out[f"ray_{n}w"] = {"rates": [m["samples_per_s"] for m in result.history],
                            "data_wait_s": [m.get("data_wait_s", float("nan")) for m in result.history],
                            "epoch_s": [m["epoch_seconds"] for m in result.history],
                            "plan": plan.describe(n, False), "threads": plan.threads}
    return out


def steady(rates: list[float]) -> float:
    return float(statistics.median(rates[1:] if len(rates) > 1 else rates))


def _child(args, config: TrainConfig) -> int:
    """One arm of one round, in this (fresh) process; writes its figures to --result-file."""
    if args.arm == "plain":
        threads = args.threads or DEFAULT_THREADS
        out = {"plain": {"rates": plain_loop(config, threads), "threads": threads}}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = ray_arm(config, args.workers, tmp)
    Path(args.result_file).write_text(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--data", help="shard set (default: a synthetic one in a temp folder)")
    parser.add_argument("--videos", type=int, default=12, help="training videos of the synthetic shard set")
    parser.add_argument("--input-size", type=int, default=64, help="model input size in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per batch per worker")
    parser.add_argument("--frames-per-video", type=int, default=16, help="training frames drawn per video per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each arm per round")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to measure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of all arms (medians over them)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the plain loop "
                                                                 f"(default: the machine's default, {DEFAULT_THREADS})")
    parser.add_argument("--arm", choices=["plain", "ray"], help=argparse.SUPPRESS)  # internal: one arm, one round
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_synthetic_shardset(f"{tmp}/synth000", {"train": args.videos, "dev": 2},
                                                     frames_per_video=32, size=args.input_size)
        config = TrainConfig(data=data, epochs=args.epochs, batch_size=args.batch_size,
                             frames_per_video=args.frames_per_video, eval_batch_size=64,
                             model=HMHNConfig(input_size=args.input_size))
        if args.arm:
            return _child(args, config)
        rounds: list[dict] = []
        for r in range(args.rounds):
            merged: dict = {"load_before": os.getloadavg()[0]}
            for arm in ("plain", "ray"):
                result_file = f"{tmp}/round{r}-{arm}.json"
                cmd = [sys.executable, __file__, "--arm", arm, "--result-file", result_file, "--data", data,
                       "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
                       "--frames-per-video", str(args.frames_per_video), "--epochs", str(args.epochs),
                       "--threads", str(args.threads), "--workers", *map(str, args.workers)]
                subprocess.run(cmd, check=True)
                merged.update(json.loads(Path(result_file).read_text()))
            merged["load_after"] = os.getloadavg()[0]
            rounds.append(merged)
            print(f"[bench] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {steady(v['rates']):.1f}" for k, v in merged.items() if isinstance(v, dict)), flush=True)

    arms = ["plain", *(f"ray_{n}w" for n in args.workers)]
    per_round = {a: [steady(r[a]["rates"]) for r in rounds] for a in arms}
    median = {a: statistics.median(v) for a, v in per_round.items()}
    best = {a: max(x for r in rounds for x in (r[a]["rates"][1:] or r[a]["rates"])) for a in arms}
    ratios = {a: [x / p for x, p in zip(per_round[a], per_round["plain"])] for a in arms[1:]}
    plain_threads = rounds[0]["plain"]["threads"]
    print(f"\nHMHN {args.input_size}px, batch {args.batch_size}/worker, {args.frames_per_video} frames/video/epoch, "
          f"{os.cpu_count()} CPUs, {args.rounds} round(s); samples/s, median of epochs 2..{args.epochs}, "
          f"median over rounds (load average {min(r['load_before'] for r in rounds):.1f}.."
          f"{max(r['load_after'] for r in rounds):.1f}):")
    print(f"  plain PyTorch loop ({plain_threads} thread(s){', the default' if not args.threads else ''})"
          f"  {median['plain']:7.1f}   rounds: {', '.join(f'{x:.1f}' for x in per_round['plain'])}; "
          f"best epoch {best['plain']:.1f}")
    for n in args.workers:
        a = f"ray_{n}w"
        wait = statistics.median(w for r in rounds for w in r[a]["data_wait_s"][1:] or r[a]["data_wait_s"])
        print(f"  Ray Train {n} worker(s)  {median[a]:7.1f}   x{median[a] / median['plain']:.2f} of plain "
              f"(rounds: {', '.join(f'x{x:.2f}' for x in ratios[a])}); {rounds[0][a]['plan']}; "
              f"waited {wait:.2f} s/epoch for data; best epoch {best[a]:.1f} (x{best[a] / best['plain']:.2f})"
              + (f"; x{median[a] / median['ray_1w']:.2f} of 1 worker" if n != 1 and "ray_1w" in median else ""))
    print(json.dumps({"input_size": args.input_size, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                      "plain_threads": plain_threads, "rounds": args.rounds, "samples_per_s": median,
                      "ratio_to_plain": {a: median[a] / median["plain"] for a in arms[1:]},
                      "per_round": per_round, "per_round_ratio": ratios, "best_epoch": best,
                      "best_ratio_to_plain": {a: best[a] / best["plain"] for a in arms[1:]},
                      "load": [[r["load_before"], r["load_after"]] for r in rounds]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
