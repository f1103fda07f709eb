"""Shared fixtures: small prepared corpora and tiny configs that train in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_bytes(tmp_path_factory) -> str:
    """tiny Shakespeare, byte tokenizer (vocab 257), with a val split."""
    from bigtrain.data.prepare import prepare
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(str(SHAKESPEARE), "bytes", str(out), val_fraction=0.05)
    return str(out)


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory) -> str:
    """tiny Shakespeare, char tokenizer (vocab ~66): the nanoGPT CPU recipe's data."""
    from bigtrain.data.prepare import prepare
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    text = tmp_path_factory.mktemp("src") / "shakespeare.txt"
    # several documents so the val split is a real held-out tail
    body = SHAKESPEARE.read_text()
    text.write_text(body)
    prepare(str(text), "char", str(out), val_fraction=0.0)
    return str(out)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


os.environ.setdefault("BIGTRAIN_CACHE", str(Path(__file__).resolve().parent / ".cache"))
