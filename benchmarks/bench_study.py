"""Study-level figures: trial overhead (1), study throughput (3), scaling out (4), status (12).

1. Trial overhead: ``jepa-study launch`` of a one-trial study against ``jepa-study train`` of
   the same config, both as commands (what a user pays), alternating; plus the per-trial
   overhead inside a running study (Ray start-up is paid once per study, not per trial) and
   the per-epoch A/B: the trial's epochs (which never score test) against ``train``'s.
3. Throughput: trials per hour of ``quick.yaml`` at 1 and 2 concurrent trials.
4. Scaling out: 8 trials on a simulated 2-node cluster (1 CPU each) against 1 node with
   1 CPU (target <= 0.6x the wall time).
12. ``jepa-study status`` of a finished 24-trial study, as a command (target <= 0.5 s).

Usage: ``python -m benchmarks.bench_study [--quick] [--figures 1,3,4,12]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import (ROOT, alternate, machine, parser, ratio, resolve_device,
                               spread, summary, table, write_json)

# One intra-op thread on both sides: a trial runs with torch.set_num_threads(cpus_per_worker=1),
# and a plain run with two threads on a loaded 2-core machine would be slowed by
# oversubscription, flattering the study.
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _space(tmp: Path, name: str, epochs: int, num_samples: int, steps: int | None = None,
           search: bool = False) -> Path:
    base = {"train": {"epochs": epochs}}
    if steps:
        base["train"]["max_steps_per_epoch"] = steps
    params = ({"loss.lambda_con": {"type": "float", "low": 0.05, "high": 1.0, "log": True},
               "model.predictor.depth": {"type": "int", "low": 1, "high": 3}} if search
              else {"train.seed": {"type": "categorical", "choices": [0]}})
    space = {"name": name, "base_preset": "hybrid", "base": base, "num_samples": num_samples,
             "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": num_samples},
             "scheduler": {"kind": "fifo"}, "parameters": params}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _cli(*args: str) -> float:
    t0 = time.perf_counter()
    # os.environ read now: --device cpu hides the GPUs (CUDA_VISIBLE_DEVICES) after import
    subprocess.run([sys.executable, "-m", "study.cli", *args], env={**os.environ, **ENV},
                   check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def _trial_times(study_dir: Path) -> list[dict]:
    """Per trial: Tune's wall from trial start to its last result, and the loop's own time."""
    rows = []
    for result in sorted((study_dir / "ray").glob("*/*/result.json")):
        lines = [json.loads(x) for x in result.read_text().splitlines()]
        loop_s = sum(x["epoch_time_s"] for x in lines)
        rows.append({"trial_s": lines[-1]["time_total_s"] + lines[0]["trial_startup_s"],
                     "loop_s": loop_s, "startup_s": lines[0]["trial_startup_s"]})
    return rows


def figure_overhead(tmp: Path, quick: bool, reps: int, epochs: int | None,
                    gpu: bool = False) -> dict:
    # ~0.42 s an epoch of `hybrid` on one idle core: 143 epochs make the ~60 s training the
    # issue names (quick: ~7 s).
    epochs = epochs or (15 if quick else 143)
    space = _space(tmp, "overhead", epochs, 1)
    config = tmp / "overhead_run.yaml"
    from search_spaces.space import load_space

    load_space(space).base_config().to_yaml(config)
    n = [0, 0]  # launches, trainings

    # On CUDA the trial is a TorchTrainer run with one DDP worker holding the GPU (bf16
    # autocast: train.amp), and `train` picks the GPU by itself.
    gpu_args = ("--gpus-per-worker", "1") if gpu else ()

    def launch() -> None:
        n[0] += 1
        _cli("launch", "--space", str(space), "--storage", str(tmp / f"s{n[0]}"), *gpu_args)

    def train() -> None:
        n[1] += 1
        _cli("train", "--config", str(config), "--out", str(tmp / f"t{n[1]}"), "--quiet")

    times = alternate({"launch (1 trial)": launch, "train": train}, reps)
    inside = _trial_times(tmp / "s1" / "overhead")
    # per epoch, rep by rep: the study's trial (no test scoring in any epoch) against `train`
    per_epoch = []
    for rep in range(1, reps + 1):
        (result,) = (tmp / f"s{rep}" / "overhead").glob("ray/*/*/result.json")
        trial = [json.loads(x)["epoch_time_s"] for x in result.read_text().splitlines()]
        alone = [h["epoch_time_s"] for h in
                 json.loads((tmp / f"t{rep}" / "metrics.json").read_text())["history"]]
        per_epoch.append({"trial_epoch_s": statistics.median(trial),
                          "train_epoch_s": statistics.median(alone)})
    return {"launch_s": summary(times["launch (1 trial)"]), "train_s": summary(times["train"]),
            "ratio": ratio(times["launch (1 trial)"], times["train"]), "trial_inside": inside,
            "epoch": per_epoch, "epoch_ratio": ratio([e["trial_epoch_s"] for e in per_epoch],
                                                     [e["train_epoch_s"] for e in per_epoch])}


def figure_status(tmp: Path, quick: bool, reps: int) -> dict:
    """``jepa-study status`` on a finished study of 24 short trials, as a command, ``reps``
    times (the interpreter's start included)."""
    space = _space(tmp, "status", 1, 24, steps=2, search=True)
    _cli("launch", "--space", str(space), "--storage", str(tmp / "st"))
    times = [_cli("status", str(tmp / "st" / "status")) for _ in range(max(reps, 5))]
    return {"status_s": summary(times)}


def figure_throughput(tmp: Path, quick: bool) -> dict:
    out = {}
    samples = 4 if quick else 8
    for concurrency in (1, 2):
        space = _space(tmp, f"thr{concurrency}", 3 if quick else 5, samples, search=True)
        wall = _cli("launch", "--space", str(space), "--storage", str(tmp / f"thr{concurrency}"),
                    "--max-concurrent-trials", str(concurrency))
        trials = _trial_times(tmp / f"thr{concurrency}" / f"thr{concurrency}")
        out[concurrency] = {"wall_s": wall, "trials": len(trials),
                            "trials_per_hour": 3600 * len(trials) / wall,
                            "mean_trial_s": sum(t["trial_s"] for t in trials) / len(trials)}
    out["speedup_2_vs_1"] = out[1]["wall_s"] / out[2]["wall_s"]
    return out


def figure_scaling(tmp: Path, quick: bool) -> dict:
    """In-process: a ray.cluster_utils.Cluster of 1 or 2 one-CPU nodes, same 8 trials."""
    import ray
    from ray.cluster_utils import Cluster

    from study.launcher import StudyOptions, launch

    results = {}
    for nodes in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        # 10 epochs (~4-5 s a trial): long enough that the work, not the cluster's start-up
        # and Tune's bookkeeping, dominates the 1-node run
        space = _space(tmp, f"scale{nodes}", 2 if quick else 10, 8, search=True)
        t0 = time.perf_counter()
        launch(StudyOptions(space=str(space), storage=str(tmp / f"scale{nodes}"),
                            address=cluster.address, verbose=0))
        results[nodes] = time.perf_counter() - t0
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return {"one_node_s": results[1], "two_nodes_s": results[2],
            "ratio": results[2] / results[1]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--figures", default="1,3,4,12")
    p.add_argument("--overhead-epochs", type=int, default=None,
                   help="epochs of the figure-1 training (default 143: ~60 s on one core)")
    args = p.parse_args()
    device = resolve_device(args.device)
    figures = {int(f) for f in args.figures.split(",")}
    payload: dict = {"machine": machine(device), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp_name:
        tmp = Path(tmp_name)
        if 1 in figures:
            f1 = payload["overhead"] = figure_overhead(tmp, args.quick, args.reps or 2,
                                                       args.overhead_epochs,
                                                       gpu=device.type == "cuda")
            print(table(["figure 1", "median [min, max]"], [
                ["launch, 1-trial study (s)", spread(f1["launch_s"])],
                ["train, same config (s)", spread(f1["train_s"])],
                ["ratio launch / train (target <= 1.10)", spread(f1["ratio"])],
                ["per epoch: trial / train (target <= 1.05)", spread(f1["epoch_ratio"])]]))
            for row in f1["trial_inside"]:
                print(f"  inside the study: trial {row['trial_s']:.1f} s, loop "
                      f"{row['loop_s']:.1f} s, ratio {row['trial_s'] / row['loop_s']:.3f}")
        if 12 in figures:
            f12 = payload["status"] = figure_status(tmp, args.quick, args.reps or 5)
            print(table(["figure 12", "median [min, max]"], [
                ["jepa-study status, finished 24-trial study (s; target <= 0.5)",
                 spread(f12["status_s"])]]))
        if 3 in figures:
            f3 = payload["throughput"] = figure_throughput(tmp, args.quick)
            print(table(["figure 3: concurrent trials", "wall s", "trials/hour"],
                        [[c, f3[c]["wall_s"], f3[c]["trials_per_hour"]] for c in (1, 2)]))
        if 4 in figures:
            f4 = payload["scaling"] = figure_scaling(tmp, args.quick)
            print(table(["figure 4", "seconds"], [
                ["8 trials, 1 node x 1 CPU", f4["one_node_s"]],
                ["8 trials, 2 nodes x 1 CPU", f4["two_nodes_s"]],
                ["ratio (target <= 0.6)", f4["ratio"]]]))
    write_json("study", payload, args)


if __name__ == "__main__":
    main()
