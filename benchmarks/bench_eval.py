"""Figure 6: evaluation search speed; exact torch search vs FAISS (flat and HNSW).

Part 1, SciFact (5183 docs): queries/s of ``trainables.evaluate.search`` (one batched matmul
and top-k, k = 101 as ``retrieval_metrics`` asks) for the 300 test queries and all 1109
queries, at D = 384 (the cached base features) and D = 512 (through an untrained JEPA
projection), plus the whole ``retrieval_metrics`` (search + pytrec_eval) and
``evaluate_model`` (both scorings + collapse diagnostics) for the test split, to show where
an evaluation's time goes.

Part 2, synthetic clustered corpora (unit vectors, D = 512; ``--sizes``, default 5k, 50k,
200k and, in full mode when memory allows, 1M; ``--queries``, default 1000, quick 300): ``search`` vs FAISS ``IndexFlatIP`` (exact)
vs ``IndexHNSWFlat`` (approximate; M, efConstruction, efSearch as given), for ``--queries``
queries, top 100. Reports queries/s of the search alone and of build + search (an
evaluation re-embeds the corpus every epoch, so the index is rebuilt each time), HNSW's
recall@100 against the exact top 100, and the crossover sizes.

    python -m benchmarks.bench_eval [--quick] [--device cuda|cpu] [--sizes 5000,50000]
"""

from __future__ import annotations

import gc
import math

from benchmarks import common
from benchmarks.common import fmt, spread, summary

import torch  # noqa: E402

K = 100


def scifact_part(data, device, reps: int) -> dict:
    from trainables.cache import load_or_compute
    from trainables.config import ModelConfig
    from trainables.data import make_splits
    from trainables.evaluate import embed_corpus, evaluate_model, retrieval_metrics, search
    from trainables.model import JEPAModel

    features = load_or_compute(data, common.BASE_MODEL, common.CACHE_MAX_LEN,
                               device=str(device), progress=False)
    test = make_splits(data)["test"]
    test_ids = sorted(test)
    model = JEPAModel(ModelConfig(), None, base_dim=features.dim).eval()
    with torch.no_grad():
        spaces = {
            384: (features.doc_features, features.query_features),
            512: (embed_corpus(model, features.doc_features, 256),
                  model.encode_queries(features.query_features)),
        }
    all_rows = list(range(len(features.query_ids)))
    test_rows = [features.query_row[q] for q in test_ids]
    spaces = {dim: (d.to(device), q.to(device)) for dim, (d, q) in spaces.items()}

    fns = {}
    for dim, (docs, queries) in spaces.items():
        for label, rows in (("test300", test_rows), ("all1109", all_rows)):
            q = queries[rows]
            fns[f"search D={dim} {label}"] = (lambda q=q, docs=docs:
                                              search(q, docs, "cosine", k=K + 1))
        q_test = queries[test_rows]
        fns[f"retrieval_metrics D={dim} test300"] = (
            lambda q=q_test, docs=docs: retrieval_metrics(test_ids, q, features.doc_ids, docs,
                                                          test, "cosine"))
        for kind in ("flat", "hnsw"):  # the path eval.faiss_min_docs switches to
            fns[f"search(faiss {kind}, as evaluate.py) D={dim} test300"] = (
                lambda q=q_test, docs=docs, kind=kind: search(
                    q, docs, "cosine", k=K + 1, faiss_min_docs=1, faiss_index=kind))
    model = model.to(device)
    fns["evaluate_model D=512 test300"] = lambda: evaluate_model(
        model, query_ids=test_ids, query_inputs=features.queries(test_ids).to(device),
        doc_ids=features.doc_ids, doc_emb=spaces[512][0], qrels=test, similarity="cosine")
    for fn in fns.values():  # warm-up
        fn()
    times = common.alternate(fns, reps, device, log=False)
    n_queries = {"test300": len(test_rows), "all1109": len(all_rows)}
    out = {}
    for name, ts in times.items():
        n = n_queries[name.split()[-1]]
        out[name] = {"seconds": summary(ts), "queries_per_s": summary([n / t for t in ts])}
    return out


def clustered(n: int, dim: int, n_queries: int, seed: int = 0):
    """Unit vectors around ~sqrt(n) Gaussian centres; queries are noisy copies of docs."""
    g = torch.Generator().manual_seed(seed)
    n_centres = max(16, int(math.sqrt(n)))
    centres = torch.randn(n_centres, dim, generator=g)
    docs = torch.empty(n, dim)
    chunk = 100_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        assign = torch.randint(n_centres, (m,), generator=g)
        docs[start:start + m] = centres[assign] + 0.8 * torch.randn(m, dim, generator=g)
    docs = torch.nn.functional.normalize(docs, dim=-1)
    src = torch.randint(n, (n_queries,), generator=g)
    queries = torch.nn.functional.normalize(
        docs[src] + 0.05 * torch.randn(n_queries, dim, generator=g), dim=-1)
    return docs, queries


def synthetic_part(sizes, dim, n_queries, device, reps, hnsw_m, ef_construction, ef_search,
                   threads) -> list[dict]:
    import faiss
    from trainables.evaluate import search

    faiss.omp_set_num_threads(threads)
    rows = []
    for n in sizes:
        need_gb = n * dim * 4 * 2.5 / 2**30 + 1024 * n * 4 * 2 / 2**30
        if need_gb > 0.7 * common.available_gb():
            print(f"  N={n:,}: skipped, needs ~{need_gb:.1f} GB "
                  f"(available {common.available_gb():.1f} GB)")
            rows.append({"n_docs": n, "skipped": f"memory: needs ~{need_gb:.1f} GB"})
            continue
        docs, queries = clustered(n, dim, n_queries)
        docs_np, queries_np = docs.numpy(), queries.numpy()
        docs_dev, queries_dev = docs.to(device), queries.to(device)

        def build_flat():
            index = faiss.IndexFlatIP(dim)
            index.add(docs_np)
            return index

        def build_hnsw():
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(docs_np)
            index.hnsw.efSearch = ef_search
            return index

        t_flat_build, flat = common.timed(build_flat)
        t_hnsw_build, hnsw = common.timed(build_hnsw)
        print(f"  N={n:,}: HNSW build {t_hnsw_build:.2f} s, flat build {t_flat_build:.3f} s",
              flush=True)
        exact_idx = search(queries_dev, docs_dev, "cosine", k=K)[1].cpu()
        _, hnsw_idx = hnsw.search(queries_np, K)
        hits = [len(set(a.tolist()) & set(b.tolist())) / K
                for a, b in zip(exact_idx, torch.from_numpy(hnsw_idx))]
        recall = sum(hits) / len(hits)
        fns = {"torch": lambda: search(queries_dev, docs_dev, "cosine", k=K),
               "faiss_flat": lambda: flat.search(queries_np, K),
               "faiss_hnsw": lambda: hnsw.search(queries_np, K)}
        for fn in fns.values():
            fn()
        times = common.alternate(fns, reps, device, log=False)
        row = {"n_docs": n, "dim": dim, "n_queries": n_queries,
               "hnsw_build_s": t_hnsw_build, "flat_build_s": t_flat_build,
               "hnsw_recall_at_100": recall}
        for name, ts in times.items():
            build = {"torch": 0.0, "faiss_flat": t_flat_build, "faiss_hnsw": t_hnsw_build}[name]
            row[name] = {"search_s": summary(ts),
                         "queries_per_s": summary([n_queries / t for t in ts]),
                         "queries_per_s_with_build": n_queries / (build + summary(ts)["median"])}
        row["hnsw_vs_torch"] = common.ratio(times["torch"], times["faiss_hnsw"])
        row["flat_vs_torch"] = common.ratio(times["torch"], times["faiss_flat"])
        rows.append(row)
        print(f"    qps torch {fmt(row['torch']['queries_per_s']['median'])}, flat "
              f"{fmt(row['faiss_flat']['queries_per_s']['median'])}, hnsw "
              f"{fmt(row['faiss_hnsw']['queries_per_s']['median'])} "
              f"(recall@100 {recall:.3f})", flush=True)
        del docs, queries, docs_np, queries_np, docs_dev, queries_dev, flat, hnsw, fns
        gc.collect()
    return rows


def break_even_queries(row: dict) -> float:
    """Queries per index build above which HNSW (build + search) beats torch exact search."""
    t_torch = 1 / row["torch"]["queries_per_s"]["median"]
    t_hnsw = 1 / row["faiss_hnsw"]["queries_per_s"]["median"]
    if t_hnsw >= t_torch:
        return math.inf
    return row["hnsw_build_s"] / (t_torch - t_hnsw)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None,
                   help="comma-separated corpus sizes (default 5000,50000,200000[,1000000])")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=None, help="default 1000 (quick: 300)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--skip-scifact", action="store_true")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    reps = args.reps or (2 if args.quick else 5)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [5_000, 50_000, 200_000] + ([] if args.quick else [1_000_000])
    args.queries = args.queries or (300 if args.quick else 1000)
    info = common.machine(device)
    print(f"machine: {info}")
    result = {"figure": 6, "name": "eval", "quick": args.quick, "machine": info,
              "config": {"k": K, "dim": args.dim, "queries": args.queries, "sizes": sizes,
                         "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                         "ef_search": args.ef_search, "reps": reps}}
    if not args.skip_scifact:
        print("\nPart 1: SciFact exact search")
        result["scifact"] = scifact_part(common.load_data(args.data), device, reps)
        print(common.table(
            ["what", "queries/s median [min, max]", "s median"],
            [[k, spread(v["queries_per_s"]), fmt(v["seconds"]["median"], 4)]
             for k, v in result["scifact"].items()]))

    print(f"\nPart 2: synthetic corpora, D={args.dim}, {args.queries} queries, top {K}")
    rows = synthetic_part(sizes, args.dim, args.queries, device, reps, args.hnsw_m,
                          args.ef_construction, args.ef_search,
                          info["affinity"] or torch.get_num_threads())
    result["synthetic"] = rows
    done = [r for r in rows if "skipped" not in r]
    table_rows = []
    for r in done:
        table_rows.append([
            f"{r['n_docs']:,}", fmt(r["torch"]["queries_per_s"]["median"]),
            fmt(r["faiss_flat"]["queries_per_s"]["median"]),
            fmt(r["faiss_hnsw"]["queries_per_s"]["median"]), spread(r["hnsw_vs_torch"]),
            fmt(r["hnsw_recall_at_100"]), fmt(r["hnsw_build_s"]),
            fmt(r["faiss_hnsw"]["queries_per_s_with_build"]), fmt(break_even_queries(r))])
    print(common.table(["N docs", "torch q/s", "flat q/s", "hnsw q/s", "hnsw/torch",
                        "hnsw R@100", "hnsw build s", "hnsw q/s incl. build",
                        "break-even queries/build"], table_rows))
    search_cross = next((r["n_docs"] for r in done
                         if r["faiss_hnsw"]["queries_per_s"]["median"]
                         > r["torch"]["queries_per_s"]["median"]), None)
    build_cross = {q: next((r["n_docs"] for r in done if break_even_queries(r) < q), None)
                   for q in (300, 1109)}
    result["crossover"] = {
        "hnsw_search_only_beats_torch_from_n": search_cross,
        "hnsw_build_plus_search_beats_torch_from_n": build_cross,
        "note": "smallest measured size where HNSW wins; None: it never did up to the "
                "largest measured size",
    }
    print(f"\ncrossover (search only): HNSW beats exact torch search from N = "
          f"{search_cross if search_cross else '> ' + str(max(r['n_docs'] for r in done))}")
    for q, n in build_cross.items():
        print(f"crossover (index build + {q} queries, an evaluation): "
              f"{n if n else 'none up to ' + str(max(r['n_docs'] for r in done))}")
    common.write_json("eval", result, args)
    return result


if __name__ == "__main__":
    main()
