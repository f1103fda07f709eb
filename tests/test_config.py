"""Config: layering, overrides, presets, and one-line errors for bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from bigtrain.cli import main
from bigtrain.config import ConfigError, config_from_args, load_config
from bigtrain.launch import Topology, build
from bigtrain.model.gpt import GPT
from bigtrain.optim import base_lr, lr_at, param_groups
from bigtrain.parallel.backend import LocalBackend
from bigtrain.parallel.env import DistEnv
from helpers import REPO, bigtrain, tiny_overrides


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_layering_and_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "model: {n_layer: 3, d_model: 64}\noptim: {lr: 1.0e-3}\n")
    b = write(tmp_path, "b.yaml", "model: {n_layer: 5}\n")
    cfg = load_config(a, b, overrides=["optim.lr=2e-3", "batch.rampup={start: 8, increment: 8, samples: 64}"])
    assert cfg.model.n_layer == 5 and cfg.model.d_model == 64          # later file wins, merge is deep
    assert cfg.optim.lr == 2e-3                                          # override wins over files
    assert cfg.batch.rampup.increment == 8                               # YAML values in overrides


def test_base_chains_resolve_relative_to_each_file_and_the_command_line_layers_on_top(tmp_path):
    (tmp_path / "recipes").mkdir()
    write(tmp_path, "root.yaml", "seed: 1\nmodel: {n_layer: 3, d_model: 64}\noptim: {lr: 1.0e-3, eps: 1.0e-6}\n")
    write(tmp_path, "recipes/mid.yaml", "base: ../root.yaml\nseed: 2\nmodel: {n_layer: 5}\n")
    leaf = write(tmp_path, "recipes/leaf.yaml", "base: mid.yaml\nseed: 3\noptim: {lr: 2.0e-3}\n")
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.model.n_layer, cfg.model.d_model) == (3, 5, 64)   # each file wins over its base
    assert (cfg.optim.lr, cfg.optim.eps) == (2e-3, 1e-6)                      # the merge is deep
    top = write(tmp_path, "top.yaml", "seed: 4\nmodel: {d_model: 128}\n")
    cfg = config_from_args([leaf, "optim.lr=5e-3", top, "seed=9"])
    assert (cfg.seed, cfg.model.n_layer, cfg.model.d_model, cfg.optim.lr) == (9, 5, 128, 5e-3)
    assert config_from_args([top, leaf]).seed == 3                           # later files win


@pytest.mark.parametrize("files, needle", [
    ({"a.yaml": "base: a.yaml\n"}, "its base chain is a cycle (a.yaml -> a.yaml)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\nseed: 1\n"}, "cycle (a.yaml -> b.yaml -> a.yaml)"),
    ({"a.yaml": "base: gone.yaml\n"}, "base 'gone.yaml' not found"),
    ({"a.yaml": "base: [b.yaml]\n"}, "is not a path to a .yaml or .yml file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "model: {n_layr: 2}\n"}, "model.n_layr: unknown key"),
])
def test_bad_base_chains_are_one_line_errors(tmp_path, files, needle):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", [["train"], ["preflight"], ["launch", "--nproc-per-node", "1"]])
@pytest.mark.parametrize("word, needle", [
    ("config", "argument 'config' is neither a config file (.yaml, .yml) nor key=value"),
    ("configs/nope.yaml", "config file 'configs/nope.yaml' not found"),
    ("model.n_layr=2", "no config file given"),
])
def test_cli_words_that_are_neither_file_nor_override_exit_2_with_one_line(command, word, needle, capsys):
    assert main([*command, word]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_launch_passes_every_file_and_override_through_in_order(tmp_path):
    delta = write(tmp_path, "delta.yaml", "parallel: {zero_stage: 3}\n")
    overrides = [f"data.path={tmp_path}", f"run_dir={tmp_path / 'run'}", "batch.micro_size=2"]
    plan = build(["configs/gpt2-124m.yaml", "configs/gpt2-124m-zero2.yaml", delta], overrides, Topology(2))
    assert plan.command[-len(overrides) - 4:] == ["train", "configs/gpt2-124m.yaml", "configs/gpt2-124m-zero2.yaml",
                                                  delta, *overrides]
    assert Path(plan.command[0]).name == "deepspeed"   # the launcher follows the layered backend


def test_train_saves_the_merged_config_in_the_run_dir(prose_bytes, tmp_path):
    delta = write(tmp_path, "delta.yaml", f"base: {REPO / 'configs' / 'smoke.yaml'}\noptim: {{weight_decay: 0.05}}\n")
    run = tmp_path / "run"
    args = [delta, write(tmp_path, "top.yaml", "optim: {eps: 1.0e-7}\n"),
            *tiny_overrides(prose_bytes, run, schedule__max_steps=1, eval__batches=0)]
    assert main(["train", *args]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == config_from_args(args).to_dict() and "base" not in saved
    # smoke.yaml's, the delta's, the second file's and an override's
    assert (saved["schedule"]["scaling"], saved["optim"]["weight_decay"], saved["optim"]["eps"],
            saved["model"]["n_layer"]) == ("sqrt", 0.05, 1e-7, 2)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", sorted(json.loads((REPO / "tests/data/configs-e06272a.json").read_text())))
def test_shipped_configs_resolve_to_what_they_did_before_they_shrank_to_deltas(name, monkeypatch, tmp_path):
    """tests/data/configs-e06272a.json: every shipped config resolved at commit e06272a, when
    each was a full file. Keys added to the schema since then are not compared, nor
    stability.window and stability.warmup, whose meaning changed with the detector; a config
    that left parallel.compile to its default then (false) has the new default (auto)."""
    before = json.loads((REPO / "tests/data/configs-e06272a.json").read_text())[name]
    key = "parallel.activation_checkpointing"  # was a bool; true/false still mean full/none
    if key in before:
        before[key] = {True: "full", False: "none"}[before[key]]
    key = "parallel.compile"  # default false then, auto since issue 15: on under CUDA and for long CPU runs of 10M+ models
    if before.get(key) is False and "compile:" not in (REPO / "configs" / name).read_text():
        before[key] = "auto"
    monkeypatch.chdir(tmp_path)   # no data/ here: vocab_size stays `auto`, as it was frozen
    now = _flat(load_config(REPO / "configs" / name).to_dict())
    assert {key: now.get(key, "<missing>") for key in before} == before


def test_preset_defaults_and_explicit_keys_win():
    cfg = load_config(overrides=["model.preset=gpt2-124m", "model.seq_len=256"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size) == (12, 768, 50257)
    assert cfg.model.seq_len == 256


def test_config_files_in_repo_load():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, needle", [
    (["model.n_haed=4"], "model.n_haed: unknown key (did you mean 'model.n_head'?)"),
    (["optim.lr=-1"], "optim.lr = -1"),
    (["model.n_layer=three"], "model.n_layer = 'three'"),
    (["batch.global_size=10", "batch.micro_size=4"], "global_size=10 is not a multiple of micro_size=4"),
    (["model.d_model=100", "model.n_head=3"], "n_head=3 does not divide d_model=100"),
    (["model.norm=batchnorm"], "model.norm = 'batchnorm'"),
    (["model.n_head=4", "model.n_kv_head=3"], "n_kv_head=3 does not divide n_head=4"),
    (["model.preset=gpt5"], "unknown preset 'gpt5'"),
    (["lr"], "expected key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path, "bad.yaml", "model: {n_layer: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    cfg = write(tmp_path, "c.yaml", f"run_dir: {tmp_path / 'run'}\nmodel: {{n_head: 5}}\n")
    r = bigtrain(["train", cfg])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "n_head=5" in r.stderr and "Traceback" not in r.stderr
    r = bigtrain(["train", cfg, "model.n_head=4", f"data.path={tmp_path / 'missing'}"])
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "run").exists()


def test_lr_schedule_closed_form():
    cfg = load_config(overrides=["optim.lr=1e-3", "schedule.warmup_steps=10", "schedule.max_steps=110",
                                 "schedule.min_lr=1e-4", "schedule.decay=cosine",
                                 "batch.global_size=64", "batch.micro_size=8", "batch.reference_size=16"])
    assert base_lr(0, cfg) == pytest.approx(1e-4)           # (0+1)/10 of peak
    assert base_lr(9, cfg) == pytest.approx(1e-3)
    assert base_lr(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through cosine
    assert base_lr(110, cfg) == pytest.approx(1e-4)
    for rule, factor in [("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)]:
        cfg.schedule.scaling = rule
        assert lr_at(60, 64, cfg) == pytest.approx(factor * base_lr(60, cfg))
    cfg.schedule.decay = "linear"
    assert base_lr(35, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.75)
    cfg.schedule.decay = "constant"
    assert base_lr(100, cfg) == pytest.approx(1e-3)
    assert math.isclose(lr_at(5, 16, cfg), base_lr(5, cfg))


def test_weight_decay_groups():
    from bigtrain.model.gpt import GPT
    cfg = load_config(overrides=["model.vocab_size=50", "model.n_layer=1", "model.d_model=32", "model.n_head=2"])
    model = GPT(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "emb" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_emb.weight", "pos_emb.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_readme_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    from bigtrain.config_reference import reference_markdown
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert block == reference_markdown(), "README config reference is stale: regenerate it with " \
        "python -c 'from bigtrain.config_reference import reference_markdown as r; print(r())'"


def test_compile_auto_is_the_default_and_compiles_where_it_pays():
    """parallel.compile: auto compiles where it pays: on CUDA, and on the CPU for runs of at least
    1000 steps of models of at least 10M non-embedding parameters (bench/compile.py: the compile
    repaid within ~500 steps at 25M and 124M, only after ~6700 at 0.8M). true and false mean what
    they say on either device, whatever the run."""
    assert load_config().parallel.compile == "auto"
    runs = [("cuda", 10, 10**6), ("cpu", 999, 10**8), ("cpu", 1000, 9_999_999), ("cpu", 1000, 10**7), ("cpu", 10**5, 10**6)]
    resolved = {value: [load_config(overrides=[f"parallel.compile={value}"]).parallel.compiles(*run) for run in runs]
                for value in ("auto", "true", "false")}
    assert resolved == {"auto": [True, False, False, True, False], "true": [True] * 5, "false": [False] * 5}
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config(overrides=["parallel.compile=sometimes"])


@pytest.mark.parametrize("steps,compiled", [(999, False), (1000, True)])
def test_a_long_cpu_run_of_a_10m_model_gets_compiled_blocks(steps, compiled):
    """The rule reaches the model: the backend's blocks are compiled (wrapped, not yet traced)
    for a 1000-step run of a 12.6M-parameter model on the CPU, and eager one step shorter."""
    cfg = load_config(overrides=["model.n_layer=4", "model.n_head=8", "model.d_model=512", "model.vocab_size=256",
                                 f"schedule.max_steps={steps}", "parallel.device=cpu"])
    backend = LocalBackend(GPT(cfg.model), cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    assert backend.raw_model.num_params(non_embedding=True) >= 10_000_000
    assert [b._compiled_call_impl is not None for b in backend.raw_model.blocks] == [compiled] * 4
