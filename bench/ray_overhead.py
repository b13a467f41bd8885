"""The Ray path's overhead against one-node DDP, for the same job on this machine: start-up seconds (from the
call to the first optimizer step) and the steady step time, median of a few repeats.

  one-node DDP: Trainer(spec with nodes 1, devices 2).fit() in this process (rank 0 here, rank 1 a child
                process, gloo), as a worker runs a `devices: 2` job;
  Ray path:     a Ray Train TorchTrainer of 2 workers on a local 2-node Ray cluster (one CPU each,
                STRICT_SPREAD: one rank per node), each building the same Trainer with its Gang, as
                worker/ray_gang.py does (the cluster is started once, before the repeats, as a deployment's is).

Both train the digits MLP with the same seed and global batch on CPU (gloo); there is no GPU here, so NCCL and
the network between real nodes are not measured. Writes bench/results/ray_overhead.md.

  python bench/ray_overhead.py [--repeats 3] [--epochs 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "bench" / "results" / "ray_overhead.md"


def job(epochs: int, nodes: int, devices: int) -> dict:
    return {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
            "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 5}},
            "training": {"epochs": epochs, "batch_size": 64, "lr": 0.1, "log_every_steps": 1, "seed": 3,
                         "device": "cpu", "nodes": nodes, "devices": devices},
            "export": {"latency": False}}


def timed_fit(spec_tree: dict, started: float, gang=None) -> dict:
    """Train; returns the seconds from `started` (a time.time()) to the first step and the step intervals."""
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Callback, Trainer

    stamps: list[float] = []

    class Clock(Callback):
        def on_step(self, trainer, metrics):
            stamps.append(time.time())

    trainer = Trainer(JobSpec.model_validate(spec_tree), callbacks=[Clock()], gang=gang)
    report = trainer.fit()
    if not stamps:  # ranks other than 0 run no callbacks
        return {}
    steady = [b - a for a, b in zip(stamps[5:], stamps[6:])]  # past the first steps' warm-up
    return {"startup_s": stamps[0] - started, "step_s": statistics.median(steady), "steps": report["steps"],
            "agree": report.get("replicas_agree")}


def ray_rank(config: dict):
    import ray.train
    import ray.train.torch

    from rigl_core.training.distributed import Gang

    entered = time.time()  # Ray's part of the start-up ends here: controller, worker actors, process group
    context = ray.train.get_context()
    gang = Gang(context.get_world_rank(), context.get_world_size(), context.get_local_world_size(),
                ray.train.torch.get_device())
    result = timed_fit(config["spec"], config["started"], gang)
    return {**result, "ray_start_s": entered - config["started"]} if gang.rank == 0 else None


def ray_run(spec_tree: dict) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    trainer = TorchTrainer(ray_rank, train_loop_config={"spec": spec_tree, "started": started},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                                        placement_strategy="STRICT_SPREAD"),
                           run_config=RunConfig(name=f"bench-{int(started)}", storage_path="/tmp/rigl-bench-ray",
                                                failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit().return_value
    result["total_s"] = time.time() - started
    return result


def ddp_run(spec_tree: dict) -> dict:
    started = time.time()
    result = timed_fit(spec_tree, started)
    result["total_s"] = time.time() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    import ray
    import torch
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    began = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster_s = time.time() - began
    ddp, gang = [], []
    try:
        for repeat in range(args.repeats):  # interleaved, so both see the same load on the shared machine
            ddp.append(ddp_run(job(args.epochs, 1, 2)))
            gang.append(ray_run(job(args.epochs, 2, 1)))
            print(f"repeat {repeat + 1}: ddp {ddp[-1]}  ray {gang[-1]}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = [("start-up to the first step (s)", med(ddp, "startup_s"), med(gang, "startup_s")),
            ("steady step time (ms)", 1000 * med(ddp, "step_s"), 1000 * med(gang, "step_s")),
            ("whole run, call to return (s)", med(ddp, "total_s"), med(gang, "total_s"))]
    lines = [
        "# The Ray path's overhead against one-node DDP",
        "",
        f"`python bench/ray_overhead.py --repeats {args.repeats} --epochs {args.epochs}` on {platform.node()}: "
        f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, ray {ray.__version__}. **No GPU here**: CPU ranks on gloo, so NCCL and the network "
        "between real nodes are not in these figures. The machine is shared with other work: figures vary.",
        "",
        f"The same job both ways: the digits MLP, 90% RigL, batch 64, {gang[0]['steps']} steps, seed 3, 2 ranks. "
        "One-node DDP: `devices: 2` (rank 0 in the calling process, rank 1 a child process). Ray path: `nodes: 2, "
        "devices: 1` as Ray Train workers on a local 2-node Ray cluster (one CPU each, one rank per node), each "
        "building the same Trainer with its Gang (worker/ray_gang.py's path, without the service's database and "
        f"bucket). Median of {args.repeats} interleaved repeats; the Ray cluster (started once: "
        f"{cluster_s:.1f} s) is not in them.",
        "",
        "| | one-node DDP | Ray path | Ray / DDP |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |" for name, a, b in rows],
        "",
        f"Every run's replicas agreed (`replicas_agree`): {all(r['agree'] for r in ddp + gang)}. Of the Ray "
        f"path's start-up, {med(gang, 'ray_start_s'):.1f} s (median) pass before our code runs on the ranks: Ray "
        "Train's controller, two worker actors that import torch, and the process group; the rest is the ranks "
        "building the Trainer (the dataset, the model) and the first step, as in DDP. A job pays the start-up "
        "once per run (and again after a requeue); the step time ratio is what a long job pays. Per run, in "
        "order (start-up s, step ms): DDP "
        + ", ".join(f"({r['startup_s']:.1f}, {1000 * r['step_s']:.1f})" for r in ddp) + "; Ray "
        + ", ".join(f"({r['startup_s']:.1f}, {1000 * r['step_s']:.1f})" for r in gang) + ".",
        "",
    ]
    RESULT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
