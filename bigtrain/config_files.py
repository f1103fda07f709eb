"""Config files and command-line words -> one plain tree, before any validation.

A file may start from another with a top-level ``base: OTHER.yaml`` (relative to the
file that names it); files given together merge in order, later ones winning
(nested sections key by key); ``a.b.c=value`` overrides apply last, wherever they
stand. :func:`bigtrain.config.load_config` validates the result against the schema.

Files are read strictly, because a config that silently means something other than
what it says costs a run: the text must be UTF-8, and a key written twice in one
mapping is an error (YAML 1.2 forbids it; PyYAML would keep the last one without a
word, so a pasted ``lr:`` below an old one would win unnoticed).
"""
from __future__ import annotations

import copy

from pathlib import Path
from typing import Any

import yaml

from bigtrain.errors import ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml")


def split_args(args: list[str] | tuple[str, ...], require_file: bool = True) -> tuple[list[str], list[str]]:
    """Command-line words -> (config files, overrides), each in the order given.

    A word with ``=`` is an override (overrides apply after every file, wherever they
    stand); a word ending in .yaml or .yml is a config file; anything else is an error.
    """
    files, overrides = [], []
    for word in args:
        if "=" in word:
            overrides.append(word)
        elif word.endswith(CONFIG_SUFFIXES):
            files.append(word)
        else:
            raise ConfigError(f"argument {word!r} is neither a config file (.yaml, .yml) nor key=value")
    if require_file and not files:
        raise ConfigError("no config file given: expected CONFIG.yaml [MORE.yaml ...] [key=value ...]")
    return files, overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping.

    Keys brought in by a ``<<: *anchor`` merge may still be overridden by keys written
    next to it (that is what a merge is for); only keys written out are compared.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class says why
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)



def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} {'is not a file' if p.exists() else 'not found'}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                          f"at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def _read_layered(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A file's tree merged over its ``base:`` chain (base first, this file wins)."""
    here = Path(path).resolve()
    if here in chain:
        cycle = " -> ".join(p.name for p in (*chain, here))
        raise ConfigError(f"config file {str(path)!r}: its base chain is a cycle ({cycle})")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.endswith(CONFIG_SUFFIXES):
        raise ConfigError(f"config file {str(path)!r}: base {base!r} is not a path to a .yaml or .yml file")
    base_path = Path(path).parent / base
    if not base_path.is_file():
        raise ConfigError(f"config file {str(path)!r}: base {base!r} not found (looked for {str(base_path)!r})")
    return _merge(_read_layered(base_path, (*chain, here)), tree)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_tree(paths: list | tuple = (), overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> dict:
    """The files in order (each over its ``base:`` chain), then the overrides: one plain tree,
    over ``base`` when given (e.g. another run's resolved config, for ``bigtrain anneal``)."""
    tree: dict = copy.deepcopy(base or {})
    for p in paths:
        tree = _merge(tree, _read_layered(p))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree
