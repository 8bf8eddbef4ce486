"""Tests of the BEIR reader, dev-split carving, data resolution and the download."""

from __future__ import annotations

import http.server
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainables import data as data_mod
from trainables.data import (BeirData, DataError, download_beir, load_beir, make_splits,
                             resolve_data_dir)

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"

HEADER = "query-id\tcorpus-id\tscore\n"


def write_beir(root: Path, *, corpus: str | None = None, queries: str | None = None,
               qrels: dict[str, str] | None = None) -> Path:
    """A tiny BEIR directory; each argument replaces the default file text."""
    root.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = "".join(json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"}) + "\n"
                         for i in range(6))
    if queries is None:
        queries = "".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                          for i in range(10))
    if qrels is None:
        qrels = {"train": HEADER + "".join(f"q{i}\td{i % 6}\t1\n" for i in range(8)),
                 "test": HEADER + "q8\td1\t1\nq9\td2\t2\n"}
    (root / "corpus.jsonl").write_text(corpus)
    (root / "queries.jsonl").write_text(queries)
    (root / "qrels").mkdir(exist_ok=True)
    for name, text in qrels.items():
        (root / "qrels" / f"{name}.tsv").write_text(text)
    return root


# -- loading -------------------------------------------------------------------------------

def test_load_tiny_dataset(tmp_path: Path) -> None:
    corpus = ('{"_id": 7, "text": "no title"}\n\n'
              '{"_id": "a", "title": "Head", "text": "body"}\n')
    queries = '{"_id": 1, "text": "q one"}\n'
    root = write_beir(tmp_path / "d", corpus=corpus, queries=queries,
                      qrels={"test": HEADER + "\n1\t7\t1\n1\ta\t0\n"})
    d = load_beir(root)
    assert d.root == root.resolve()
    assert d.corpus == {"7": ("", "no title"), "a": ("Head", "body")}
    assert d.queries == {"1": "q one"}
    assert d.qrels == {"test": {"1": {"7": 1, "a": 0}}}
    assert d.doc_ids == ["7", "a"]
    assert d.doc_ids is d.doc_ids
    assert d.doc_text("7") == "no title"
    assert d.doc_text("a") == "Head body"
    assert d.split("test") == {"1": {"7": 1, "a": 0}}


def test_load_only_requested_splits(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "d")
    assert set(load_beir(root).qrels) == {"train", "test"}
    assert set(load_beir(root, splits=["test"]).qrels) == {"test"}
    with pytest.raises(DataError, match=r"'dev'.*dev\.tsv.*test\.tsv.*train\.tsv"):
        load_beir(root, splits=["dev"])


def test_split_missing_names_split_and_files(tmp_path: Path) -> None:
    d = load_beir(write_beir(tmp_path / "d"))
    with pytest.raises(DataError, match=r"'dev'.*test\.tsv.*train\.tsv"):
        d.split("dev")


def test_fingerprint_stable_across_copies_and_content_sensitive(tmp_path: Path) -> None:
    a = load_beir(write_beir(tmp_path / "a"))
    b = load_beir(write_beir(tmp_path / "b", qrels={"test": HEADER + "q9\td2\t1\n"}))
    assert a.fingerprint() == b.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", a.fingerprint()), a.fingerprint()  # SHA-256's first 16
    c = load_beir(write_beir(tmp_path / "c",
                             queries='{"_id": "q8", "text": "x"}\n{"_id": "q9", "text": "y"}\n',
                             qrels={"test": HEADER + "q9\td2\t1\n"}))
    assert c.fingerprint() != a.fingerprint()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_beir(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    root = write_beir(tmp_path / "d")
    (root / name).unlink()
    with pytest.raises(DataError, match=str(root / name)):
        load_beir(root)


BAD_JSON = [
    ("corpus.jsonl", '{"_id": "d0", "text": "x"}\n\n{"_id": "d1", "text": \n', 3, "malformed"),
    ("corpus.jsonl", '{"_id": "d0", "text": "x"}\n["d1", "x"]\n', 2, "JSON object"),
    ("corpus.jsonl", '{"_id": "d0", "text": "x"}\n{"text": "x"}\n', 2, "_id"),
    ("corpus.jsonl", '{"_id": "d0", "text": "x"}\n{"_id": "d1", "title": "t"}\n', 2, "text"),
    ("corpus.jsonl", '{"_id": "d0", "text": "x"}\n{"_id": "d0", "text": "y"}\n', 2, "duplicate"),
    ("queries.jsonl", '{"_id": "0", "text": "x"}\n{"_id": 0, "text": "y"}\n', 2, "duplicate"),
    ("queries.jsonl", '\n\n{"_id": "q0"}\n', 3, "text"),
    ("queries.jsonl", 'not json\n', 1, "malformed"),
]


@pytest.mark.parametrize(("name", "text", "line", "what"), BAD_JSON)
def test_bad_json_line_names_file_and_line(tmp_path: Path, name: str, text: str, line: int,
                                           what: str) -> None:
    root = write_beir(tmp_path / "d", qrels={}, **{name.split(".")[0]: text})
    with pytest.raises(DataError) as err:
        load_beir(root)
    msg = str(err.value)
    assert str(root / name) in msg and f"line {line}" in msg and what in msg


def test_empty_corpus(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "d", corpus="\n\n", qrels={})
    with pytest.raises(DataError, match=r"corpus\.jsonl.*empty corpus"):
        load_beir(root)


BAD_QRELS = [
    ("q0\td0\n", "3 tab-separated columns"),
    ("q0\td0\t1\textra\n", "3 tab-separated columns"),
    ("q0 d0 1\n", "3 tab-separated columns"),
    ("q0\td0\thigh\n", "'high' is not an integer"),
    ("q0\td0\t1.5\n", "not an integer"),
    ("qX\td0\t1\n", "unknown query id 'qX'"),
    ("q0\tdX\t1\n", "unknown document id 'dX'"),
    ("q0\td0\t1\n", "conflicting score"),
]


@pytest.mark.parametrize(("bad", "what"), BAD_QRELS)
def test_bad_qrels_line_names_file_and_line(tmp_path: Path, bad: str, what: str) -> None:
    # line 1 header, line 2 good, line 3 blank, line 4 the bad one
    text = HEADER + "q0\td0\t1\n\n" + (bad if what != "conflicting score" else "q0\td0\t2\n")
    root = write_beir(tmp_path / "d", qrels={"train": text})
    with pytest.raises(DataError) as err:
        load_beir(root)
    msg = str(err.value)
    assert str(root / "qrels" / "train.tsv") in msg and "line 4" in msg and what in msg


# -- the real SciFact copy -----------------------------------------------------------------

@pytest.fixture(scope="module")
def scifact() -> BeirData:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.fail(f"SciFact not found at {SCIFACT.resolve()}")
    return load_beir(SCIFACT)


def test_scifact_counts(scifact: BeirData) -> None:
    assert len(scifact.corpus) == 5183
    assert len(scifact.queries) == 1109
    assert set(scifact.qrels) == {"train", "test"}
    train, test = scifact.split("train"), scifact.split("test")
    assert (len(train), sum(map(len, train.values()))) == (809, 919)
    assert (len(test), sum(map(len, test.values()))) == (300, 339)
    assert scifact.doc_ids[0] == "4983"
    assert scifact.doc_text("4983").startswith("Microstructural development")


def test_scifact_splits(scifact: BeirData) -> None:
    s = make_splits(scifact)
    assert len(s["dev"]) == round(809 * 0.2)
    assert len(s["train"]) + len(s["dev"]) == 809
    assert s["test"] == scifact.split("test")


# -- splits --------------------------------------------------------------------------------

def _many(tmp_path: Path, n: int = 50, with_dev: bool = False) -> BeirData:
    queries = "".join(json.dumps({"_id": f"q{i}", "text": "t"}) + "\n" for i in range(n + 5))
    qrels = {"train": HEADER + "".join(f"q{i}\td{i % 6}\t1\n" for i in range(n))
             + "q49\td5\t0\n",
             "test": HEADER + "".join(f"q{n + i}\td{i}\t1\n" for i in range(5))}
    if with_dev:
        qrels["dev"] = HEADER + f"q{n}\td0\t1\n"
    return load_beir(write_beir(tmp_path / "many", queries=queries, qrels=qrels))


def test_carving_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    d = _many(tmp_path)
    s = make_splits(d, dev_fraction=0.2, seed=3)
    assert list(s) == ["train", "dev", "test"]
    assert len(s["dev"]) == 10 and len(s["train"]) == 40
    assert not set(s["dev"]) & set(s["train"])
    assert set(s["dev"]) | set(s["train"]) == set(d.split("train"))
    assert s["test"] == d.split("test")
    assert make_splits(d, dev_fraction=0.2, seed=3) == s
    assert set(make_splits(d, dev_fraction=0.2, seed=4)["dev"]) != set(s["dev"])
    # order-independent: the same qrels in another dict order give the same dev queries
    shuffled = BeirData(d.root, d.corpus, d.queries,
                        {"train": dict(reversed(list(d.split("train").items()))),
                         "test": d.split("test")})
    assert set(make_splits(shuffled, dev_fraction=0.2, seed=3)["dev"]) == set(s["dev"])
    # returned dicts are copies
    next(iter(s["train"].values()))["d0"] = 99
    assert 99 not in {r for docs in d.split("train").values() for r in docs.values()}


def test_only_queries_with_a_relevant_doc_are_kept(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "d", qrels={
        "train": HEADER + "".join(f"q{i}\td0\t1\n" for i in range(5)) + "q5\td1\t0\n",
        "test": HEADER + "q8\td1\t1\nq9\td2\t0\n"})
    s = make_splits(load_beir(root), dev_fraction=0.4)
    assert "q5" not in s["train"] and "q5" not in s["dev"]
    assert len(s["train"]) + len(s["dev"]) == 5 and len(s["dev"]) == 2
    assert s["test"] == {"q8": {"d1": 1}}


def test_existing_dev_split_is_used(tmp_path: Path) -> None:
    d = _many(tmp_path, with_dev=True)
    s = make_splits(d, dev_fraction=0.5)
    assert s["dev"] == {"q50": {"d0": 1}}
    assert s["train"] == d.split("train")


def test_custom_split_names(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "d", qrels={
        "tr": HEADER + "".join(f"q{i}\td0\t1\n" for i in range(5)),
        "val": HEADER + "q5\td0\t1\n", "te": HEADER + "q6\td0\t1\n"})
    s = make_splits(load_beir(root), train="tr", dev="val", test="te")
    assert (set(s["train"]), set(s["dev"]), set(s["test"])) == ({f"q{i}" for i in range(5)},
                                                               {"q5"}, {"q6"})


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_train_or_test(tmp_path: Path, missing: str) -> None:
    qrels = {"train": HEADER + "q0\td0\t1\nq1\td0\t1\n", "test": HEADER + "q2\td0\t1\n",
             "other": HEADER}
    del qrels[missing]
    d = load_beir(write_beir(tmp_path / "d", qrels=qrels))
    with pytest.raises(DataError, match=rf"{missing} split '{missing}'.*available.*other"):
        make_splits(d)


@pytest.mark.parametrize("empty", ["train", "test", "dev"])
def test_empty_split(tmp_path: Path, empty: str) -> None:
    qrels = {"train": HEADER + "".join(f"q{i}\td0\t1\n" for i in range(5)),
             "test": HEADER + "q8\td0\t1\n", "dev": HEADER + "q9\td0\t1\n"}
    qrels[empty] = HEADER + "q7\td0\t0\n"
    root = write_beir(tmp_path / "d", qrels=qrels)
    with pytest.raises(DataError, match=rf"{empty}\.tsv.*no judged pairs"):
        make_splits(load_beir(root))


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.2), (3, 0.9), (1, 0.5)])
def test_carving_that_empties_dev_or_train(tmp_path: Path, n: int, fraction: float) -> None:
    root = write_beir(tmp_path / "d", qrels={
        "train": HEADER + "".join(f"q{i}\td0\t1\n" for i in range(n)),
        "test": HEADER + "q8\td0\t1\n"})
    with pytest.raises(DataError, match=r"train\.tsv.*would leave (dev|train) empty"):
        make_splits(load_beir(root), dev_fraction=fraction)


# -- resolving -----------------------------------------------------------------------------

@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No env vars, no shared copy beside the repo or cwd, an empty cache in tmp_path."""
    monkeypatch.delenv("JEPA_STUDY_DATA", raising=False)
    monkeypatch.setenv("JEPA_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "_REPO_ROOT", tmp_path / "nowhere" / "repo")
    work = tmp_path / "work" / "repo"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def test_resolve_explicit_first(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_beir(isolated / "a")
    monkeypatch.setenv("JEPA_STUDY_DATA", str(write_beir(isolated / "b")))
    assert resolve_data_dir(a) == a.resolve()
    with pytest.raises(DataError, match=str(isolated / "missing")):
        resolve_data_dir(isolated / "missing")


def test_resolve_env_before_shared(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_beir(isolated / "work" / "shared" / "data" / "scifact")
    b = write_beir(isolated / "b")
    monkeypatch.setenv("JEPA_STUDY_DATA", str(b))
    assert resolve_data_dir() == b.resolve()
    monkeypatch.setenv("JEPA_STUDY_DATA", str(isolated / "gone"))
    with pytest.raises(DataError, match=r"gone.*JEPA_STUDY_DATA"):
        resolve_data_dir()


def test_resolve_shared_beside_repo(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "_REPO_ROOT", Path(__file__).resolve().parents[1])
    write_beir(isolated / "cache" / "datasets" / "scifact")
    assert resolve_data_dir(download=False) == SCIFACT.resolve()


def test_resolve_shared_beside_cwd(isolated: Path) -> None:
    shared = write_beir(isolated / "work" / "shared" / "data" / "scifact")
    write_beir(isolated / "cache" / "datasets" / "scifact")
    assert resolve_data_dir(download=False) == shared.resolve()


def test_resolve_cache_then_nothing(isolated: Path) -> None:
    cached = isolated / "cache" / "datasets" / "scifact"
    write_beir(cached, qrels={})  # incomplete: no qrels
    with pytest.raises(DataError, match=r"--data DIR.*JEPA_STUDY_DATA"):
        resolve_data_dir(download=False)
    write_beir(cached)
    assert resolve_data_dir(download=False) == cached.resolve()


# -- downloading ---------------------------------------------------------------------------

def _zip_of(root: Path, prefix: str = "scifact") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f"{prefix}/{f.relative_to(root)}")
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A real HTTP server on 127.0.0.1; put bytes into the dict to serve them at /name."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _assert_clean_failure(parent: Path, dest: Path) -> None:
    assert not dest.exists()
    assert sorted(p.name for p in parent.iterdir()) == []


def test_download_success(tmp_path: Path, server: tuple[str, dict[str, bytes]]) -> None:
    url, files = server
    files["scifact.zip"] = _zip_of(write_beir(tmp_path / "src"))
    parent = tmp_path / "cache" / "datasets"
    dest = parent / "scifact"
    assert download_beir(f"{url}/scifact.zip", dest) == dest.resolve()
    d = load_beir(dest)
    assert len(d.corpus) == 6 and set(d.qrels) == {"train", "test"}
    assert sorted(p.name for p in parent.iterdir()) == ["scifact"]


def test_download_404(tmp_path: Path, server: tuple[str, dict[str, bytes]]) -> None:
    url, _ = server
    dest = tmp_path / "dl" / "scifact"
    with pytest.raises(DataError, match=r"/missing\.zip.*404.*pass --data DIR or set "
                                        r"JEPA_STUDY_DATA"):
        download_beir(f"{url}/missing.zip", dest)
    _assert_clean_failure(dest.parent, dest)


def test_download_truncated_zip(tmp_path: Path, server: tuple[str, dict[str, bytes]]) -> None:
    url, files = server
    whole = _zip_of(write_beir(tmp_path / "src"))
    files["cut.zip"] = whole[: len(whole) // 2]
    dest = tmp_path / "dl" / "scifact"
    with pytest.raises(DataError, match=r"cut\.zip.*pass --data DIR"):
        download_beir(f"{url}/cut.zip", dest)
    _assert_clean_failure(dest.parent, dest)


def test_download_zip_without_dataset(tmp_path: Path,
                                      server: tuple[str, dict[str, bytes]]) -> None:
    url, files = server
    src = write_beir(tmp_path / "src", qrels={"test": HEADER + "qX\td0\t1\n"})
    files["bad.zip"] = _zip_of(src)
    dest = tmp_path / "dl" / "scifact"
    with pytest.raises(DataError, match=r"bad\.zip.*unknown query id 'qX'"):
        download_beir(f"{url}/bad.zip", dest)
    _assert_clean_failure(dest.parent, dest)


def test_resolve_downloads_into_cache(isolated: Path, monkeypatch: pytest.MonkeyPatch,
                                      server: tuple[str, dict[str, bytes]]) -> None:
    url, files = server
    files["scifact.zip"] = _zip_of(write_beir(isolated / "src"))
    monkeypatch.setattr(data_mod, "SCIFACT_URL", f"{url}/scifact.zip")
    got = resolve_data_dir()
    assert got == (isolated / "cache" / "datasets" / "scifact").resolve()
    assert len(load_beir(got).queries) == 10
    files.clear()  # a second call must use the cached copy, not the (now empty) server
    assert resolve_data_dir() == got
