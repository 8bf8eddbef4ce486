"""Shared fixtures: the real SciFact copy and its cached base features.

The first session on a machine pays ~2 minutes to encode SciFact with the packaged MiniLM;
the features are cached on disk (``$JEPA_STUDY_CACHE`` or ``~/.cache/jepa-study``) and
every later test and run reads them back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.fail(f"SciFact not found at {SCIFACT.resolve()}: the project expects "
                    "../shared/data/scifact beside the checkout")
    return SCIFACT.resolve()


@pytest.fixture(scope="session")
def scifact(scifact_dir):
    from trainables.data import load_beir

    return load_beir(scifact_dir)


@pytest.fixture(scope="session")
def scifact_features(scifact):
    from trainables.cache import load_or_compute

    return load_or_compute(scifact, "all-MiniLM-L6-v2", 256, progress=False)


def pytest_collection_modifyitems(items):
    """Browser tests run last: pytest-playwright's Playwright, once started, lives to the end
    of the session with its asyncio loop marked running in the main thread (``asyncio.run``
    would refuse to run there)."""
    items.sort(key=lambda item: "page" in getattr(item, "fixturenames", ()))
