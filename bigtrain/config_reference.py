"""The README's config reference, generated from the schema in :mod:`bigtrain.config`.

Every key's default and description live in the schema only; this renders them as the
Markdown table between the README's ``config-reference`` markers, and a test keeps the
README equal to it (regenerate: ``python -c 'from bigtrain.config_reference import
reference_markdown as r; print(r())'``).
"""
from __future__ import annotations

import json

from pydantic import BaseModel

from bigtrain.config import Config


def reference_markdown() -> str:
    """The README's config reference, generated from this schema (a test keeps them equal)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = prefix + (info.alias or name)
            ann = info.annotation
            sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type)
                        and issubclass(c, BaseModel)), None)
            if sub is not None and name != "rampup":
                walk(sub, key + ".")
                continue
            default = "required" if info.is_required() else json.dumps(info.default)
            meaning = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{default}` | {meaning} |")
            items = [a for c in getattr(ann, "__args__", ()) for a in getattr(c, "__args__", ())]
            item = next((c for c in items if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if item is not None:  # a list of sections (data.sources): the keys of each entry
                walk(item, key + "[].")

    walk(Config, "")
    return "\n".join(lines)
