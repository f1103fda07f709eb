"""Shared fixtures: small prepared corpora and tiny configs that train in seconds.

Every corpus is built here from what the repository and the Python installation hold
(tests/corpus.py), once per session, so a plain clone runs the whole suite.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from corpus import stdlib_prose

os.environ.setdefault("BIGTRAIN_CACHE", str(Path(__file__).resolve().parent / ".cache"))

# Under CI (CI=true, as .ci/run sets it) a skipped test fails the run: every test must run on a
# plain clone, so a test that quietly needs something from outside the repository shows up.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if STRICT and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if STRICT and _skipped:
        terminalreporter.write_line(f"CI=true: {len(_skipped)} skipped test(s) fail the run "
                                    f"(first: {_skipped[0]})", red=True)


@pytest.fixture(scope="session")
def docs_text() -> str:
    """~0.7 MB of English prose: paragraphs of the standard library's docstrings (tests/corpus.py)."""
    return stdlib_prose()


@pytest.fixture(scope="session")
def docs_file(docs_text, tmp_path_factory) -> str:
    """``docs_text`` as one text file: a single document, so no val split is carved out by document."""
    path = tmp_path_factory.mktemp("src") / "docs.txt"
    path.write_text(docs_text)
    return str(path)


@pytest.fixture(scope="session")
def prose_bytes(docs_file, tmp_path_factory) -> str:
    """The docstring corpus, byte tokenizer (vocab 257); one document, so no val split of its own."""
    from bigtrain.data.prepare import prepare
    out = tmp_path_factory.mktemp("data") / "docs_bytes"
    prepare(docs_file, "bytes", str(out), val_fraction=0.0)
    return str(out)


@pytest.fixture(scope="session")
def prose_char(docs_file, tmp_path_factory) -> str:
    """The docstring corpus, char tokenizer (vocab ~76): the nanoGPT CPU recipe's kind of data."""
    from bigtrain.data.prepare import prepare
    out = tmp_path_factory.mktemp("data") / "docs_char"
    prepare(docs_file, "char", str(out), val_fraction=0.0)
    return str(out)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
