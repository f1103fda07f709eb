"""The tests' text corpus: English prose from the Python standard library's docstrings.

The tests need real language, not random tokens: the spike guard must tell injected random
tokens from normal batches, a run that skipped data must end within 2% of a clean run's
validation loss, and two processes must follow one process's losses to 1e-4 for 50 steps.
Such tight checks need a tame corpus, one on which the tiny test models learn smoothly at a
high learning rate. Whole docstrings are not: code samples, tables and rare symbols give
gradient-norm spikes of 5-10x in the first 50 steps that the guard rightly rolls back. So
only prose paragraphs are kept: unindented, of letters, digits, spaces and common
punctuation (a character-level vocabulary of ~75, like tiny Shakespeare's 65).

The docstrings come from the same files as ``bigtrain prepare --source stdlib`` (sorted
path order), so nothing is downloaded or shipped. On one Python version the text is the
same on every machine; it is cached in BIGTRAIN_CACHE (keyed by the Python and this file),
since parsing the whole standard library takes seconds.
"""
from __future__ import annotations

import ast
import hashlib
import os
import string
import sys
import sysconfig
from pathlib import Path

from bigtrain.data.sources import open_source

DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
PROSE_CHARS = set(string.ascii_letters + string.digits + " \n.,;:'\"()-!?")


def docstrings(text: str) -> list[str]:
    """Every docstring of one module, in ``ast.walk`` order; [] when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a stdlib file written for another Python version
        return []
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, DOCSTRING_OWNERS))
    return [doc for doc in found if doc]


def is_prose(paragraph: str) -> bool:
    """At least a line's worth of unindented text made only of PROSE_CHARS."""
    return (len(paragraph) >= 40 and set(paragraph) <= PROSE_CHARS
            and not any(line[:1].isspace() for line in paragraph.splitlines()))


def stdlib_prose(max_chars: int = 1_000_000) -> str:
    """Prose paragraphs of the standard library's docstrings, blank-line separated, up to about
    ``max_chars`` (all of them where there is less: ~0.7 MB on CPython 3.11)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    recipe = f"{sys.version}|{stdlib}|{max_chars}|".encode() + Path(__file__).read_bytes()  # this code too
    key = hashlib.sha256(recipe).hexdigest()[:16]
    cache = Path(os.environ.get("BIGTRAIN_CACHE", Path.home() / ".cache" / "bigtrain")) / f"prose-{key}.txt"
    if cache.is_file():
        return cache.read_text()
    parts, size = [], 0
    for module in open_source("stdlib").texts():
        for doc in docstrings(module):
            for paragraph in filter(is_prose, (p.strip() for p in doc.split("\n\n"))):
                parts.append(paragraph)
                size += len(paragraph) + 2
            if size >= max_chars:
                break
        if size >= max_chars:
            break
    text = "\n\n".join(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".tmp").write_text(text)
    cache.with_suffix(".tmp").replace(cache)
    return text
