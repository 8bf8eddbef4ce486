"""Figure 2: the frozen-base embedding cache (target: a cached trial >= 20x faster).

(a) ``load_or_compute`` on a warm cache vs computing the features (``load_base`` plus
    ``encode_dataset`` over every document and query);
(b) a whole 1-epoch frozen-base trial (``trainables.loop.train`` of the ``hybrid`` preset,
    dev and test evaluation included) on a warm cache vs the same trial on an empty cache.

``--quick`` encodes a seeded random sample of ``--subset`` documents (and the same fraction
of the queries) and extrapolates linearly to the whole dataset; the cold trial is then the
warm trial minus its cache read plus the extrapolated encoding. The full run also measures
the real thing once: a trial with ``JEPA_STUDY_CACHE`` pointed at an empty directory, whose
``load_or_compute`` call is timed from inside (a wrapper around the loop's reference to it).

    python -m benchmarks.bench_cache [--quick] [--device cuda|cpu] [--subset 500]
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import fmt, spread, summary

import torch  # noqa: E402  (after common: it sets the offline variables)


def trial_config(data_root: Path):
    from trainables.config import RunConfig

    preset = common.ROOT / "search_spaces" / "presets" / "hybrid.yaml"
    return RunConfig.from_yaml(preset).with_overrides(
        {"data.path": str(data_root), "train.epochs": 1})


def subset(data, n_docs: int, seed: int = 0):
    """A BeirData with ``n_docs`` sampled documents and the same fraction of the queries."""
    from trainables.data import BeirData

    rng = random.Random(seed)
    doc_ids = sorted(rng.sample(data.doc_ids, min(n_docs, len(data.doc_ids))))
    frac = len(doc_ids) / len(data.doc_ids)
    n_q = max(1, round(frac * len(data.queries)))
    qids = sorted(rng.sample(list(data.queries), n_q))
    return BeirData(root=data.root, corpus={d: data.corpus[d] for d in doc_ids},
                    queries={q: data.queries[q] for q in qids}, qrels={}), frac


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--subset", type=int, default=500,
                   help="documents encoded for the extrapolated cold path")
    p.add_argument("--skip-real", action="store_true",
                   help="full mode without the real cold trial (the slow part)")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    reps = args.reps or (1 if args.quick else 2)

    from trainables import loop
    from trainables.cache import encode_dataset, load_or_compute
    from trainables.model import load_base

    data = common.load_data(args.data)
    cfg = trial_config(data.root)
    max_len = cfg.model.max_seq_length
    info = common.machine(device)
    print(f"machine: {info}")

    t_fill, features = common.timed(lambda: load_or_compute(
        data, common.BASE_MODEL, max_len, device=str(device), progress=False))
    print(f"warm-cache check: load_or_compute took {t_fill:.3f} s "
          f"({'cache was cold, filled now' if t_fill > 5 else 'cache already warm'})")

    def warm_load():
        data._cache.pop("fingerprint", None)  # a fresh process hashes the data files too
        return load_or_compute(data, common.BASE_MODEL, max_len, progress=False)

    tmp_root = Path(tempfile.mkdtemp(prefix="bench_cache-"))
    runs = iter(range(10**6))

    def warm_trial():
        out = tmp_root / f"trial_{next(runs)}"
        loop.train(cfg, out_dir=out, data=data, progress=False)
        shutil.rmtree(out, ignore_errors=True)

    # -- extrapolated cold path (both modes) ----------------------------------------------
    t_base, base = common.timed(lambda: load_base(common.BASE_MODEL, max_len, device))
    sub, frac = subset(data, args.subset)
    scale = 1 / frac
    common.timed(lambda: encode_dataset(base, subset(data, 16, seed=1)[0], progress=False),
                 device)  # warm-up: first-call allocations and thread pools
    print(f"\n(a)+(b) extrapolated: {len(sub.corpus)} docs + {len(sub.queries)} queries "
          f"(fraction {frac:.4f}), x{scale:.2f}; load_base {t_base:.2f} s; {reps} rep(s)")
    times = {"warm_load": [], "encode_subset": [], "warm_trial": []}
    for r in range(reps):
        order = ["warm_load", "warm_trial", "encode_subset"]
        if r % 2:
            order.reverse()
        for name in order:
            fn = {"warm_load": warm_load, "warm_trial": warm_trial,
                  "encode_subset": lambda: encode_dataset(base, sub, progress=False)}[name]
            # the warm load is milliseconds: take the median of 5 back-to-back calls
            n = 5 if name == "warm_load" else 1
            ts = [common.timed(fn, device)[0] for _ in range(n)]
            times[name].append(sorted(ts)[n // 2])
            print(f"  rep {r + 1}/{reps}  {name:<14s} {times[name][-1]:9.4f} s", flush=True)
    cold_est = [t_base + e * scale for e in times["encode_subset"]]
    cold_trial_est = [w - l + c for w, l, c in
                      zip(times["warm_trial"], times["warm_load"], cold_est)]
    result = {
        "figure": 2, "name": "cache", "quick": args.quick, "machine": info,
        "config": {"preset": "hybrid", "epochs": 1, "max_seq_length": max_len,
                   "batch_size": cfg.train.batch_size, "n_docs": len(data.corpus),
                   "n_queries": len(data.queries), "subset_docs": len(sub.corpus),
                   "subset_queries": len(sub.queries), "reps": reps},
        "seconds": {k: summary(v) for k, v in times.items()},
        "load_base_s": t_base,
        "extrapolated": {
            "cold_features_s": summary(cold_est),
            "cold_trial_s": summary(cold_trial_est),
            "features_speedup": common.ratio(cold_est, times["warm_load"]),
            "trial_speedup": common.ratio(cold_trial_est, times["warm_trial"]),
        },
        "target": ">= 20x (trial)",
    }
    del base

    # -- the real cold trial (full mode) ----------------------------------------------------
    if not args.quick and not args.skip_real:
        print("\nreal cold trial: JEPA_STUDY_CACHE -> empty directory (encodes the whole "
              "dataset once, on the CPU: prepare() calls load_or_compute without a device)")
        recorded: list[float] = []
        original = loop.load_or_compute

        def timed_load_or_compute(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                recorded.append(time.perf_counter() - t0)

        cold_cache = tmp_root / "cold_cache"
        old_env = os.environ.get("JEPA_STUDY_CACHE")
        os.environ["JEPA_STUDY_CACHE"] = str(cold_cache)
        loop.load_or_compute = timed_load_or_compute
        try:
            # the cache directory is empty: this call IS the cold trial, and fills it
            t_cold_trial = common.timed(warm_trial)[0]
            t_cold_features = recorded[0]
            warm_trials, warm_loads = [], []
            for _ in range(3):  # the same trial again, now on the cache it filled
                warm_trials.append(common.timed(warm_trial)[0])
                warm_loads.append(recorded[-1])
        finally:
            loop.load_or_compute = original
            if old_env is None:
                os.environ.pop("JEPA_STUDY_CACHE", None)
            else:
                os.environ["JEPA_STUDY_CACHE"] = old_env
        print(f"  cold trial {t_cold_trial:.2f} s (of which load_or_compute "
              f"{t_cold_features:.2f} s); warm trials {[round(t, 3) for t in warm_trials]} s; "
              f"warm load_or_compute inside them {[round(t, 4) for t in warm_loads]} s")
        med_trial = summary(warm_trials)["median"]
        med_load = summary(warm_loads)["median"]
        result["real"] = {
            "cold_trial_s": t_cold_trial, "cold_load_or_compute_s": t_cold_features,
            "warm_trial_s": summary(warm_trials), "warm_load_or_compute_s": summary(warm_loads),
            "trial_speedup": t_cold_trial / med_trial,
            "features_speedup": t_cold_features / med_load,
            "extrapolation_error": (result["extrapolated"]["cold_features_s"]["median"]
                                    / t_cold_features - 1),
        }
    shutil.rmtree(tmp_root, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------
    ex = result["extrapolated"]
    rows = [
        ["(a) features: warm load_or_compute (s)", spread(result["seconds"]["warm_load"])],
        ["(a) features: cold, extrapolated (s)", spread(ex["cold_features_s"])],
        ["(a) speed-up, extrapolated", spread(ex["features_speedup"])],
        ["(b) trial on warm cache (s)", spread(result["seconds"]["warm_trial"])],
        ["(b) trial on empty cache, extrapolated (s)", spread(ex["cold_trial_s"])],
        ["(b) trial speed-up, extrapolated (target >= 20)", spread(ex["trial_speedup"])],
    ]
    if "real" in result:
        real = result["real"]
        rows += [
            ["(a) features: cold, real (s)", fmt(real["cold_load_or_compute_s"])],
            ["(a) speed-up, real", fmt(real["features_speedup"])],
            ["(b) trial on empty cache, real (s)", fmt(real["cold_trial_s"])],
            ["(b) trial on warm cache, same run (s)", spread(real["warm_trial_s"])],
            ["(b) trial speed-up, real (target >= 20)", fmt(real["trial_speedup"])],
            ["extrapolation error of the cold features", f"{real['extrapolation_error']:+.1%}"],
        ]
    speedup = result.get("real", {}).get("trial_speedup", ex["trial_speedup"]["median"])
    result["target_met"] = speedup >= 20
    print("\nFigure 2: frozen-base embedding cache "
          f"({'extrapolated from a subset' if 'real' not in result else 'real and extrapolated'})")
    print(common.table(["figure", "median [min, max]"], rows))
    print(f"target >= 20x: {'met' if result['target_met'] else 'NOT met'} ({fmt(speedup)}x)")
    common.write_json("cache", result, args)
    return result


if __name__ == "__main__":
    main()
