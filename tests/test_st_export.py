"""The sentence-transformers export: a trained JEPA model as a folder that plain
``SentenceTransformer(path)`` loads, retrieving exactly as the project's own evaluation does.

Three levels:

* the head conversions (Projection / Predictor -> Dense layers) against the torch modules,
  every shape, on random tensors (milliseconds);
* a matrix of variants trained with ``trainables.loop.train`` for a few epochs on a small
  BEIR collection cut from SciFact (40 test queries, ~160 documents), exported at their best
  dev epoch, then loaded and scored in one fresh interpreter that cannot import this project:
  their vectors equal the JEPA model's (<= 1e-5) and their test nDCG@10 equals the one
  ``train`` reported for the same weights (<= 1e-4);
* (slow) one frozen, predictor-scored model on the whole of SciFact (5,183 documents), the
  same check, every document through the folder's own ``encode_document``.

The fresh interpreter runs :data:`SCORER`: it imports sentence_transformers (and torch, its
dependency), numpy, json and pytrec_eval, blocks any import of the project's packages, and
reads a job file. In the matrix the base runs over the small corpus once per distinct base
(the folders of frozen-base models share it), each folder's own Dense modules run on that,
and the folder's whole ``encode_document`` is checked against the result on a sample.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from trainables.cache import load_or_compute
from trainables.config import PredictorConfig, RunConfig
from trainables.data import load_beir
from trainables.loop import latest_valid_checkpoint, seed_everything, train
from trainables.model import JEPAModel, Predictor, Projection, load_base
from trainables.st_export import (CONFIG_FILE, MARKER_FILE, export_sentence_transformer,
                                  predictor_layers, projection_layers)

EMB_TOL = 1e-5
NDCG_TOL = 1e-4
SMALL_MAX_LEN = 128

# -- the fresh interpreter ---------------------------------------------------------------------

SCORER = r'''
import hashlib, importlib.abc, json, sys, time
t_start = time.perf_counter()
from pathlib import Path

class _NoProject(importlib.abc.MetaPathFinder):
    """The exported folder must load without this project: any import of it fails."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainables", "analysis", "study", "search_spaces"):
            raise ImportError(f"exported model needed the project module {name!r}")
        return None

sys.meta_path.insert(0, _NoProject())

import numpy as np
import pytrec_eval
import torch  # sentence-transformers' own dependency: runs a folder's Dense modules
from sentence_transformers import SentenceTransformer

job = json.load(open(sys.argv[1]))
doc_ids = [d for d, _ in job["corpus"]]
doc_texts = [t for _, t in job["corpus"]]
query_ids = [q for q, _ in job["queries"]]
query_texts = [t for _, t in job["queries"]]
qrels = job["qrels"]
k = 100

def ndcg10(model, q, d):
    scores = model.similarity(q, d).numpy()  # the folder's own similarity function
    run = {}
    for row, qid in enumerate(query_ids):
        top = np.argsort(-scores[row], kind="stable")[:k + 1]
        hits = {doc_ids[i]: float(scores[row, i]) for i in top if doc_ids[i] != qid}
        run[qid] = dict(list(hits.items())[:k])  # BEIR: a query's own id is no hit
    judged = {q: r for q, r in qrels.items() if q in run}
    per = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(
        {q: run[q] for q in judged})
    per = {q: per.get(q, {"ndcg_cut_10": 0.0})["ndcg_cut_10"] for q in judged}
    return sum(per.values()) / len(per), per

def base_key(path):
    """The document route's base (its Transformer's weights and the pooling config)."""
    route = json.loads((Path(path) / "router_config.json").read_text())["structure"]["document"]
    h = hashlib.sha256()
    for module in route[:2]:
        for f in sorted((Path(path) / module).iterdir()):
            h.update(f.read_bytes())
    return h.hexdigest()

bases = {}
out = {"_seconds": {"imports": time.perf_counter() - t_start}}
for f in job["folders"]:
    t_folder = time.perf_counter()
    model = SentenceTransformer(f["path"], device="cpu")
    q = model.encode_query(query_texts, batch_size=32, show_progress_bar=False)
    if job.get("full_corpus"):
        d = model.encode_document(doc_texts, batch_size=32, show_progress_bar=False)
        sample = list(range(len(f["doc_probe"])))
        d_sample = d[sample]
    else:
        # The base runs over the corpus once per distinct base (the costly part); each
        # folder's own document modules run on its output, and the folder's whole
        # encode_document path is checked against that on a sample, probes first.
        route = list(model[0].sub_modules["document"])
        n_base = next(i for i, m in enumerate(route) if type(m).__name__ == "Dense")
        key = base_key(f["path"])
        if key not in bases:
            bases[key] = SentenceTransformer(modules=route[:n_base], device="cpu").encode(
                doc_texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
        with torch.no_grad():
            features = {"sentence_embedding": bases[key].clone()}
            for module in route[n_base:]:
                features = module(features)
        d = features["sentence_embedding"].numpy()
        sample = f["doc_probe"] + f["doc_sample"]
        d_sample = model.encode_document([doc_texts[i] for i in sample], show_progress_bar=False)
    mean, per = ndcg10(model, q, d)
    out[f["name"]] = {
        "ndcg_at_10": mean, "per_query": per, "similarity": model.similarity_fn_name,
        "query_probe": q[f["query_probe"]].tolist(),
        "doc_probe": d_sample[:len(f["doc_probe"])].tolist(),
        "same_docs": float(np.abs(d_sample - d[sample]).max()),
        "max_seq_length": model.max_seq_length}
    out["_seconds"][f["name"]] = time.perf_counter() - t_folder
out["_bases_encoded"] = len(bases)
out["_project_modules"] = sorted(m for m in sys.modules
                                 if m.split(".")[0] in ("trainables", "analysis", "study"))
json.dump(out, open(sys.argv[2], "w"))
'''


def score_in_fresh_process(tmp: Path, data, split: str, folders: list[dict], *,
                           full_corpus: bool = False) -> dict:
    """Runs :data:`SCORER` on ``folders`` against ``data``'s ``split`` in a new interpreter
    whose PYTHONPATH and working directory are free of this project, offline.

    With ``full_corpus`` every folder's ``encode_document`` encodes the whole corpus;
    otherwise the base runs over it once per distinct base and each folder's whole
    ``encode_document`` is checked on a sample (``same_docs``).
    """
    qrels = {q: docs for q, docs in data.split(split).items() if any(docs.values())}
    job = {"corpus": [[d, data.doc_text(d)] for d in data.doc_ids],
           "queries": [[q, data.queries[q]] for q in sorted(qrels)],
           "qrels": qrels, "folders": folders, "full_corpus": full_corpus}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", SCORER, str(tmp / "job.json"),
                           str(tmp / "out.json")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=1800)  # CI's per-test limit is the tighter
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out.pop("_project_modules") == []
    return out


# -- level 1: the head conversions ---------------------------------------------------------------

def _apply(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    features = {"sentence_embedding": x}
    for layer in layers:
        features = layer(features)
    return features["sentence_embedding"]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to a few float32 ulps of the largest coordinate (the carried input is split
    into GELU(x) and GELU(-x), whose products are summed apart)."""
    return float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Moves every weight off its initialisation (zero-initialised last layers included), so
    that a dropped branch or skip shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_layers_equal_projection(kind):
    torch.manual_seed(0)
    proj = _perturb(Projection(24, 32, kind))
    x = torch.randn(50, 24)
    layers = projection_layers(proj)
    assert len(layers) == (1 if kind == "linear" else 2)
    with torch.no_grad():
        got, want = _apply(layers, x), proj(x)
        assert _close(got, want)
        # the skip matters: without the carried input the mlp projection is far off
        if kind == "mlp":
            assert (proj.mlp(x) - want).abs().max() > 0.1


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_predictor_layers_equal_predictor(depth, residual):
    torch.manual_seed(depth)
    pred = _perturb(Predictor(16, PredictorConfig(depth=depth, hidden_mult=1.5,
                                                  residual=residual, dropout=0.5)))
    x = torch.randn(50, 16)
    layers = predictor_layers(pred)
    assert len(layers) == depth
    with torch.no_grad():
        assert _close(_apply(layers, x), pred(x))
        if residual:  # the residual is in there
            assert (pred.mlp(x) - pred(x)).abs().max() > 0.1


def test_gelu_identity_holds_at_large_inputs():
    """GELU(x) - GELU(-x) = x, the identity the carried input rests on, in float32 too."""
    x = torch.linspace(-60, 60, 100_001)
    gelu = nn.GELU()
    assert (gelu(x) - gelu(-x) - x).abs().max() <= 1e-5


# -- level 2: the variant matrix on a small collection -------------------------------------

#: name -> (overrides, scorings exported): every variant, each scoring, linear and mlp
#: projections, residual and plain predictors of depth 1-3, query heads, both similarities
FROZEN_CASES = {
    "shared-linear-cosine": ({}, ("predictor",)),
    "asymmetric-mlp-head-d3-euclidean": (
        {"model.variant": "asymmetric", "model.projection": "mlp", "model.query_head": True,
         "model.predictor.depth": 3, "model.similarity": "euclidean"}, ("predictor", "query")),
    "bidirectional-d1-euclidean": (
        {"model.variant": "bidirectional", "model.predictor.depth": 1,
         "model.similarity": "euclidean"}, ("predictor",)),
    "shared-mlp-head-plain-predictor": (  # random-init MLPs on the query side: train more
        {"model.projection": "mlp", "model.query_head": True, "model.predictor.residual": False,
         "train.lr": 3e-3, "train.epochs": 10, "train.batch_size": 8}, ("query", "predictor")),
}
#: test nDCG@10 a case must beat (so that the rankings compared are a retriever's): the
#: residual heads start at the zero-shot model (~0.8 here); a plain MLP query side starts
#: random and 40 train queries teach it little (~0.3; a random ranking scores ~0.03)
FLOOR = {"shared-mlp-head-plain-predictor": 0.15}
DEFAULT_FLOOR = 0.5
TRAINED_BASE = "trained-base-asymmetric"
SMALL_TRAIN = {"model.max_seq_length": SMALL_MAX_LEN, "model.output_dim": 96,
               "model.predictor.hidden_mult": 1.5, "loss.lambda_pred": 1.0,
               "loss.lambda_con": 1.0, "train.batch_size": 16, "train.warmup_ratio": 0.0,
               "train.epochs": 4, "eval.score_with": "auto", "eval.batch_size": 64}
PROBE = 6  # queries and documents whose vectors are compared


def _write_beir(root: Path, data, test_qids, train_qids, extra_docs: int, seed: int) -> Path:
    """A BEIR directory of the given queries, their relevant documents and ``extra_docs``
    others drawn from ``data``'s corpus."""
    qrels = {"test": {q: data.qrels["test"][q] for q in test_qids},
             "train": {q: data.qrels["train"][q] for q in train_qids}}
    relevant = {d for split in qrels.values() for docs in split.values() for d in docs}
    others = sorted(set(data.corpus) - relevant)
    docs = sorted(relevant | set(random.Random(seed).sample(others, extra_docs)))
    root.mkdir(parents=True)
    (root / "qrels").mkdir()
    with (root / "corpus.jsonl").open("w") as f:
        for d in docs:
            title, text = data.corpus[d]
            f.write(json.dumps({"_id": d, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for q in list(test_qids) + list(train_qids):
            f.write(json.dumps({"_id": q, "text": data.queries[q]}) + "\n")
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{r}" for q, docs in rows.items()
                                                 for d, r in docs.items()]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory, scifact):
    """40 test and 50 train queries of SciFact (10 of them carved as dev), their documents
    and 60 others: 160 documents."""
    rng = random.Random(0)
    test_q = sorted(rng.sample(sorted(scifact.qrels["test"]), 40))
    train_q = sorted(rng.sample(sorted(scifact.qrels["train"]), 50))
    root = _write_beir(tmp_path_factory.mktemp("small") / "beir", scifact, test_q, train_q,
                       extra_docs=60, seed=1)
    return load_beir(root)


def _best_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """The best dev epoch's weights, as the loop keeps them (``_Selection``)."""
    _, state = latest_valid_checkpoint(out_dir)
    return state["selection"]["model"]


def _train(cfg: RunConfig, out_dir: Path, data, features):
    seed_everything(cfg.train.seed)
    result = train(cfg, out_dir=out_dir, data=data, features=features, progress=False)
    return result, _best_weights(out_dir)


@torch.no_grad()
def _jepa_vectors(cfg: RunConfig, weights, scoring: str, data, features, qids, dids):
    """The JEPA model's own query-side and document vectors of ``qids``/``dids``."""
    if cfg.model.freeze_base:
        model = JEPAModel(cfg.model, None, base_dim=features.dim)
        q_in, d_in = features.queries(qids), features.docs(dids)
    else:
        model = JEPAModel(cfg.model, load_base(cfg.model.base_model, cfg.model.max_seq_length))
        q_in = [data.queries[q] for q in qids]
        d_in = [data.doc_text(d) for d in dids]
    model.load_state_dict(weights)
    model.eval()
    q = model.encode_queries(q_in)
    return (model.predict(q) if scoring == "predictor" else q), model.encode_docs(d_in)


@pytest.fixture(scope="module")
def matrix(small, tmp_path_factory):
    """Trains every case, exports it, scores every folder in one fresh interpreter.

    Returns ``{folder name: {"project": figure, "want_q", "want_d", "got": scorer output,
    "seconds": export time}}`` plus ``"_timing"``.
    """
    tmp = tmp_path_factory.mktemp("matrix")
    t0 = time.perf_counter()
    features = load_or_compute(small, "all-MiniLM-L6-v2", SMALL_MAX_LEN, progress=False)
    test_qids = sorted(small.split("test"))[:PROBE]
    probe_docs = list(range(PROBE))
    doc_probe_ids = [small.doc_ids[i] for i in probe_docs]
    base_cfg = RunConfig().with_overrides({"data.path": str(small.root), **SMALL_TRAIN})
    sorted_test = sorted(q for q, d in small.split("test").items() if any(d.values()))
    query_probe = [sorted_test.index(q) for q in test_qids]
    cases = {name: (base_cfg.with_overrides(over), scorings)
             for name, (over, scorings) in FROZEN_CASES.items()}
    cases[TRAINED_BASE] = (base_cfg.with_overrides({  # the base runs in every step: keep it short
        "model.freeze_base": False, "model.variant": "asymmetric", "model.max_seq_length": 64,
        "train.epochs": 1, "train.max_steps_per_epoch": 2, "train.batch_size": 8,
        "train.lr_base": 1e-4}), ("predictor",))
    results, folders = {}, []
    timing = {"features_s": time.perf_counter() - t0}
    for name, (cfg, scorings) in cases.items():
        t = time.perf_counter()
        frozen = cfg.model.freeze_base
        result, weights = _train(cfg, tmp / "runs" / name, small, features if frozen else None)
        if not frozen:
            assert any(k.startswith("base_d.") for k in weights)
        for scoring in scorings:
            folder = f"{name}-{scoring}"
            t_export = time.perf_counter()
            path = export_sentence_transformer(cfg, weights, tmp / "export" / folder,
                                               scoring=scoring,
                                               card={"study": "test", "trial": name})
            seconds = time.perf_counter() - t_export
            want_q, want_d = _jepa_vectors(cfg, weights, scoring, small, features, test_qids,
                                           doc_probe_ids)
            results[folder] = {"project": result["test"][f"test_{scoring}_ndcg_at_10"],
                               "floor": FLOOR.get(name, DEFAULT_FLOOR),
                               "project_per_query": result["test_per_query"][scoring],
                               "want_q": want_q, "want_d": want_d, "seconds": seconds,
                               "cfg": cfg, "path": path, "weights": weights}
            folders.append({"name": folder, "path": str(path),
                            "doc_sample": list(range(PROBE, len(small.doc_ids), 23)),
                            "query_probe": query_probe, "doc_probe": probe_docs})
        timing[name] = time.perf_counter() - t
    t1 = time.perf_counter()
    got = score_in_fresh_process(tmp / "scorer", small, "test", folders)
    for folder, row in results.items():
        row["got"] = got[folder]
    timing.update(train_export_s=t1 - t0, fresh_process_s=time.perf_counter() - t1,
                  bases_encoded=got["_bases_encoded"],
                  **{f"fresh:{k}": v for k, v in got["_seconds"].items()})
    results["_timing"] = timing
    return results


ALL_FOLDERS = [f"{name}-{s}" for name, (_, scorings) in FROZEN_CASES.items() for s in scorings
               ] + [f"{TRAINED_BASE}-predictor"]


@pytest.mark.parametrize("folder", ALL_FOLDERS)
def test_exported_vectors_equal_the_jepa_model(matrix, folder):
    row = matrix[folder]
    got_q = torch.tensor(row["got"]["query_probe"])
    got_d = torch.tensor(row["got"]["doc_probe"])
    assert got_q.shape == row["want_q"].shape and got_d.shape == row["want_d"].shape
    assert (got_q - row["want_q"]).abs().max() <= EMB_TOL
    assert (got_d - row["want_d"]).abs().max() <= EMB_TOL
    assert row["got"]["similarity"] == row["cfg"].model.similarity
    assert row["got"]["max_seq_length"] == row["cfg"].model.max_seq_length
    # the folder's own encode_document on a sample = the vectors the search used
    assert row["got"]["same_docs"] <= EMB_TOL


@pytest.mark.parametrize("folder", ALL_FOLDERS)
def test_exported_ndcg_equals_the_project_evaluation(matrix, folder):
    row = matrix[folder]
    got, want = row["got"]["ndcg_at_10"], row["project"]
    worst = max(abs(row["got"]["per_query"][q] - v) for q, v in row["project_per_query"].items())
    assert abs(got - want) <= NDCG_TOL, (got, want, f"worst query differs by {worst}")
    assert set(row["got"]["per_query"]) == set(row["project_per_query"])
    assert row["floor"] < got <= 1.0  # a retriever's rankings, not noise


def test_scorings_differ_where_the_predictor_is_trained(matrix):
    """The predictor- and query-scored folders of one model are different models (so the
    vector checks above could tell a dropped predictor)."""
    name = "asymmetric-mlp-head-d3-euclidean"
    pred, query = matrix[f"{name}-predictor"], matrix[f"{name}-query"]
    assert (pred["want_q"] - query["want_q"]).abs().max() > 1e-2
    assert torch.equal(pred["want_d"], query["want_d"])


def test_trained_base_export_holds_two_bases(matrix):
    path = matrix[f"{TRAINED_BASE}-predictor"]["path"]
    router = json.loads((path / "router_config.json").read_text())
    query, document = router["structure"]["query"], router["structure"]["document"]
    assert query[0] != document[0] and document[0].endswith("Transformer")
    # a frozen base is one module in both routes, saved once
    frozen = json.loads((matrix["shared-linear-cosine-predictor"]["path"]
                         / "router_config.json").read_text())["structure"]
    assert frozen["query"][:2] == frozen["document"][:2]


@torch.no_grad()
def test_trained_base_weights_reach_the_vectors(matrix, small):
    """With the pretrained base instead of the trained one the document vectors move by far
    more than the tolerance: the vector check above sees a base that was not exported."""
    row = matrix[f"{TRAINED_BASE}-predictor"]
    cfg = row["cfg"]
    model = JEPAModel(cfg.model, load_base(cfg.model.base_model, cfg.model.max_seq_length))
    heads = {k: v for k, v in row["weights"].items() if not k.startswith("base_")}
    assert not model.load_state_dict(heads, strict=False).unexpected_keys
    model.eval()
    pretrained = model.encode_docs([small.doc_text(d) for d in small.doc_ids[:PROBE]])
    assert (pretrained - row["want_d"]).abs().max() > 100 * EMB_TOL


def test_model_card_and_config(matrix):
    row = matrix["asymmetric-mlp-head-d3-euclidean-predictor"]
    path, cfg = row["path"], row["cfg"]
    readme = (path / "README.md").read_text()
    assert "encode_query" in readme and "encode_document" in readme
    assert "asymmetric-mlp-head-d3-euclidean" in readme and "euclidean" in readme
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert RunConfig.from_dict(yaml.safe_load(block)) == cfg
    assert RunConfig.from_yaml(path / CONFIG_FILE) == cfg
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["scoring"] == "predictor" and marker["variant"] == "asymmetric"
    assert any("GELU" in m for m in marker["routes"]["query"])


def test_matrix_runtime(matrix):
    """Stays small enough for CI on two cores (recorded for the report)."""
    timing = matrix["_timing"]
    print("\nmatrix timing (s):", json.dumps({k: round(v, 1) for k, v in timing.items()}),
          "exports:", {k: round(v["seconds"], 1) for k, v in matrix.items() if k[0] != "_"})
    assert timing["bases_encoded"] == 2  # the frozen base once, the trained bases once
    assert timing["fresh_process_s"] < 600


# -- errors ----------------------------------------------------------------------------------

def _heads(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return JEPAModel(cfg.model, None, base_dim=384).state_dict()


def test_refuses_to_overwrite_a_folder_that_is_no_export(tmp_path):
    cfg = RunConfig()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_sentence_transformer(cfg, _heads(cfg), tmp_path / "out", scoring="query")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_rejects_bad_requests(tmp_path):
    cfg = RunConfig()
    with pytest.raises(ValueError, match="unknown scoring"):
        export_sentence_transformer(cfg, _heads(cfg), tmp_path / "a", scoring="auto")
    no_pred = cfg.with_overrides({"loss.lambda_pred": 0.0, "loss.lambda_con": 1.0})
    with pytest.raises(ValueError, match="never trained"):
        export_sentence_transformer(no_pred, _heads(no_pred), tmp_path / "b",
                                    scoring="predictor")
    trained = cfg.with_overrides({"model.freeze_base": False})
    with pytest.raises(ValueError, match="trained base is missing"):
        export_sentence_transformer(trained, _heads(cfg), tmp_path / "c", scoring="query")
    head = cfg.with_overrides({"model.query_head": True})
    with pytest.raises(ValueError, match="does not fit"):  # query_head.* missing
        export_sentence_transformer(head, _heads(cfg), tmp_path / "d", scoring="query")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_reexport_replaces_an_earlier_export(tmp_path):
    cfg = RunConfig().with_overrides({"model.output_dim": 32})
    first = export_sentence_transformer(cfg, _heads(cfg), tmp_path / "m", scoring="query")
    (first / "stale.txt").write_text("from the first export")
    again = export_sentence_transformer(cfg, _heads(cfg), tmp_path / "m", scoring="predictor")
    assert again == first and not (again / "stale.txt").exists()
    assert json.loads((again / MARKER_FILE).read_text())["scoring"] == "predictor"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left


# -- level 3: the whole of SciFact -----------------------------------------------------------

@pytest.mark.slow
def test_full_scifact_predictor_export(tmp_path, scifact_dir, scifact, scifact_features):
    """One representative model: frozen base, shared, predictor-scored, the default shape,
    trained two epochs; its folder in a fresh interpreter scores the same SciFact test
    nDCG@10 as the project's evaluation of the same weights (corpus of 5,183 documents)."""
    cfg = RunConfig().with_overrides({
        "data.path": str(scifact_dir), "train.epochs": 2, "loss.lambda_pred": 1.0,
        "loss.lambda_con": 1.0, "eval.score_with": "predictor"})
    result, weights = _train(cfg, tmp_path / "run", scifact, scifact_features)
    path = export_sentence_transformer(cfg, weights, tmp_path / "export", scoring="predictor",
                                       card={"study": "scifact", "trial": "slow",
                                             "dev": {"ndcg_at_10": result["best_dev_ndcg_at_10"]},
                                             "test": result["test"], "scoring": "predictor"})
    qids = sorted(scifact.split("test"))[:PROBE]
    want_q, want_d = _jepa_vectors(cfg, weights, "predictor", scifact, scifact_features, qids,
                                   scifact.doc_ids[:PROBE])
    sorted_test = sorted(q for q, d in scifact.split("test").items() if any(d.values()))
    got = score_in_fresh_process(tmp_path / "scorer", scifact, "test", [{
        "name": "full", "path": str(path), "query_probe": [sorted_test.index(q) for q in qids],
        "doc_probe": list(range(PROBE))}], full_corpus=True)["full"]
    want = result["test"]["test_predictor_ndcg_at_10"]
    assert abs(got["ndcg_at_10"] - want) <= NDCG_TOL, (got["ndcg_at_10"], want)
    assert (torch.tensor(got["query_probe"]) - want_q).abs().max() <= EMB_TOL
    assert (torch.tensor(got["doc_probe"]) - want_d).abs().max() <= EMB_TOL
    assert got["ndcg_at_10"] > 0.5
