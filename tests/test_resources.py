"""Resource plans from node shapes (pipeline/resources.py), and waiting for resources that join later.

The plans are pure functions of made-up node shapes; the waiting test uses a real local Ray whose
"second node" is a custom resource that is not there (the two-node tests add a real node later).
"""
from __future__ import annotations

import pytest

from pipeline.resources import (NodeShape, ResourcesUnavailable, cluster_can_place, plan_detect_pool,
                                plan_inference_pool, plan_training, plan_trial_concurrency, training_bundles,
                                wait_for_resources)

LAPTOP = [NodeShape({"CPU": 2.0})]
TWO_SMALL = [NodeShape({"CPU": 1.0}), NodeShape({"CPU": 1.0})]
# A KubeRay cluster after the CPU group scaled out: 8 GPU nodes of 64 CPUs and many 96-CPU CPU nodes.
SCALED_OUT = [NodeShape({"CPU": 8.0})] + [NodeShape({"CPU": 64.0, "GPU": 8.0})] * 8 + [NodeShape({"CPU": 96.0})] * 20


def test_training_workers_leave_cpu_for_the_data_pipeline():
    two = plan_training(LAPTOP, 2, False)
    assert (two.cpus_per_worker, two.threads) == (0.5, 1)  # two workers share the node's 2 cores
    plan = plan_training(LAPTOP, 1, False)
    assert (plan.cpus_per_worker, plan.data_cpus) == (1.0, 0.5)
    # The reservation is logical: one CPU-only worker computes with every core of its node
    # (what a plain script would use); the data tasks run ahead on the reserved remainder.
    assert plan.threads == 2
    explicit = plan_training(TWO_SMALL, 2, False, cpus_per_worker=0.6)
    assert explicit.data_cpus == 0.2 and explicit.threads == 1  # an explicit budget is kept
    assert plan_training([NodeShape({"CPU": 8.0})] * 2, 2, False).threads == 4  # both may land on one node


def test_gpu_workers_are_sized_from_the_gpu_node_not_the_cluster_totals():
    plan = plan_training(SCALED_OUT, 8, True)
    # 64 CPUs / 8 GPUs = 8 per GPU slot; half reserved by the worker. From totals it would be
    # (8 + 512 + 1920) / 2 / 8 = 152 CPUs: more than any GPU node has, so no worker would ever start.
    assert plan.cpus_per_worker == 4.0 and plan.threads == 4
    with pytest.raises(ValueError, match="more than the 64 CPUs"):
        plan_training(SCALED_OUT, 8, True, cpus_per_worker=65)


def test_custom_worker_resources_pick_the_nodes_that_have_them():
    nodes = [NodeShape({"CPU": 16.0}), NodeShape({"CPU": 4.0, "standin_gpu": 2.0})]
    plan = plan_training(nodes, 2, False, extra={"standin_gpu": 1})
    assert plan.cpus_per_worker == 1.0 and plan.worker_resources == {"standin_gpu": 1.0}
    assert training_bundles(2, False, {"standin_gpu": 1}) == [{"standin_gpu": 1.0}] * 2
    assert training_bundles(2, False, None) == []  # CPU workers: nothing to wait for


def test_detect_pool_starts_with_what_fits_and_may_grow():
    plan = plan_detect_pool(LAPTOP, n_videos=100, on_gpu=False)
    assert (plan.min_size, plan.initial_size, plan.num_cpus) == (1, 2, 1.0)
    assert plan.videos_per_task == 12 and plan.tasks == 9 and plan.max_size == 9  # grows as nodes join
    fixed = plan_detect_pool(LAPTOP, n_videos=100, on_gpu=False, fixed_actors=3)
    assert fixed.min_size == fixed.initial_size == fixed.max_size == 3
    capped = plan_detect_pool(LAPTOP, n_videos=100, on_gpu=False, max_actors=4)
    assert capped.max_size == 4
    gpu = plan_detect_pool(SCALED_OUT, n_videos=10_000, on_gpu=True, gpu_per_actor=0.25)
    assert gpu.initial_size == 8 * 8 * 4 and gpu.num_gpus == 0.25 and gpu.videos_per_task == 9
    tiny = plan_detect_pool([NodeShape({"CPU": 0.5})], n_videos=3, on_gpu=False)
    assert tiny.num_cpus == 0.5 and tiny.initial_size == 1


def test_inference_pool_and_trial_concurrency():
    cpu = plan_inference_pool(LAPTOP)
    assert (cpu.size, cpu.threads, cpu.use_gpu) == (1, 2, False) and cpu.num_cpus <= 1.0
    gpu = plan_inference_pool(SCALED_OUT)
    assert (gpu.size, gpu.num_gpus, gpu.use_gpu) == (64, 1.0, True)
    assert plan_trial_concurrency(SCALED_OUT, 2, True, 0) == 32
    assert plan_trial_concurrency(LAPTOP, 1, False, 0.5) == 2


def test_cluster_can_place_checks_each_node():
    assert cluster_can_place(TWO_SMALL, [{"CPU": 1.0}, {"CPU": 1.0}])
    assert not cluster_can_place(TWO_SMALL, [{"CPU": 1.5}])  # 2 CPUs in total, but not on one node
    assert not cluster_can_place(TWO_SMALL, [{"GPU": 1.0}])


def test_waiting_for_a_resource_that_never_comes_ends_with_a_clear_error(ray_session):
    lines = []
    with pytest.raises(ResourcesUnavailable, match=r"still has 1 node\(s\).*--resource-wait-s"):
        wait_for_resources([{"standin_gpu": 1}], "2 training worker(s)", timeout_s=2.0, printer=lines.append,
                           message_every_s=0.5)
    assert "waiting up to 2 s for 2 training worker(s): 1 x {standin_gpu: 1}" in lines[0]
    assert any("still waiting" in line for line in lines[1:])
    with pytest.raises(ResourcesUnavailable, match="waiting is off"):
        wait_for_resources([{"standin_gpu": 1}], "x", timeout_s=0)
    assert wait_for_resources([{"CPU": 0.5}], "x", timeout_s=0) == 0.0  # there already: no wait
