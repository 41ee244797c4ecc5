"""Preprocessing throughput and memory on the demo data (figures, not a test).

    python jobs/bench_preprocess.py [--demo-dir data/demo] [--videos 6]

Prints, for 1 and 2 CPUs:
  decode-only frames/s and detect-only frames/s (one process, no Ray: the per-frame costs),
  the limit they allow together on that many cores: cpus / (t_decode + t_detect),
  the full Ray Data pipeline's frames/s and its ratio to that limit (target >= 0.8),
and the peak resident memory of the whole Ray process tree for N and 2N videos (it should not
grow with the number of videos: frames stream through in bounded chunks).
Each pipeline measurement runs in a fresh process with its own local Ray of exactly C CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decode import SamplingConfig, iter_frame_chunks  # noqa: E402
from pipeline.preprocess import PreprocessConfig  # noqa: E402

SAMPLING = SamplingConfig(mode="fps", fps=5.0)


def _manifest_rows(demo_dir: Path, n: int) -> list[dict]:
    from pipeline.manifest import load_manifest

    rows = load_manifest("csv", str(demo_dir / "manifest.csv")).to_pylist()
    return (rows * (n // len(rows) + 1))[:n] if n > len(rows) else rows[:n]


def measure_components(rows: list[dict]) -> dict:
    """Per-frame decode and detect+align+encode cost, one process, one thread each."""
    from hmhn.image import encode_jpeg
    from pipeline.align import AlignConfig, align_face, pick_face
    from pipeline.detect import DetectorConfig, make_detector

    frames_kept = []
    tic = time.perf_counter()
    n_decoded = 0
    for row in rows:
        for chunk in iter_frame_chunks(row["uri"], SAMPLING):
            n_decoded += len(chunk.frames)
            if len(frames_kept) < 60:
                frames_kept.extend(chunk.frames[: 60 - len(frames_kept)])
    t_decode = (time.perf_counter() - tic) / n_decoded
    detector = make_detector(DetectorConfig())
    align = AlignConfig()
    detector.detect(frames_kept[0])  # warm-up (session init, allocations)
    tic = time.perf_counter()
    for frame in frames_kept:
        face = pick_face(detector.detect(frame), frame.shape[:2])
        if face is not None:
            encode_jpeg(align_face(frame, face.landmarks, align))
    t_detect = (time.perf_counter() - tic) / len(frames_kept)
    return {"decode_ms_per_frame": 1000 * t_decode, "detect_ms_per_frame": 1000 * t_detect,
            "decode_fps": 1 / t_decode, "detect_fps": 1 / t_detect}


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

    from pipeline.preprocess import run_preprocess
    from pipeline.ray_utils import init_ray
    from pipeline.schema import MANIFEST_SCHEMA

    os.environ.pop("RAY_ADDRESS", None)
    # Pin this process (and so Ray's processes, which inherit it) to `cpus` physical cores: a
    # "1-CPU" Ray on a 2-core machine would otherwise still run decode and detect side by side.
    os.sched_setaffinity(0, set(range(cpus)))
    init_ray(num_cpus=cpus)
    rows = _manifest_rows(demo_dir, n_videos)
    for i, r in enumerate(rows):  # repeated videos need unique ids
        r["video_id"] = f"{r['video_id']}_{i}"
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as out:
        config = PreprocessConfig(dataset="csv", input=str(demo_dir / "manifest.csv"), output=out,
                                  sampling=SAMPLING, progress_every_s=1e9)
        tic = time.perf_counter()
        summary = run_preprocess(config, manifest=pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                                 printer=lambda *_: None)
        seconds = time.perf_counter() - tic
    stop.set()
    thread.join()
    frames = summary["this_run"]["frames_decoded"]
    return {"cpus": cpus, "videos": n_videos, "frames": frames, "seconds": seconds,
            "fps": frames / seconds, "peak_rss_mb": peak[0] / 2**20}


def _child(demo_dir: Path, n_videos: int, cpus: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--demo-dir", str(demo_dir), "--_child", f"{n_videos},{cpus}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="data/demo", help="demo data (generated there if missing)")
    parser.add_argument("--videos", type=int, default=6, help="N: videos per pipeline run (memory also at 2N)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    demo_dir = Path(args.demo_dir)
    if args._child:
        n, c = (int(v) for v in args._child.split(","))
        print(json.dumps(run_pipeline_once(demo_dir, n, c)))
        return 0
    if not (demo_dir / "manifest.csv").exists():
        from pipeline.demo_data import DemoDataConfig, make_demo_dataset

        make_demo_dataset(DemoDataConfig(output=str(demo_dir)))
    parts = measure_components(_manifest_rows(demo_dir, args.videos))
    per_frame_s = (parts["decode_ms_per_frame"] + parts["detect_ms_per_frame"]) / 1000
    print(f"decode only : {parts['decode_fps']:8.1f} sampled frames/s ({parts['decode_ms_per_frame']:.1f} ms/frame, 1 thread)")
    print(f"detect only : {parts['detect_fps']:8.1f} frames/s ({parts['detect_ms_per_frame']:.1f} ms/frame incl. align+JPEG, 1 thread)")
    for cpus in (1, 2):
        run = _child(demo_dir, args.videos, cpus)
        limit = cpus / per_frame_s
        print(f"pipeline {cpus} CPU: {run['fps']:8.1f} frames/s | decode+detect limit {limit:6.1f} frames/s "
              f"| ratio {run['fps'] / limit:.2f} (target >= 0.80) | {run['frames']} frames in {run['seconds']:.1f} s "
              f"(incl. ~actor start-up)")
    small = _child(demo_dir, args.videos, 2)
    large = _child(demo_dir, 2 * args.videos, 2)
    print(f"peak RSS of the Ray process tree: {small['peak_rss_mb']:.0f} MB for {args.videos} videos, "
          f"{large['peak_rss_mb']:.0f} MB for {2 * args.videos} videos (ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
