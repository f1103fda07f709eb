"""Config: layering, overrides, presets, and one-line errors for bad input."""
from __future__ import annotations

import math

import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.optim import base_lr, lr_at, param_groups
from helpers import bigtrain


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

    from bigtrain.config import reference_markdown
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert block == reference_markdown(), "README config reference is stale: regenerate it with " \
        "python -c 'from bigtrain.config import reference_markdown as r; print(r())'"
