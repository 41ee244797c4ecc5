"""What every stage asks Ray for, decided in one place from node shapes, and waiting for resources
that an autoscaler will add.

Sizing from cluster TOTALS goes wrong on an autoscaling cluster (cluster/kuberay: a GPU group that
starts at 0 replicas, a CPU group that grows): a training worker sized as "half the cluster's CPUs"
after the CPU group scaled out asks for more CPUs than any GPU node has and waits for ever; a pool
sized from what exists at start never grows onto nodes that join later. So:

- every per-actor / per-worker request is sized from the shape of ONE node that can run it (the
  smallest such node), never from totals;
- actor pools are Ray Data autoscaling pools (min .. max): they start with what fits now and grow
  when the autoscaler adds nodes (Ray Data's own cluster autoscaler asks for them);
- a stage that needs something the cluster does not have yet (GPUs, or any custom resource) asks for
  it with a placement group, which is demand the Ray autoscaler sees, and waits with a periodic
  message and a timeout (`wait_for_resources`) instead of failing at once.

These functions only read `ray.nodes()`; the plans are plain dataclasses so that they are unit
tested with made-up node shapes (tests/test_resources.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

# Resources Ray always reports that say nothing about what a node can run.
_BOOKKEEPING = ("memory", "object_store_memory")


class ResourcesUnavailable(RuntimeError):
    """What a stage needs did not appear in the cluster within its wait timeout."""


@dataclass(frozen=True)
class NodeShape:
    """The total resources of one alive node (CPU, GPU and custom resources; no memory)."""

    resources: Mapping[str, float]

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    def has(self, demand: Mapping[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in demand.items() if v > 0)


def alive_nodes() -> list[NodeShape]:
    import ray

    out = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = {k: float(v) for k, v in node.get("Resources", {}).items()
                   if k not in _BOOKKEEPING and not k.startswith("node:")}
            out.append(NodeShape(res))
    return out


def describe_nodes(nodes: Sequence[NodeShape]) -> str:
    cpus = sum(n.cpus for n in nodes)
    gpus = sum(n.gpus for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"


# ----------------------------------------------------------------------------------------------
# Waiting for resources the autoscaler adds


def cluster_can_place(nodes: Sequence[NodeShape], bundles: Sequence[Mapping[str, float]]) -> bool:
    """Whether `bundles` fit on the nodes' TOTAL resources (first-fit; what is in use is ignored:
    this answers "does the cluster have the shape", not "is it free now")."""
    left = [dict(n.resources) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in left:
            if all(node.get(k, 0.0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def wait_for_resources(bundles: Sequence[Mapping[str, float]], what: str, timeout_s: float,
                       printer: Callable[[str], None] = print, message_every_s: float = 30.0) -> float:
    """Return once the cluster has nodes that can hold `bundles` (seconds waited).

    If it has them already, returns at once. Otherwise reserves them with a placement group: a
    pending placement group is exactly the demand the Ray autoscaler scales up for (a failed check
    would never reach it). Prints a line every `message_every_s`; raises ResourcesUnavailable after
    `timeout_s` (0 = do not wait at all). The group is removed before returning: the stage then asks
    for its own resources on the nodes that came up.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    if cluster_can_place(alive_nodes(), bundles):
        return 0.0
    wanted = _describe_bundles(bundles)
    if timeout_s <= 0:
        raise ResourcesUnavailable(f"{what} needs {wanted}; the Ray cluster has {describe_nodes(alive_nodes())} "
                                   "and waiting is off (--resource-wait-s 0)")
    started = time.time()
    printer(f"[resources] waiting up to {timeout_s:g} s for {what}: {wanted}; the cluster has "
            f"{describe_nodes(alive_nodes())} (an autoscaler sees this request and adds nodes)")
    group = placement_group(bundles, strategy="PACK", name=f"hmhn-wait-{int(started)}")
    try:
        while True:
            elapsed = time.time() - started
            ready, _ = ray.wait([group.ready()], timeout=max(0.1, min(message_every_s, timeout_s - elapsed)))
            if ready:
                waited = time.time() - started
                printer(f"[resources] {what}: available after {waited:.0f} s ({describe_nodes(alive_nodes())})")
                return waited
            elapsed = time.time() - started
            if elapsed >= timeout_s:
                raise ResourcesUnavailable(
                    f"{what} needs {wanted}; after waiting {elapsed:.0f} s the Ray cluster still has "
                    f"{describe_nodes(alive_nodes())}. Check that the autoscaler can add such nodes (the KubeRay "
                    "worker group's maxReplicas, GPU quota), or raise --resource-wait-s")
            printer(f"[resources] still waiting for {what} ({elapsed:.0f}/{timeout_s:g} s): cluster has "
                    f"{describe_nodes(alive_nodes())}")
    finally:
        remove_placement_group(group)


def _describe_bundles(bundles: Sequence[Mapping[str, float]]) -> str:
    shapes: dict[str, int] = {}
    for b in bundles:
        key = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
        shapes[key] = shapes.get(key, 0) + 1
    return " + ".join(f"{n} x {k}" for k, n in shapes.items())


# ----------------------------------------------------------------------------------------------
# Preprocessing: the decode + detect actor pool


@dataclass(frozen=True)
class DetectPoolPlan:
    min_size: int
    initial_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    videos_per_task: int
    tasks: int

    def describe(self) -> str:
        size = (f"{self.max_size}" if self.min_size == self.max_size
                else f"{self.initial_size} (autoscaling {self.min_size}..{self.max_size})")
        return f"{size} decode+detect actors x (CPU {self.num_cpus:g}, GPU {self.num_gpus:g})"


def plan_detect_pool(nodes: Sequence[NodeShape], n_videos: int, on_gpu: bool, gpu_per_actor: float = 0.25,
                     fixed_actors: int = 0, max_actors: int = 0, videos_per_task: int = 0) -> DetectPoolPlan:
    """Detector actors: one CPU each (a single-threaded decode + detect loop), plus `gpu_per_actor`
    on GPU. The pool starts with what fits on the nodes now and may grow to `max_actors` (0 = one
    actor per task) as nodes join; `fixed_actors` > 0 pins the size.

    ~4 tasks per actor that fit now keep the tail short and leave room to grow; up to 64 videos
    share a task (and its shard file).
    """
    per_actor = {"CPU": 1.0, **({"GPU": gpu_per_actor} if on_gpu else {})}
    fits_now = sum(_copies(n, per_actor) for n in nodes)
    if not on_gpu and fits_now == 0:  # fractional-CPU nodes (tests, tiny VMs): share what there is
        per_actor["CPU"] = max(0.1, round(min((n.cpus for n in nodes if n.cpus > 0), default=1.0), 2))
        fits_now = sum(_copies(n, per_actor) for n in nodes)
    expected = max(1, fixed_actors or fits_now)
    per_task = videos_per_task or int(min(64, max(1, n_videos // (4 * expected))))
    tasks = max(1, -(-n_videos // per_task))
    if fixed_actors:
        lo = hi = initial = min(fixed_actors, tasks)
    else:
        hi = min(tasks, max_actors or tasks)
        initial = max(1, min(fits_now, hi))
        lo = 1
    return DetectPoolPlan(min_size=lo, initial_size=initial, max_size=hi, num_cpus=per_actor["CPU"],
                          num_gpus=per_actor.get("GPU", 0.0), videos_per_task=per_task, tasks=tasks)


def _copies(node: NodeShape, demand: Mapping[str, float]) -> int:
    counts = [math.floor(node.resources.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(counts) if counts else 0


# ----------------------------------------------------------------------------------------------
# Training: Ray Train workers and the Ray Data pipeline feeding them


@dataclass(frozen=True)
class TrainPlan:
    cpus_per_worker: float
    threads: int                              # torch intra-op threads per worker
    data_cpus: float                          # per Ray Data frame-sampling task
    worker_resources: dict[str, float] = field(default_factory=dict)  # besides CPU (and GPU via use_gpu)

    def describe(self, workers: int, gpu: bool) -> str:
        extra = "".join(f", {k} {v:g}" for k, v in self.worker_resources.items())
        return (f"{workers} worker(s) x (CPU {self.cpus_per_worker:g}{', GPU 1' if gpu else ''}{extra}), "
                f"{self.threads} torch thread(s) each; data tasks CPU {self.data_cpus:g}")


def accelerator_demand(gpu: bool, extra: Mapping[str, float] | None) -> dict[str, float]:
    """What one training worker needs besides CPU: a GPU and/or custom resources."""
    return {**({"GPU": 1.0} if gpu else {}), **{k: float(v) for k, v in (extra or {}).items()}}


def plan_training(nodes: Sequence[NodeShape], workers: int, gpu: bool, cpus_per_worker: float = 0.0,
                  extra: Mapping[str, float] | None = None) -> TrainPlan:
    """CPUs per worker from the shape of the smallest node that can run a worker, not from totals.

    With an accelerator (GPU or a custom resource): the node's CPUs are split between its
    accelerator slots, and each worker reserves half of its share; the other half is left to the
    Ray Data tasks that decode and augment frames there. Without one: a worker reserves half of a
    node's CPUs (divided among the workers that node must hold).

    Torch threads: Ray's CPU reservation is logical, so the threads a worker computes with need not
    equal it. With an accelerator the worker's CPUs only drive the device and the node's CPUs feed
    it: threads = the reservation. CPU-only with the default sizing, the model's forward/backward is
    by far the biggest consumer (decoding + augmenting a frame costs ~1% of training on it, and
    runs ahead in the Ray Data tasks): the workers get all the node's CPUs as threads, shared among
    as many workers as the node can hold (Ray Train packs them), so none idles while its reserved
    half waits for data that is already there. An explicit `cpus_per_worker` is taken as the user's
    budget (e.g. several trials per node, plan_trial_concurrency): threads = the reservation.
    """
    demand = accelerator_demand(gpu, extra)
    candidates = [n for n in nodes if n.has(demand) and n.cpus > 0] or [n for n in nodes if n.cpus > 0]
    if not candidates:
        raise ResourcesUnavailable("no node with CPUs can run a training worker")
    node = min(candidates, key=lambda n: n.cpus)
    if demand:  # workers on that node: as many as its accelerator slots allow
        per_node = max(1, min(_copies(node, demand), workers))
    else:  # workers spread over the CPU nodes
        per_node = max(1, -(-workers // len(candidates)))
    cpus = float(cpus_per_worker) if cpus_per_worker else max(0.05, round(node.cpus / per_node / 2, 2))
    if cpus > node.cpus:
        raise ValueError(f"--cpus-per-worker {cpus:g} is more than the {node.cpus:g} CPUs of the nodes that can run "
                         "a training worker: no worker could ever be placed")
    per_node = min(per_node, max(1, math.floor(node.cpus / cpus + 1e-9)))
    # The frame-sampling tasks share what the workers leave free; a whole CPU each would not fit
    # beside the workers on small nodes (two 1-CPU nodes: 0.6 per worker leaves 0.4 per node).
    data_cpus = round(min(1.0, max(0.1, (node.cpus - cpus * per_node) / 2)), 2)
    threads = max(1, int(cpus))
    if not demand and not cpus_per_worker:
        sharing = max(1, min(workers, math.floor(node.cpus / cpus + 1e-9)))  # workers that can land on the node
        threads = max(threads, int(node.cpus // sharing))
    return TrainPlan(cpus_per_worker=cpus, threads=threads, data_cpus=data_cpus,
                     worker_resources={k: v for k, v in demand.items() if k != "GPU"})


def training_bundles(workers: int, gpu: bool, extra: Mapping[str, float] | None) -> list[dict[str, float]]:
    """What to wait for before training: one accelerator per worker (CPU sizing comes after, from
    the nodes that then exist). Empty when the workers need CPUs only."""
    demand = accelerator_demand(gpu, extra)
    return [dict(demand) for _ in range(workers)] if demand else []


# ----------------------------------------------------------------------------------------------
# Batch scoring: the inference actor pool


@dataclass(frozen=True)
class InferencePoolPlan:
    size: int
    num_cpus: float
    num_gpus: float
    threads: int
    use_gpu: bool


def plan_inference_pool(nodes: Sequence[NodeShape], num_actors: int = 0) -> InferencePoolPlan:
    """One actor per GPU; on CPU few actors with several torch threads each (torch parallelises one
    batch over threads). Reservations stay below a node's CPUs so the read tasks feeding the actors
    are never starved (the 2-core deadlock of ENVIRONMENT.md)."""
    gpus = sum(n.gpus for n in nodes)
    if gpus >= 1:
        gpu_nodes = [n for n in nodes if n.gpus >= 1]
        per_gpu_cpus = min(n.cpus / n.gpus for n in gpu_nodes)
        return InferencePoolPlan(size=num_actors or int(gpus), num_gpus=1.0,
                                 num_cpus=1.0 if per_gpu_cpus >= 2 else 0.5, threads=2, use_gpu=True)
    cpus = sum(n.cpus for n in nodes)
    node_cpus = max((n.cpus for n in nodes), default=1.0)
    size = num_actors or max(1, int(cpus // 4))
    per_actor = round(min(1.0, 0.75 * cpus / size), 3)
    threads = max(1, int(min(node_cpus, cpus // size)))
    return InferencePoolPlan(size=size, num_cpus=per_actor, num_gpus=0.0, threads=threads, use_gpu=False)


# ----------------------------------------------------------------------------------------------
# Experiments: how many trials run at once


def plan_trial_concurrency(nodes: Sequence[NodeShape], workers: int, gpu: bool, cpus_per_worker: float) -> int:
    """Trials at once: each takes its workers (sized as plan_training does), the data pipeline and
    the trial function."""
    if gpu:
        return max(1, int(sum(n.gpus for n in nodes) // workers))
    cpus = sum(n.cpus for n in nodes)
    per_trial = (cpus_per_worker * workers + 0.5) if cpus_per_worker else cpus
    return max(1, int(cpus // max(per_trial, 1e-9)))
