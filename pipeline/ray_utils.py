"""Connecting to Ray the same way locally and under `ray job submit`, and sizing work to it.

On 2 cores the defaults deadlock (../shared/ENVIRONMENT.md): an actor pool that takes every
CPU starves the read tasks feeding it, so every stage asks for a fraction of the cluster's CPUs.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_connection = "not connected"
VERBOSE_ENV = "HMHN_VERBOSE"  # "1": Ray's own console output too (the jobs' --verbose sets it)
# Lines Ray forwards from workers that reach the console by default: the jobs' own progress lines.
OUR_PREFIXES = ("[hmhn]", "[preprocess]", "[predict]", "[experiment]", "[resources]", "[demo")


def console_is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def init_ray(num_cpus: int | None = None, quiet: bool | None = None) -> dict:
    """Use the cluster we were submitted to (RAY_ADDRESS), else start a private local one.

    quiet (default: unless HMHN_VERBOSE=1): the console shows the jobs' own lines only; Ray's
    output from the workers still goes to the session's log files (`ray_log_dir()`).
    Returns `ray.cluster_resources()`.
    """
    import ray

    global _connection
    quiet = not console_is_verbose() if quiet is None else quiet
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if quiet:
        # Before ray.init, so that Ray's worker processes (training's rank 0 logs to MLflow) inherit
        # them; MLflow sets its loggers' level from this variable when it is imported.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _connection = f"connected to the Ray cluster at {address}"
            ray.init(address=address)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            _connection = f"started a local Ray instance with {cpus} CPUs"
            # The dashboard stays on (loopback only): Ray Train's placement-group cleaner polls the
            # state API it serves, and floods the log without it.
            ray.init(address="local", num_cpus=cpus, dashboard_host="127.0.0.1",
                     log_to_driver=True, configure_logging=True,
                     # ERROR when quiet: Ray's start-up WARNINGs (token authentication on, ...) are not ours
                     logging_level=logging.ERROR if quiet else logging.INFO)
        if quiet:
            _forward_only_our_worker_lines()
    if quiet:
        quiet_console()
    return ray.cluster_resources()


def _forward_only_our_worker_lines() -> None:
    """Of what Ray forwards from workers to this driver's console, keep the jobs' own progress lines
    (OUR_PREFIXES; without Ray's "(RayTrainWorker pid=...)" prefix). Everything else (controller and
    coordinator INFO lines, library warnings, tracebacks of tasks that are retried) stays in the
    session's log files: a failure that matters reaches the driver as an exception anyway.

    Uses ray._private.worker's stdstream dispatcher: the one place Ray routes forwarded output
    through, and it has no public switch; if its shape changes, everything is forwarded as before.
    """
    from ray._private import worker as ray_worker

    def forward(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if line.lstrip().startswith(OUR_PREFIXES)]
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=True)

    try:
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", forward)
    except Exception as exc:  # noqa: BLE001 - a Ray upgrade changed the internals: stay verbose
        log.debug("cannot filter worker output (%s); forwarding all of it", exc)


def ray_log_dir() -> str:
    """The folder of this Ray session's log files (workers' full output), or "" if unknown."""
    try:
        from ray._private import worker as ray_worker

        return ray_worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - connected to a remote cluster: its logs are on its head node
        return ""


def quiet_console() -> None:
    """Keep the jobs' own progress lines readable: no Ray Data progress bars or per-dataset INFO
    banners (datasets created after this call carry the setting to the actors that run them, e.g.
    training's SplitCoordinator), no MLflow download bars or store-setup INFO lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data warns once per process that the bars are off: we turned them off, on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # if MLflow was imported before init_ray


def describe_connection() -> str:
    """One line for progress output: which Ray this process uses and how big it is."""
    import ray

    res = ray.cluster_resources()
    logs = ray_log_dir()
    return (f"{_connection}: {alive_node_count()} node(s), {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs" + (f"; Ray's full logs: {logs}" if logs and not console_is_verbose() else ""))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def alive_node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def dataset_of_slices(table, rows_per_block: int):
    """A Ray Dataset with one block per `rows_per_block` rows of a small pyarrow table (manifest or
    index rows, never frames): one block = one task downstream.

    `ray.data.from_blocks`, not `from_arrow`: from_arrow computes each block's metadata in a remote
    task, and those tasks died with SIGABRT ("Mutex corrupt") now and then on these machines;
    from_blocks computes it here and keeps the block count as given.
    """
    import ray.data

    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_blocks(blocks)
