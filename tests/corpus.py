"""The tests' text corpus, built from the Python standard library's docstrings.

The tests need real language, not random tokens: the spike guard must tell injected random
tokens from normal batches, and a run that skipped data must end within 2% of a clean
run's validation loss. English prose with some code in it has those statistics. The
docstrings come from the same files as ``bigtrain prepare --source stdlib`` (sorted path
order), so nothing is downloaded or shipped: on one Python version the text is the same
on every machine. Non-ASCII characters are dropped, which keeps a character-level
vocabulary near 100 (96 on CPython 3.11).
"""
from __future__ import annotations

import ast
import tempfile

from bigtrain.data.prepare import open_source

DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings(text: str) -> list[str]:
    """Every docstring of one module, in ``ast.walk`` order; [] when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a stdlib file written for another Python version
        return []
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, DOCSTRING_OWNERS))
    return [doc for doc in found if doc]


def stdlib_docs(max_chars: int = 1_000_000) -> str:
    """About ``max_chars`` of ASCII text: whole docstrings, blank-line separated, until the budget is met."""
    parts, size = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for module in open_source("stdlib", scratch).texts():
            for doc in docstrings(module):
                doc = doc.encode("ascii", "ignore").decode("ascii")
                parts.append(doc)
                size += len(doc) + 2
                if size >= max_chars:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)
