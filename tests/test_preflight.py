"""``bigtrain preflight``: passes on a sound config, fails by name on broken ones."""
from __future__ import annotations

import json
import math

import pytest

from bigtrain.data.dataset import open_data
from bigtrain.data.order import SampleOrder
from bigtrain.model.gpt import GPT
from bigtrain.preflight import run_preflight
from bigtrain.data.splits import open_splits
from helpers import bigtrain, tiny_config, tiny_overrides


def test_preflight_passes_on_the_smoke_config(prose_bytes, tmp_path):
    """The CLI on configs/smoke.yaml (tiny overrides): exit 0, every check passes, and the
    decoded samples are the first global batch of the real sample order."""
    args = ["preflight", "configs/smoke.yaml", *tiny_overrides(prose_bytes, tmp_path / "run"),
            "--json", "--lr-range", "--lr-range-steps", "60"]
    out = bigtrain(args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"] and list(checks) == ["data", "vocab", "params", "gradients", "init_loss",
                                                 "overfit", "lr_range"]
    assert all(c["status"] == "pass" for c in checks.values()), checks

    cfg = tiny_config(prose_bytes, tmp_path / "run")
    _, train, _ = open_splits(cfg)
    order = SampleOrder(train.num_samples(cfg.model.seq_len), cfg.seed)
    first = order.sample_at(order.next_batch(0, cfg.batch.global_size)[0])
    tokenizer = open_data(prose_bytes).tokenizer
    for i, shown in enumerate(report["samples"]):
        assert shown["position"] == i and shown["sample"] == first[i]
        assert shown["ids"] == train.sample(int(first[i]), cfg.model.seq_len).tolist()
        assert shown["text"] == tokenizer.decode(shown["ids"])

    model = GPT(cfg.model)
    params = checks["params"]["details"]
    assert params["total"] == params["trainable"] == model.num_params()
    assert params["non_embedding"] == model.num_params(non_embedding=True) and params["frozen"] == []
    assert set(params["decay"]) == {n for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n}
    init = checks["init_loss"]["details"]
    assert init["ln_vocab"] == pytest.approx(math.log(257)) and abs(init["loss"] - init["ln_vocab"]) < 0.1
    curve = checks["overfit"]["details"]["curve"]
    assert curve[-1] < 0.1 * math.log(257) < curve[0]
    lr = checks["lr_range"]["details"]
    assert lr["lrs"] == sorted(lr["lrs"]) and 1e-5 < lr["suggested_lr"] < 1.0


def _failed(report) -> set[str]:
    return {c.name for c in report.checks if c.status == "fail"}


def test_preflight_names_what_is_broken(prose_bytes, tmp_path):
    run = tmp_path / "run"
    absurd = run_preflight(tiny_config(prose_bytes, run, optim__lr=1e3), lr_range=True, lr_range_steps=60)
    assert _failed(absurd) == {"overfit", "lr_range"}, absurd.format()
    assert absurd.check("lr_range").details["diverged_at"] < 1e3

    cfg = tiny_config(prose_bytes, run)

    def head_cut_off() -> GPT:
        """The head sees a detached copy of the network's output: no gradient reaches the blocks."""
        model = GPT(cfg.model)
        model.lm_head.register_forward_pre_hook(lambda module, args: (args[0].detach(),))
        return model

    cut = run_preflight(cfg, model_fn=head_cut_off)
    assert "gradients" in _failed(cut) and "blocks.0.attn.q.weight" in cut.check("gradients").details["no_grad"]
    assert "tok_emb.weight" not in cut.check("gradients").details["no_grad"]  # the tied head still learns

    def head_detached() -> GPT:
        model = GPT(cfg.model)
        model.lm_head.register_forward_hook(lambda module, args, out: out.detach())
        return model

    dead = run_preflight(cfg, model_fn=head_detached)
    assert _failed(dead) == {"gradients"} and dead.check("overfit").status == "skip"

    bigger = run_preflight(tiny_config(prose_bytes, run, model__vocab_size=300), overfit_steps=5)
    assert "vocab" in _failed(bigger) and "300" in bigger.check("vocab").summary
    smaller = run_preflight(tiny_config(prose_bytes, run, model__vocab_size=64))
    assert _failed(smaller) == {"vocab"} and smaller.check("overfit").status == "skip"  # ids >= 64 cannot embed


def test_preflight_exit_codes(prose_bytes, tmp_path):
    """A failing check exits 1 with the table naming it; bad input exits 2 with one line."""
    failing = bigtrain(["preflight", "configs/smoke.yaml",
                        *tiny_overrides(prose_bytes, tmp_path / "run", optim__lr=1e3)], timeout=600)
    assert failing.returncode == 1, failing.stderr[-3000:]
    assert "preflight FAILED: overfit" in failing.stdout and "Traceback" not in failing.stderr
    bad = bigtrain(["preflight", "configs/smoke.yaml", f"data.path={prose_bytes}", "optim.lrr=1"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "optim.lrr" in bad.stderr
    assert bad.stdout == ""
