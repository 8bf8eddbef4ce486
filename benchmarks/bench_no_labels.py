"""Figure 13: does L_pred alone learn from corpus pairs, and does it beat in-batch InfoNCE?

The design's self-supervised claim is that the predictive loss with stop-gradient needs no
labels and no negatives. This figure asks it directly, apart from any search: two fixed
configs trained on pairs made from the corpus alone (``data.pairs: corpus``; no train qrels
read), on the same seeds (a seed fixes the initial weights and the pairs drawn):

* ``L_pred alone``: the ``no_labels`` space's first start point: L_pred with stop-gradient,
  a covariance isotropy term (λ 1), no contrastive term, no negatives;
* ``InfoNCE alone``: the same heads and budget with λ_pred 0 and in-batch InfoNCE (λ_con 1,
  temperature 0.05), the isotropy term kept.

Each run keeps its best epoch by the labelled dev split, and its scoring (query or predictor)
by dev too (``eval.score_with: auto``). Test nDCG@10 (reported, never used to choose) on all,
seen and unseen queries, with the answer's statistics: L_pred alone vs zero-shot, InfoNCE
alone vs zero-shot (independent: one reference row), L_pred alone vs InfoNCE alone (paired
by seed), one family per dataset (Holm, Bonferroni-adjusted intervals, TOST at ±1 point).

Figure 13b, ``linear L_pred, exact``: what the best *linear* predictor those pairs define can
do, with no optimiser in the way. On the frozen base features, ``W = argmin ||X W - Y||² +
α ||W - I||²`` (X: the pseudo-queries, Y: their documents, both unit-normalised; the penalty
pulls towards the identity, i.e. towards zero-shot) is L_pred's minimiser for a linear
predictor, in closed form; a query is scored as ``(1 - t) q + t normalise(q W)``. α and t
are chosen on the labelled dev split from a small grid (``RIDGE_ALPHAS`` x ``BLENDS``),
test is reported for the chosen pair and for every pair (to show whether any would have
helped). It is deterministic: no seeds, compared to zero-shot over queries.

Usage: ``python -m benchmarks.bench_no_labels [--data DIR ...] [--seeds 1 2 3] [--quick]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import ROOT, machine, parser, resolve_device, table, write_json

#: the default datasets: the copies beside the checkout
DATASETS = tuple(str(ROOT.parent / "shared" / "data" / name) for name in ("scifact", "nfcorpus"))
ARMS = {
    "L_pred alone": {},
    "InfoNCE alone": {"loss.lambda_pred": 0.0, "loss.lambda_con": 1.0,
                      "loss.contrastive": "infonce", "loss.temperature": 0.05},
}
#: figure 13b's grid: the pull towards the identity, and how much of the mapped query is used
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1000.0)
BLENDS = (0.5, 1.0)


def ridge_to_identity(x, y, alpha: float):
    """``argmin_W ||x W - y||² + alpha ||W - I||²``: ``(xᵀx + αI)⁻¹ (xᵀy + αI)``.

    x and y are (n, d) arrays of paired rows; alpha > 0. alpha → ∞ gives the identity (no
    change to a query), alpha → 0 the least-squares map.
    """
    import numpy as np

    d = x.shape[1]
    eye = np.eye(d, dtype=np.float64)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.solve(x64.T @ x64 + alpha * eye, x64.T @ y64 + alpha * eye)


def closed_form(base) -> dict:
    """Figure 13b on ``base``'s data and corpus pairs (``trainables.loop.prepare``, as a run
    gets them): the exact linear L_pred predictor, α and blend chosen on dev, scored by the
    runs' own search (``retrieval_per_query``); per-query test nDCG@10 of the chosen one,
    and the grid."""
    import torch

    from trainables.evaluate import retrieval_per_query
    from trainables.loop import prepare

    _, splits, feats = prepare(base, progress=False, device=torch.device("cpu"))

    def unit(a):
        return torch.nn.functional.normalize(a.double(), dim=1)

    docs = unit(feats.doc_features)
    fit = sorted(splits["fit"])
    x = unit(feats.queries(fit))
    y = docs[[feats.doc_row[next(iter(splits["fit"][q]))] for q in fit]]

    def ndcg(w, t: float, split: str) -> dict[str, float]:
        ids = sorted(splits[split])
        q = unit(feats.queries(ids))
        if w is not None:
            q = (1 - t) * q + t * unit(q @ w)
        return retrieval_per_query(ids, q.float(), feats.doc_ids, docs.float(),
                                   splits[split])["ndcg_at_10"]

    grid = []
    for alpha in RIDGE_ALPHAS:
        w = torch.from_numpy(ridge_to_identity(x.numpy(), y.numpy(), alpha))
        for t in BLENDS:
            dev, test = ndcg(w, t, "dev"), ndcg(w, t, "test")
            grid.append({"alpha": alpha, "blend": t, "dev": _mean(list(dev.values())),
                         "test": _mean(list(test.values())), "test_per_query": test})
    chosen = max(grid, key=lambda g: g["dev"])
    zero_dev = _mean(list(ndcg(None, 0.0, "dev").values()))
    return {"pairs": len(fit), "chosen": dict(chosen), "zero_shot_dev": zero_dev,
            "grid": [{k: v for k, v in g.items() if k != "test_per_query"} for g in grid]}


def start_point(data: str):
    """The no_labels space's first point as a run config on ``data`` (test scored)."""
    from search_spaces.space import load_space

    space = load_space("no_labels")
    cfg = space.trial_config(space.points()[0], data_path=data)
    return cfg.with_overrides({"eval.evaluate_test": True, "eval.score_with": "auto"},
                              "bench_no_labels")


def measure(data: str, seeds: list[int], work: Path, epochs: int | None = None) -> dict:
    """Trains both arms over ``seeds`` on ``data``; returns figures and comparisons."""
    import numpy as np

    from analysis.stats import compare_all, per_query_matrix
    from trainables.data import resolve_data_dir
    from trainables.loop import train
    from trainables.references import reference_rows

    base = start_point(str(resolve_data_dir(data)))
    if epochs:
        base = base.with_overrides({"train.epochs": epochs}, "bench_no_labels --quick")
    runs: dict[str, list[dict]] = {}
    for arm, overrides in ARMS.items():
        for seed in seeds:
            cfg = base.with_overrides({**overrides, "train.seed": seed}, f"{arm} seed {seed}")
            result = train(cfg, out_dir=work / f"{arm.split()[0]}-{seed}", progress=False)
            runs.setdefault(arm, []).append(result)
    refs = reference_rows(base)
    subsets = refs["subsets"]["test"]
    zero = refs["per_query"]["zero_shot"]
    out: dict = {"data": str(data), "seeds": seeds, "config": base.to_dict(),
                 "arms": {}, "comparisons": {}}
    chosen = {arm: [r["test_per_query"][r["score_with"]] for r in rs]
              for arm, rs in runs.items()}
    for arm, rs in runs.items():
        out["arms"][arm] = {
            "scoring": [r["score_with"] for r in rs], "best_epoch": [r["best_epoch"] for r in rs],
            "dev": [r["best_dev_ndcg_at_10"] for r in rs],
            **{k: [r["test"].get(k) for r in rs] for k in
               ("test_ndcg_at_10", "test_seen_ndcg_at_10", "test_unseen_ndcg_at_10")}}
    out["zero_shot"] = refs["rows"]["zero_shot"]
    exact = closed_form(base)
    chosen["linear L_pred, exact"] = [exact["chosen"].pop("test_per_query")]
    out["closed_form"] = exact
    for subset in ("all", "seen", "unseen"):
        ids = sorted(zero) if subset == "all" else sorted(subsets[subset])
        if not ids:
            continue
        lp, _ = per_query_matrix(chosen["L_pred alone"], ids)
        nce, _ = per_query_matrix(chosen["InfoNCE alone"], ids)
        zs = np.asarray([[zero[q] for q in ids]])
        linear, _ = per_query_matrix(chosen["linear L_pred, exact"], ids)
        rows = compare_all({"L_pred alone vs zero-shot": (lp, zs),
                            "InfoNCE alone vs zero-shot": (nce, zs),
                            "L_pred alone vs InfoNCE alone": (lp, nce),
                            "linear L_pred, exact vs zero-shot": (linear, zs)},
                           family=f"no-label ablation ({subset})",
                           paired={"L_pred alone vs zero-shot": False,
                                   "InfoNCE alone vs zero-shot": False,
                                   "L_pred alone vs InfoNCE alone": True,
                                   "linear L_pred, exact vs zero-shot": True})
        out["comparisons"][subset] = [{**c.to_dict(), "queries": len(ids)} for c in rows]
    per_query = chosen["linear L_pred, exact"][0]
    out["closed_form_subsets"] = [
        _mean([per_query[q] for q in (sorted(zero) if s == "all" else subsets[s])])
        for s in ("all", "seen", "unseen")]
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--datasets", nargs="+", default=None,
                   help="BEIR directories (default: SciFact and NFCorpus from ../shared/data)")
    args = p.parse_args()
    device = resolve_device(args.device)
    datasets = args.datasets or ([args.data] if args.data else list(DATASETS))
    seeds = args.seeds[:2] if args.quick else args.seeds
    out: dict = {"machine": machine(device), "figure13": {}}
    for data in datasets:
        with tempfile.TemporaryDirectory() as tmp:
            m = measure(data, seeds, Path(tmp), epochs=3 if args.quick else None)
        out["figure13"][Path(data).name] = m
        print(f"\nfigure 13, {Path(data).name}: test nDCG@10 over seeds {seeds} (dev chose "
              "epoch and scoring)")
        rows = []
        for arm, a in m["arms"].items():
            rows.append([arm, *[f"{_mean(a[k]):.4f}" for k in
                                ("test_ndcg_at_10", "test_seen_ndcg_at_10",
                                 "test_unseen_ndcg_at_10")],
                         f"{_mean(a['dev']):.4f}", a["best_epoch"], a["scoring"]])
        e, subsets_ = m["closed_form"], m["closed_form_subsets"]
        rows.append(["linear L_pred, exact", *[f"{v:.4f}" for v in subsets_],
                     f"{e['chosen']['dev']:.4f}", "-",
                     f"α {e['chosen']['alpha']:g}, blend {e['chosen']['blend']:g}"])
        z = m["zero_shot"]
        rows.append(["zero-shot", *[f"{z.get(k, float('nan')):.4f}" for k in
                                    ("test_ndcg_at_10", "test_seen_ndcg_at_10",
                                     "test_unseen_ndcg_at_10")], "", "", ""])
        print(table(["system", "all", "seen", "unseen", "dev", "best epochs", "scoring"], rows))
        print(f"figure 13b grid ({e['pairs']} corpus pairs; zero-shot dev "
              f"{e['zero_shot_dev']:.4f}): every α and blend, test reported only")
        print(table(["α", "blend", "dev", "test"],
                    [[f"{g['alpha']:g}", f"{g['blend']:g}", f"{g['dev']:.4f}",
                      f"{g['test']:.4f}"] for g in e["grid"]]))
        for subset, comps in m["comparisons"].items():
            print(table([f"{subset} ({comps[0]['queries']} queries)", "diff (points)",
                         "adjusted CI", "verdict"],
                        [[c["name"], f"{c['diff_points']:+.2f}",
                          f"[{c['adj_ci_low_points']:+.2f}, {c['adj_ci_high_points']:+.2f}]",
                          c["verdict"]] for c in comps]))
    write_json("bench_no_labels", out, args)


def _mean(values: list) -> float:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
