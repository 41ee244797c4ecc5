"""Preprocessing throughput and memory on the demo data (figures, not a test).

    python jobs/bench_preprocess.py [--demo-dir data/demo/videos] [--videos 32] [--repeats 3]

For C = 1 and 2 CPUs, `--repeats` times, measured back to back so that machine noise hits the
baseline and the pipeline alike:
  baseline: C plain processes (no Ray), pinned one per core, split the N videos between them and,
    after loading the detector, decode each chunk and then detect on it (MTCNN + pick a face +
    align + JPEG), timing decode and detect apart: decode-only and detect-only frames/s, and the
    decode+detect limit on C cores = frames / (slowest process's decode + detect seconds).
  pipeline: the real job on N and on 2N videos, each in a fresh process with its own local Ray
    of exactly C CPUs, pinned to C cores (Ray's own processes share those cores):
    end-to-end frames/s of the N-video run (Ray Data and actor start-up included), and
    steady-state frames/s of the 2N-video run: frames committed after the first video's commit,
      over the time from that commit to the last (start-up drops out: the rate a long job runs at),
    each as a ratio to the limit (target >= 0.80), and the peak resident memory of the whole Ray
    process tree for N and 2N videos (it must not grow with the number of videos).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import job_parser, parse_args  # noqa: E402
from pipeline.decode import SamplingConfig  # noqa: E402

SAMPLING = SamplingConfig(mode="fps", fps=5.0)


def _manifest_rows(demo_dir: Path, n: int) -> list[dict]:
    from pipeline.manifest import load_manifest

    rows = load_manifest("csv", str(demo_dir / "manifest.csv")).to_pylist()
    repeated = (rows * (n // len(rows) + 1))[:n]
    # Repeated videos get their own ids (and own dicts: the list repeats the same objects).
    return [{**r, "video_id": f"{r['video_id']}_{i}"} for i, r in enumerate(repeated)]


# ----------------------------------------------------------------------------------------------
# Baseline: decode and detect in plain processes, one per core


def _component_worker(core: int, cores: int, uris: list[str], barrier, results) -> None:
    """Decode each chunk, then detect on it, as the pipeline's actors do, timing the two apart."""
    import cv2

    from pipeline.align import AlignConfig, align_face, pick_face
    from pipeline.decode import iter_frame_chunks
    from pipeline.detect import DetectorConfig, make_detector
    from pipeline.jpeg import encode_jpeg

    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)  # as in the pipeline's actors
    detector, align = make_detector(DetectorConfig()), AlignConfig()
    frames = decode_s = detect_s = 0.0
    barrier.wait()  # all cores start together: they share caches and memory bandwidth
    for uri in uris[core::cores]:
        chunks = iter_frame_chunks(uri, SAMPLING)
        while True:
            tic = time.perf_counter()
            chunk = next(chunks, None)
            decode_s += time.perf_counter() - tic
            if chunk is None:
                break
            tic = time.perf_counter()
            for frame in chunk.frames:
                face = pick_face(detector.detect(frame), frame.shape[:2])
                if face is not None:
                    encode_jpeg(align_face(frame, face.landmarks, align))
            detect_s += time.perf_counter() - tic
            frames += len(chunk.frames)
    results.put((frames, decode_s, detect_s))


def measure_components(uris: list[str], cpus: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(cpus), ctx.Queue()
    workers = [ctx.Process(target=_component_worker, args=(core, cpus, uris, barrier, results)) for core in range(cpus)]
    for w in workers:
        w.start()
    parts = [results.get(timeout=900) for _ in workers]
    for w in workers:
        w.join()
    frames = sum(p[0] for p in parts)
    return {"frames": int(frames),
            "decode_fps": frames / max(p[1] for p in parts),
            "detect_fps": frames / max(p[2] for p in parts),
            # The plain loop's own rate: what decode+detect allow on these cores with no Ray at all.
            "limit_fps": frames / max(p[1] + p[2] for p in parts)}


# ----------------------------------------------------------------------------------------------
# The pipeline, in a child process with its own Ray


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Ray's raylet, workers, actors), from /proc."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        parent[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(pid, 0) for pid in tree)


def run_pipeline_once(demo_dir: Path, n_videos: int, cpus: int) -> dict:
    """Child process: the real pipeline on a fresh local Ray with `cpus` CPUs; peak tree RSS."""
    import pyarrow as pa

    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.shardset import ShardIndex
    from pipeline.ray_utils import init_ray
    from pipeline.schema import MANIFEST_SCHEMA

    os.environ.pop("RAY_ADDRESS", None)
    # Pin this process (and so Ray's processes, which inherit it) to `cpus` physical cores: a
    # "1-CPU" Ray on a 2-core machine would otherwise still run two things side by side.
    os.sched_setaffinity(0, set(range(cpus)))
    init_ray(num_cpus=cpus)
    rows = _manifest_rows(demo_dir, n_videos)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as out:
        config = PreprocessConfig(dataset="csv", input=str(demo_dir / "manifest.csv"), output=out,
                                  sampling=SAMPLING, progress_every_s=1e9,
                                  # a commit per video: the steady-state window below needs commit times
                                  videos_per_task=1, commit_every=1)
        tic = time.perf_counter()
        summary = run_preprocess(config, manifest=pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                 printer=lambda *_: None)
        seconds = time.perf_counter() - tic
        status = ShardIndex.load(summary["shard_set"], columns=["frames_decoded", "committed_ns"]).table.to_pylist()
    stop.set()
    thread.join()
    frames = summary["this_run"]["frames_decoded"]
    # Steady state inside this run: from the first video's commit to the last one's (commit-log
    # times), so start-up and the first videos' latency drop out without subtracting two
    # separately timed runs.
    first = min(s["committed_ns"] for s in status)
    after_first = [s for s in status if s["committed_ns"] > first]
    steady = sum(s["frames_decoded"] for s in after_first) / ((max(s["committed_ns"] for s in status) - first) / 1e9)
    return {"cpus": cpus, "videos": n_videos, "frames": frames, "seconds": seconds,
            "fps": frames / seconds, "steady_fps": steady, "peak_rss_mb": peak[0] / 2**20}


def _child(demo_dir: Path, n_videos: int, cpus: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--demo-dir", str(demo_dir), "--_child", f"{n_videos},{cpus}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--demo-dir", default="data/demo/videos", help="demo videos (make demo's; generated there if missing)")
    parser.add_argument("--videos", type=int, default=32, help="N: videos per pipeline run, also run with 2N "
                        "(repeating the demo videos under new ids); 32 = the demo set once")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per CPU count (median reported)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    demo_dir = Path(args.demo_dir)
    if args._child:
        n, c = (int(v) for v in args._child.split(","))
        print(json.dumps(run_pipeline_once(demo_dir, n, c)))
        return 0
    if not (demo_dir / "manifest.csv").exists():
        from pipeline.demo_data import DemoDataConfig, make_demo_dataset

        make_demo_dataset(DemoDataConfig(output=str(demo_dir)))
    n = args.videos
    uris = [r["uri"] for r in _manifest_rows(demo_dir, n)]
    medians = []
    for cpus in (1, 2):
        e2e_ratios, steady_ratios = [], []
        for rep in range(1, args.repeats + 1):
            base = measure_components(uris, cpus)
            small, large = _child(demo_dir, n, cpus), _child(demo_dir, 2 * n, cpus)
            limit = base["limit_fps"]
            steady = large["steady_fps"]
            e2e_ratios.append(small["fps"] / limit)
            steady_ratios.append(steady / limit)
            print(f"{cpus} CPU, run {rep}:")
            print(f"  decode only : {base['decode_fps']:6.1f} frames/s | detect only: {base['detect_fps']:6.1f} frames/s "
                  f"(incl. align+JPEG) | decode+detect limit {limit:6.1f} frames/s  [{base['frames']} frames, "
                  f"{cpus} process(es), no Ray]")
            print(f"  pipeline end-to-end : {small['fps']:6.1f} frames/s, ratio {e2e_ratios[-1]:.2f} "
                  f"({small['frames']} frames of {n} videos in {small['seconds']:.1f} s, start-up included)")
            print(f"  pipeline steady     : {steady:6.1f} frames/s, ratio {steady_ratios[-1]:.2f} "
                  f"(between the first and the last video committed, {2 * n} videos in {large['seconds']:.1f} s)")
            print(f"  peak RSS of the Ray process tree: {small['peak_rss_mb']:.0f} MB for {n} videos, "
                  f"{large['peak_rss_mb']:.0f} MB for {2 * n} (ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.2f})",
                  flush=True)
        medians.append((cpus, statistics.median(e2e_ratios), statistics.median(steady_ratios)))
    for cpus, e2e, steady in medians:
        print(f"median ratio to the limit, {cpus} CPU: steady state {steady:.2f} (target >= 0.80), "
              f"end-to-end {e2e:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
