"""Figure 7: memory of frozen-base training, in-process.

1. Peak RSS of one frozen-base ``trainables.loop.train`` run (the ``hybrid`` preset; it reads
   the warm feature cache itself), as ``getrusage``'s ``ru_maxrss`` and as the maximum of
   ``/proc/self/statm`` sampled every 5 ms by a thread, against the RSS before the run.
2. RSS after each of 20 consecutive short ``train()`` calls in the same process (a study
   runs many trials in one worker): first, last, max, and the least-squares slope. Flat
   means no per-trial leak. Full: 1 epoch each, dev and test evaluation; quick: 3 steps
   and the dev evaluation only.

The memory-check in 1 comes first, before anything else has raised the process's peak.

    python -m benchmarks.bench_memory [--quick] [--calls 20]
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import fmt


class Sampler:
    """Samples the current RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, common.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, common.rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, common.rss_mb())


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    info = common.machine(device)
    print(f"machine: {info}")

    from trainables import loop
    from trainables.cache import load_or_compute
    from trainables.config import RunConfig

    data = common.load_data(args.data)
    preset = common.ROOT / "search_spaces" / "presets" / "hybrid.yaml"
    epochs = 1 if args.quick else 5
    cfg = RunConfig.from_yaml(preset).with_overrides(
        {"data.path": str(data.root), "train.epochs": epochs})
    load_or_compute(data, common.BASE_MODEL, cfg.model.max_seq_length, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory-"))

    # 1. one run
    gc.collect()
    before = common.rss_mb()
    peak_before = common.peak_rss_mb()
    with Sampler() as sampler:
        t0 = time.perf_counter()
        loop.train(cfg, out_dir=tmp / "single", data=data, progress=False)
        seconds = time.perf_counter() - t0
    gc.collect()
    after = common.rss_mb()
    single = {"epochs": epochs, "seconds": seconds, "rss_before_mb": before,
              "rss_after_mb": after, "peak_rss_sampled_mb": sampler.peak,
              "ru_maxrss_before_mb": peak_before, "ru_maxrss_after_mb": common.peak_rss_mb(),
              "peak_above_before_mb": sampler.peak - before}
    shutil.rmtree(tmp / "single", ignore_errors=True)

    # 2. many short runs in one process
    # quick: 3 steps and no test evaluation a call (the dev evaluation, whose SVD dominates
    # a short call, still runs), to stay under 2 minutes on 2 busy cores
    short = cfg.with_overrides({"train.epochs": 1,
                                "train.max_steps_per_epoch": 3 if args.quick else None,
                                "eval.evaluate_test": not args.quick})
    rss = []
    t0 = time.perf_counter()
    for i in range(args.calls):
        out = tmp / f"call_{i}"
        loop.train(short, out_dir=out, data=data, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        rss.append(common.rss_mb())
        print(f"  call {i + 1:2d}/{args.calls}: RSS {rss[-1]:8.1f} MiB", flush=True)
    calls_s = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(rss)
    xm, ym = (n - 1) / 2, sum(rss) / n
    slope = (sum((i - xm) * (y - ym) for i, y in enumerate(rss))
             / max(1e-9, sum((i - xm) ** 2 for i in range(n))))
    # growth over the second half (after allocator and caches have settled)
    tail_growth = rss[-1] - rss[n // 2] if n > 1 else 0.0
    repeated = {"calls": n, "steps_per_call": short.train.max_steps_per_epoch or "1 epoch",
                "evaluate_test": short.eval.evaluate_test,
                "seconds": calls_s, "rss_mb": rss, "first_mb": rss[0], "last_mb": rss[-1],
                "max_mb": max(rss), "growth_mb": rss[-1] - rss[0],
                "growth_second_half_mb": tail_growth, "slope_mb_per_call": slope}
    flat = abs(slope) < 2.0 and tail_growth < 20
    result = {"figure": 7, "name": "memory", "quick": args.quick, "machine": info,
              "single_run": single, "repeated": repeated,
              "target": "RSS flat across calls (|slope| < 2 MiB/call, < 20 MiB over the "
                        "second half)", "target_met": flat}
    print("\nFigure 7: memory (MiB)")
    print(common.table(["figure", "value"], [
        [f"RSS before one {epochs}-epoch frozen-base run", fmt(before)],
        ["peak RSS during it (sampled)", fmt(sampler.peak)],
        ["peak above before", fmt(sampler.peak - before)],
        ["ru_maxrss after it (process peak)", fmt(single["ru_maxrss_after_mb"])],
        ["RSS after it", fmt(after)],
        [f"{n} short train() calls: first / last / max",
         f"{fmt(rss[0])} / {fmt(rss[-1])} / {fmt(max(rss))}"],
        ["growth first -> last; over the second half",
         f"{rss[-1] - rss[0]:+.1f}; {tail_growth:+.1f}"],
        ["slope (MiB per call)", f"{slope:+.2f}"],
    ]))
    print(f"flat across calls: {'yes' if flat else 'NO'}")
    common.write_json("memory", result, args)
    return result


if __name__ == "__main__":
    main()
