"""How the costs of preprocessing and training data loading grow with the number of videos N
(figures, not a test; see docs/SCALE.md).

    python jobs/bench_scale.py [--sizes 250 1000 4000] [--storage local s3] [--frames 12]

N tiny real videos (H.264, --width x --height, one real face: scikit-image's astronaut) are
generated once: --distinct clips are encoded and the N files are hard links to them under their
own names. For every storage and N, a CHILD process with its own fresh local Ray
(`init_ray(num_cpus=--cpus)`, as the jobs do) preprocesses them into a fresh output and measures:

  objects      files/objects under the shard set after the run (shards/, log/, index.parquet,
               summary.json, config.json), and per 100 MB of shards;
  driver       CPU seconds of the driver process (time.process_time(), all its threads: Ray Data's
               executor included) around run_preprocess, per video; the driver's peak RSS
               (ru_maxrss). Ray's own processes (raylet, workers, actors) are not the driver;
  wall         of the first run, and of a RERUN with every video done (resume: log + anti-join);
  index        open_shardset(root) time (what every training worker does) and index.parquet bytes;
  epoch        one epoch of training data loading without a model: hmhn.data.train_dataset(...,
               augmentation="none", num_cpus=0.5) iterated fully with iter_batches;
  bytes        the same draw in-process with RowGroupReader.draw over every training video:
               bytes of column chunks read / bytes of the JPEG frames drawn.

For s3, one loopback S3 server (tests/s3_server.py, moto) runs in this process and each child
gets its environment before ray.init, so Ray's workers reach it too. The input videos stay on
local disk for both storages (only where the shard set lives changes).

The parent prints one table per storage and the growth from the smallest to the largest N, and
draws docs/img/scale_growth.png (--plot). Results also go to WORKDIR/results.json (--results);
`--report RESULTS_JSON` prints the tables and redraws the plot of an earlier run without running.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cli import job_parser, parse_args  # noqa: E402

SPLIT_OF_BUCKET = ("train",) * 6 + ("dev",) * 2 + ("test",) * 2   # by subject: 60/20/20, subject-disjoint


# ----------------------------------------------------------------------------------------------
# Input: tiny real face videos, generated once and hard-linked under N names


def _face_crop():
    """The astronaut photo cut around her face (so a small canvas still shows a ~45 px face)."""
    import numpy as np
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[0:290, 130:320])


def _clip_frames(face_rgb, n: int, width: int, height: int, variant: int):
    """n frames: the face scaled into the canvas, drifting a little; variants differ in background,
    brightness, mirror image and drift direction, so the clips are not byte-identical."""
    import cv2
    import numpy as np

    if variant % 2:
        face_rgb = np.ascontiguousarray(face_rgb[:, ::-1])
    scale = min(width / face_rgb.shape[1], height / face_rgb.shape[0])
    face = cv2.resize(face_rgb, (int(face_rgb.shape[1] * scale) // 2 * 2, int(face_rgb.shape[0] * scale) // 2 * 2))
    face = np.clip(face.astype(np.int16) + (variant % 5) * 6 - 12, 0, 255).astype(np.uint8)
    direction = 1 if variant % 3 else -1
    for i in range(n):
        canvas = np.full((height, width, 3), 60 + 15 * (variant % 7), np.uint8)
        dx = max(0, min(width - face.shape[1], (width - face.shape[1]) // 2 + direction * ((i % 5) - 2)))
        dy = (height - face.shape[0]) // 2
        canvas[dy:dy + face.shape[0], dx:dx + face.shape[1]] = face
        yield canvas


def make_videos(workdir: Path, n: int, frames: int, video_fps: int, sample_fps: float, width: int, height: int,
                distinct: int) -> Path:
    """WORKDIR/videos/v000000.mp4 ... (n files, hard links to `distinct` encoded clips). Reused when present."""
    from pipeline.video_io import write_mp4

    spec = {"frames": frames, "video_fps": video_fps, "sample_fps": sample_fps, "width": width, "height": height,
            "distinct": distinct}
    clips, videos = workdir / "clips", workdir / "videos"
    stamp = workdir / "videos.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != spec:
        shutil.rmtree(clips, ignore_errors=True)
        shutil.rmtree(videos, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    clips.mkdir(parents=True, exist_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    # `frames` SAMPLED frames per video: the clip lasts frames / sample_fps seconds at video_fps.
    source_frames = max(1, round(frames * video_fps / sample_fps))
    face = _face_crop()
    for j in range(distinct):
        clip = clips / f"c{j:02d}.mp4"
        if not clip.exists():
            write_mp4(clip, _clip_frames(face, source_frames, width, height, j), fps=video_fps)
    for i in range(n):
        target = videos / f"v{i:06d}.mp4"
        if not target.exists():
            source = clips / f"c{i % distinct:02d}.mp4"
            try:
                os.link(source, target)
            except OSError:  # another filesystem: a copy is as good
                shutil.copyfile(source, target)
    stamp.write_text(json.dumps(spec))
    return videos


def build_manifest(videos: Path, n: int):
    """MANIFEST_SCHEMA rows for the first n videos: 4 videos per subject, splits by subject, both tasks."""
    import pyarrow as pa

    from pipeline.schema import MANIFEST_SCHEMA

    rows = []
    for i in range(n):
        subject = i // 4
        rows.append({"video_id": f"v{i:06d}", "subject_id": f"s{subject:05d}",
                     "split": SPLIT_OF_BUCKET[(subject * 7) % len(SPLIT_OF_BUCKET)],
                     "label": float((i * 7) % 64), "uri": str(videos / f"v{i:06d}.mp4"),
                     "task": "Northwind" if i % 2 else "Freeform"})
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


# ----------------------------------------------------------------------------------------------
# The child: one (storage, N) measurement on a fresh Ray


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def count_objects(root: str) -> dict:
    """Objects under the shard set by kind, and the bytes of the shard files (one recursive listing)."""
    import pyarrow.fs as pafs

    from pipeline.shardset import open_root

    fs, base = open_root(root)
    kinds: dict[str, int] = {}
    shard_bytes = 0
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if not info.is_file:
            continue
        first = info.path[len(base) + 1:].split("/")[0]
        kind = first if first in ("shards", "log") else (
            first if first in ("index.parquet", "summary.json", "config.json") else "other")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "shards":
            shard_bytes += info.size
    return {"objects": sum(kinds.values()), "by_kind": kinds, "shard_bytes": shard_bytes}


def child_measure(p: dict) -> dict:
    import pyarrow.fs as pafs

    from pipeline.decode import SamplingConfig
    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.ray_utils import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    n, videos = p["n"], Path(p["videos"])
    manifest = build_manifest(videos, n)
    rss_imports = _rss_mb()
    init_ray(num_cpus=p["cpus"])
    rss_ray = _rss_mb()
    config = PreprocessConfig(dataset="csv", input=str(videos), output=p["output"],
                              sampling=SamplingConfig(mode="fps", fps=p["sample_fps"]),
                              row_group_rows=p["row_group_rows"], videos_per_task=p.get("videos_per_task", 0),
                              progress_every_s=30.0)
    def printer(line):  # the job's progress lines go to the child's log file
        print(line, flush=True)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = run_preprocess(config, manifest=manifest, printer=printer)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss_run = _rss_mb()  # peak so far: before anything else (training imports torch) runs here
    root = summary["shard_set"]
    objects = count_objects(root)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    rerun = run_preprocess(config, manifest=manifest, printer=printer)
    rerun_wall, rerun_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    objects_after_rerun = count_objects(root)["objects"]

    from hmhn.data import open_shardset, train_dataset
    from pipeline.shardset import INDEX_FILE, RowGroupReader, open_root

    tic = time.perf_counter()
    index = open_shardset(root)
    index_s = time.perf_counter() - tic
    fs, base = open_root(root)
    index_bytes = fs.get_file_info(f"{base}/{INDEX_FILE}").size
    tic = time.perf_counter()
    train = index.videos("train")
    entries_s = time.perf_counter() - tic

    k = p["k"]
    tic = time.perf_counter()
    ds = train_dataset(index, frames_per_video=k, input_size=64, augmentation="none", num_cpus=0.5)
    epoch_rows = 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        epoch_rows += len(batch["label"])
    epoch_s = time.perf_counter() - tic

    import numpy as np

    rng = np.random.default_rng(0)
    reader = RowGroupReader(root)
    drawn_bytes = drawn_frames = 0
    tic = time.perf_counter()
    for entry in train:
        table = reader.draw(entry, k, float(rng.random()), ["image"])
        drawn_bytes += sum(len(b) for b in table.column("image").to_pylist())
        drawn_frames += table.num_rows
    draw_s = time.perf_counter() - tic
    reader.close()

    if p.get("cleanup"):  # 4000 tiny videos make ~330 MB of shards per set; moto keeps them in memory
        if isinstance(fs, pafs.LocalFileSystem):
            fs.delete_dir(base)
        else:
            fs.delete_dir_contents(base)
    run = summary["this_run"]
    return {
        "storage": p["storage"], "n": n, "root": root,
        "ok": summary["ok"], "no_face": summary["no_face"], "failed": summary["failed"],
        "faces_total": summary["faces_total"], "frames_decoded": run["frames_decoded"],
        "shard_files_written": run["shard_files_written"], "log_objects_written": run["log_objects_written"],
        "wall_s": wall, "driver_cpu_s": cpu, "driver_cpu_ms_per_video": 1000 * cpu / n,
        "driver_rss_mb": rss_run, "driver_rss_mb_after_imports": rss_imports, "driver_rss_mb_after_ray_init": rss_ray,
        "rerun_wall_s": rerun_wall, "rerun_driver_cpu_s": rerun_cpu,
        "rerun_videos_processed": rerun["this_run"]["videos_processed"],
        "objects": objects["objects"], "objects_by_kind": objects["by_kind"], "shard_bytes": objects["shard_bytes"],
        "objects_per_100mb": objects["objects"] / max(objects["shard_bytes"] / 100e6, 1e-9),
        "objects_after_rerun": objects_after_rerun,
        "index_open_s": index_s, "index_bytes": index_bytes, "train_entries_s": entries_s,
        "train_videos": len(train), "k": k,
        "epoch_s": epoch_s, "epoch_rows": epoch_rows,
        "draw_s": draw_s, "bytes_read": reader.bytes_read, "bytes_drawn": drawn_bytes, "frames_drawn": drawn_frames,
        "read_over_drawn": reader.bytes_read / max(drawn_bytes, 1),
    }


# ----------------------------------------------------------------------------------------------
# The parent: children, tables, growth, plot


def run_child(params: dict, env: dict, log_path: Path, timeout_s: float) -> dict:
    result_path = log_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(params), "--_result", str(result_path)],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), timeout=timeout_s)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"child {params['storage']} N={params['n']} failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


COLUMNS = [
    ("N", "n", "{:d}"), ("wall s", "wall_s", "{:.1f}"), ("rerun s", "rerun_wall_s", "{:.2f}"),
    ("objects", "objects", "{:d}"), ("obj/100MB", "objects_per_100mb", "{:.1f}"),
    ("drv CPU ms/video", "driver_cpu_ms_per_video", "{:.2f}"), ("drv RSS MB", "driver_rss_mb", "{:.0f}"),
    ("index s", "index_open_s", "{:.3f}"), ("index KB", "index_kb", "{:.1f}"), ("epoch s", "epoch_s", "{:.1f}"),
    ("read/drawn", "read_over_drawn", "{:.2f}"),
]


def format_table(results: list[dict]) -> list[str]:
    rows = [[fmt.format(r["index_bytes"] / 1024 if key == "index_kb" else r[key]) for _, key, fmt in COLUMNS]
            for r in results]
    heads = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(heads), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *(line(r) for r in rows)]


def growth(results: list[dict]) -> dict:
    small, large = results[0], results[-1]
    ratio = lambda key: large[key] / max(small[key], 1e-12)  # noqa: E731
    marginal = (large["driver_cpu_s"] - small["driver_cpu_s"]) / max(large["n"] - small["n"], 1)
    return {
        "n_small": small["n"], "n_large": large["n"], "n_ratio": large["n"] / small["n"],
        "driver_cpu_per_video": ratio("driver_cpu_ms_per_video"),
        "driver_cpu_marginal_ms_per_video": 1000 * marginal,
        # The driver's CPU is mostly Ray Data's executor loop, which runs as long as the job does.
        "driver_cpu_share_of_wall": [r["driver_cpu_s"] / max(r["wall_s"], 1e-9) for r in (small, large)],
        "driver_rss": ratio("driver_rss_mb"),
        "driver_rss_above_ray_init_mb": [r["driver_rss_mb"] - r["driver_rss_mb_after_ray_init"] for r in (small, large)],
        "objects": ratio("objects"),
        "objects_per_1000_videos": [1000 * r["objects"] / r["n"] for r in (small, large)],
        "objects_by_kind_large": large["objects_by_kind"],
        "rerun_wall": ratio("rerun_wall_s"), "rerun_wall_large_s": large["rerun_wall_s"],
        "read_over_drawn_max": max(r["read_over_drawn"] for r in results),
    }


def format_growth(g: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "meets target" if ok else "MISSES target"

    share, above = g["driver_cpu_share_of_wall"], g["driver_rss_above_ray_init_mb"]
    per_k = g["objects_per_1000_videos"]
    return [
        f"growth N={g['n_small']} -> N={g['n_large']} (N x{g['n_ratio']:.0f}):",
        f"  driver CPU per video x{g['driver_cpu_per_video']:.2f} (target <= 1.2: "
        f"{verdict(g['driver_cpu_per_video'] <= 1.2)}); marginal {g['driver_cpu_marginal_ms_per_video']:.2f} ms per "
        f"extra video; driver CPU = {100 * share[0]:.1f}% -> {100 * share[1]:.1f}% of the run's wall time",
        f"  driver peak RSS      x{g['driver_rss']:.2f} (target <= 1.2: {verdict(g['driver_rss'] <= 1.2)}); "
        f"above the RSS after ray.init: {above[0]:.0f} -> {above[1]:.0f} MB",
        f"  objects written      x{g['objects']:.2f} for N x{g['n_ratio']:.0f}; {per_k[0]:.1f} -> {per_k[1]:.1f} objects "
        f"per 1000 videos; at N={g['n_large']}: {json.dumps(g['objects_by_kind_large'], sort_keys=True)}",
        f"  all-done rerun wall  x{g['rerun_wall']:.2f}, {g['rerun_wall_large_s']:.2f} s at N={g['n_large']} "
        f"(target: seconds: {verdict(g['rerun_wall_large_s'] < 10)})",
        f"  bytes read / drawn   <= {g['read_over_drawn_max']:.2f} at every N "
        f"(target <= 3: {verdict(g['read_over_drawn_max'] <= 3)})",
    ]


def plot(by_storage: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    markers = {"local": "o", "s3": "s"}
    for storage, results in by_storage.items():
        ns = [r["n"] for r in results]
        m = markers.get(storage, "^")
        axes[0].plot(ns, [r["driver_cpu_ms_per_video"] for r in results], marker=m, label=storage)
        axes[1].plot(ns, [r["driver_rss_mb"] for r in results], marker=m, label=storage)
        axes[2].plot(ns, [r["objects"] for r in results], marker=m, label=f"{storage}: objects written")
    all_n = sorted({r["n"] for rs in by_storage.values() for r in rs})
    first = next(iter(by_storage.values()))
    ref = first[0]["objects"] / first[0]["n"]
    axes[2].plot(all_n, [ref * n for n in all_n], "k--", label="proportional to N (from the smallest N)")
    axes[2].plot(all_n, all_n, ":", color="grey", label="N (one object per video)")
    titles = ["driver CPU per video (ms)", "driver peak RSS (MB)", "objects under the shard set"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xticks(all_n)
        ax.set_xticklabels([str(n) for n in all_n])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("videos N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    fig.suptitle("bench_scale: how preprocessing's driver costs and object count grow with N")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_results(by_storage: dict[str, list[dict]], args: dict, plot_path: str) -> dict:
    """Print a table and the growth per storage, draw the plot; returns the growth figures."""
    growths = {}
    for storage, results in by_storage.items():
        print(f"\n{storage} (K={args['k']} frames per training video, row_group_rows={args['row_group_rows']}, "
              f"{args['frames']} sampled frames per video, {args['cpus']} CPUs):")
        for line in format_table(results):
            print(line)
        if len(results) > 1:
            growths[storage] = growth(results)
            for line in format_growth(growths[storage]):
                print(line)
    if plot_path:
        plot(by_storage, Path(plot_path))
        print(f"\nplot: {plot_path}")
    return growths


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__, verbose=False)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000], help="numbers of videos N")
    parser.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"],
                        help="where the shard set is written")
    parser.add_argument("--frames", type=int, default=8, help="sampled (kept) frames per video (> --row-group-rows, so a "
                        "video has several row groups)")
    parser.add_argument("--video-fps", type=int, default=30, help="frame rate of the generated videos")
    parser.add_argument("--sample-fps", type=float, default=5.0, help="preprocessing's sampling rate")
    parser.add_argument("--width", type=int, default=160, help="frame width of the generated videos")
    parser.add_argument("--height", type=int, default=120, help="frame height of the generated videos")
    parser.add_argument("--distinct", type=int, default=8, help="distinct clips encoded; the N files link to them")
    parser.add_argument("--row-group-rows", type=int, default=4, help="PreprocessConfig.row_group_rows")
    parser.add_argument("--videos-per-task", type=int, default=0, help="PreprocessConfig.videos_per_task "
                        "(0 = auto: ~4 tasks per actor, at most 64 videos per task and so per shard file)")
    parser.add_argument("--k", type=int, default=4, help="frames drawn per training video per epoch")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each child's local Ray")
    parser.add_argument("--workdir", default="", help="videos, outputs, logs (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the shard sets (default: deleted after each run)")
    parser.add_argument("--plot", default=str(REPO / "docs/img/scale_growth.png"), help="PNG to write ('' = none)")
    parser.add_argument("--child-timeout-s", type=float, default=3600.0, help="a measuring child process "
                        "that runs longer is killed")
    parser.add_argument("--results", default="", help="where to write the results JSON (default WORKDIR/results.json)")
    parser.add_argument("--report", default="", help="only print the tables and draw the plot of an earlier "
                        "run's results.json (nothing is run)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)

    if args._child:
        result = child_measure(json.loads(args._child))
        Path(args._result).write_text(json.dumps(result))
        return 0
    if args.report:
        earlier = json.loads(Path(args.report).read_text())
        report_results(earlier["results"], earlier["args"], args.plot)
        print(f"total wall time of that run {earlier['total_wall_s']:.0f} s")
        return 0

    started = time.perf_counter()
    sizes = sorted(set(args.sizes))
    temp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="bench-scale-")
        workdir = Path(temp.name)
    tic = time.perf_counter()
    videos = make_videos(workdir, max(sizes), args.frames, args.video_fps, args.sample_fps, args.width, args.height,
                         args.distinct)
    print(f"[bench_scale] {max(sizes)} videos ({args.distinct} distinct clips of {args.frames} sampled frames, "
          f"{args.width}x{args.height} at {args.video_fps} fps, sampled at {args.sample_fps:g} fps) in {videos}: "
          f"{time.perf_counter() - tic:.1f} s", flush=True)
    (workdir / "logs").mkdir(exist_ok=True)

    from tests.s3_server import UNSET_ENV, S3Server

    by_storage: dict[str, list[dict]] = {}
    tag = time.strftime("%Y%m%d-%H%M%S")
    server = S3Server() if "s3" in args.storage else None
    try:
        if server:
            server.start()
        for storage in args.storage:
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            if storage == "s3":
                for key in UNSET_ENV:
                    env.pop(key, None)
                env.update(server.env)
            for n in sizes:
                output = (str(workdir / "out" / f"local-{n}") if storage == "local"
                          else server.uri(f"bench-scale/{tag}/{n}"))
                if storage == "local":
                    shutil.rmtree(output, ignore_errors=True)
                params = {"storage": storage, "n": n, "videos": str(videos), "output": output, "cpus": args.cpus,
                          "sample_fps": args.sample_fps, "row_group_rows": args.row_group_rows, "k": args.k,
                          "videos_per_task": args.videos_per_task,
                          "cleanup": not args.keep}
                tic = time.perf_counter()
                print(f"[bench_scale] {storage} N={n} ...", flush=True)
                result = run_child(params, env, workdir / "logs" / f"{storage}-{n}.log", args.child_timeout_s)
                result["child_wall_s"] = time.perf_counter() - tic
                print(f"[bench_scale] {storage} N={n}: preprocess {result['wall_s']:.1f} s "
                      f"({result['ok']} ok, {result['no_face']} no_face, {result['failed']} failed, "
                      f"{result['faces_total']} faces), rerun {result['rerun_wall_s']:.2f} s, "
                      f"{result['objects']} objects, child total {result['child_wall_s']:.0f} s", flush=True)
                by_storage.setdefault(storage, []).append(result)
    finally:
        if server:
            server.stop()

    report = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "results": by_storage,
              "growth": report_results(by_storage, vars(args), args.plot), "total_wall_s": None}
    report["total_wall_s"] = time.perf_counter() - started
    results_path = Path(args.results) if args.results else workdir / "results.json"
    results_path.write_text(json.dumps(report, indent=2))
    print(f"results: {results_path}" + (" (temp dir, removed: pass --results to keep it)"
                                        if temp and not args.results else ""))
    print(f"total wall time {report['total_wall_s']:.0f} s")
    if temp:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
