"""The training-step recipe owned by the backend: measure, update, discard.

Checked on the reference backend (``none``) against a step written out by hand with
plain PyTorch; the distributed backends are checked against this one in
tests/test_distributed.py. Random tokens: the recipe does not care where they come from.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import load_config
from bigtrain.data.loader import Batch
from bigtrain.model.gpt import GPT
from bigtrain.optim import init_state
from bigtrain.parallel.backend import LocalBackend, backend_class
from bigtrain.parallel.env import DistEnv

CPU = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
ROWS, MICRO = 6, 2   # three micro-batches: gradients accumulate


def config(**extra):
    base = {"model.n_layer": 2, "model.n_head": 2, "model.d_model": 32, "model.seq_len": 16,
            "model.vocab_size": 61, "batch.global_size": ROWS, "batch.micro_size": MICRO,
            "optim.grad_clip": 0.5, "parallel.precision": "fp32", "seed": 3}
    base.update(extra)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def batch(i: int, cfg) -> Batch:
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(cfg.model.vocab_size, (ROWS, cfg.model.seq_len + 1), generator=g)
    positions = np.arange(i * ROWS, (i + 1) * ROWS)
    return Batch(i * ROWS, (i + 1) * ROWS, positions, positions, tokens)


def fresh(cfg) -> LocalBackend:
    torch.manual_seed(cfg.seed)
    return LocalBackend(GPT(cfg.model), cfg, CPU)


def reference_step(model, opt, tokens, lr, max_norm) -> tuple[float, float]:
    """The textbook step: token-mean CE accumulated over micro-batches, clip, AdamW."""
    n, loss = tokens[:, 1:].numel(), 0.0
    for rows in tokens.split(MICRO):
        logits = model(rows[:, :-1])
        ce = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum") / n
        ce.backward()
        loss += float(ce)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm


def test_measure_and_update_match_a_hand_written_step():
    cfg = config()
    backend = fresh(cfg)
    model = copy.deepcopy(backend.raw_model)
    named = dict(model.named_parameters())
    decay = [p for n, p in named.items() if p.ndim >= 2 and "emb" not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": [p for p in named.values() if all(p is not q for q in decay)],
                              "weight_decay": 0.0}], betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    clipped = 0
    for i, lr in enumerate([1e-3, 3e-3, 2e-3]):
        stats = backend.measure(batch(i, cfg), MICRO)
        factor = float(backend.update(lr, cfg.optim.grad_clip))
        loss, norm = reference_step(model, opt, batch(i, cfg).tokens, lr, cfg.optim.grad_clip)
        assert float(stats.loss) == pytest.approx(loss, rel=1e-6)
        assert float(stats.grad_norm) == pytest.approx(norm, rel=1e-5)
        assert not stats.nonfinite
        assert factor == pytest.approx(min(1.0, cfg.optim.grad_clip / norm), rel=1e-5)
        clipped += factor < 1.0
    assert clipped  # the clip path was exercised
    # atol: k.bias has a zero gradient in exact arithmetic (softmax ignores a
    # shift shared by all keys), so it moves only by rounding noise (~1e-12) over Adam's eps
    # (1e-8) times the LR, which the fused and the reference foreach AdamW round differently.
    for name, p in backend.raw_model.named_parameters():
        torch.testing.assert_close(p, named[name], rtol=1e-5, atol=5e-6, msg=name)


def snapshot(backend: LocalBackend):
    params = [p.detach().clone() for p in backend.raw_model.parameters()]
    state = copy.deepcopy(backend.optimizer.state_dict())
    return params, state


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def two_after_one_update(cfg) -> tuple[LocalBackend, LocalBackend]:
    """Two equal backends that have applied the same first update (so Adam's state is real)."""
    backends = fresh(cfg), fresh(cfg)
    for backend in backends:
        backend.measure(batch(0, cfg), MICRO)
        backend.update(1e-3, cfg.optim.grad_clip)
    return backends


def test_discard_changes_nothing_and_the_next_update_is_as_if_the_step_never_happened():
    cfg = config()
    skipping, plain = two_after_one_update(cfg)
    before = snapshot(skipping)
    stats = skipping.measure(batch(1, cfg), MICRO)
    skipping.discard()
    assert equal(snapshot(skipping), before)  # parameters, both moments, the step count: bitwise
    assert all(p.grad is None for p in skipping.raw_model.parameters())
    assert stats.grad_norm > 0
    with pytest.raises(RuntimeError, match="measure"):
        skipping.update(1e-3, cfg.optim.grad_clip)  # nothing measured since the discard
    for backend in (skipping, plain):
        backend.measure(batch(2, cfg), MICRO)
        backend.update(1e-3, cfg.optim.grad_clip)
    assert equal(snapshot(skipping), snapshot(plain))


def test_a_nan_written_after_backward_is_reported_and_discard_keeps_the_model_finite():
    cfg = config()
    backend = fresh(cfg)
    before = snapshot(backend)

    def poison(b):
        b.grads()[0].view(-1)[0] = float("nan")

    stats = backend.measure(batch(0, cfg), MICRO, after_backward=poison)
    assert stats.nonfinite and stats.grad_norm.isnan()
    backend.discard()
    assert equal(snapshot(backend), before)


def test_optimizer_state_built_eagerly_steps_exactly_as_a_lazy_one():
    """``init_state`` makes the state AdamW's first step would make: same results, bitwise,
    and the same state layout (so checkpoints of either load into the other)."""
    cfg = config()
    eager = fresh(cfg)
    lazy = fresh(cfg)
    lazy.optimizer.state.clear()  # what a plain torch AdamW holds before its first step
    steps = [snapshot(eager)[1]["state"][0]["step"]]
    for i in range(3):
        for backend in (eager, lazy):
            backend.measure(batch(i, cfg), MICRO)
            backend.update(1e-3, cfg.optim.grad_clip)
        steps.append(snapshot(eager)[1]["state"][0]["step"])
        assert equal(snapshot(eager), snapshot(lazy))
    assert [float(s) for s in steps] == [0, 1, 2, 3]


def test_asking_for_the_state_dict_before_any_update_does_not_step():
    """DCP's get_state_dict runs a zero-gradient step on an optimizer without state; ours has it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    cfg = config()
    asked, untouched = fresh(cfg), fresh(cfg)
    get_state_dict(asked.raw_model, asked.optimizer)
    assert equal(snapshot(asked), snapshot(untouched))
    for backend in (asked, untouched):
        backend.measure(batch(0, cfg), MICRO)
        backend.update(1e-3, cfg.optim.grad_clip)
    assert equal(snapshot(asked), snapshot(untouched))


def test_init_state_refuses_an_adamw_it_does_not_mirror():
    with pytest.raises(ValueError, match="amsgrad"):
        init_state(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], amsgrad=True, fused=True))
    with pytest.raises(ValueError, match="fused"):
        init_state(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], foreach=True))


@pytest.mark.parametrize("poisoned", [False, True])
def test_an_update_not_applied_on_the_device_changes_nothing_nan_or_not(poisoned):
    """``update(apply=False)``: the device-side skip (fused AdamW's found_inf) leaves parameters,
    moments and step counts bitwise as they were, even with NaN gradients, and the next
    applied update is the one a run without the skipped step would make."""
    cfg = config()
    skipping, plain = two_after_one_update(cfg)
    before = snapshot(skipping)
    poison = (lambda b: b.grads()[0].view(-1).__setitem__(0, float("nan"))) if poisoned else None
    stats = skipping.measure(batch(1, cfg), MICRO, after_backward=poison)
    skipping.update(torch.tensor(5e-3), cfg.optim.grad_clip, apply=~stats.nonfinite & torch.tensor(False))
    assert equal(snapshot(skipping), before)
    for backend in (skipping, plain):
        backend.measure(batch(2, cfg), MICRO)
        backend.update(torch.tensor(1e-3), cfg.optim.grad_clip, apply=torch.tensor(True))
    assert equal(snapshot(skipping), snapshot(plain))


def test_capabilities_are_declared_on_the_classes():
    assert {n: backend_class(n).checkpoint_format for n in ("none", "fsdp", "deepspeed")} == \
        {"none": "dcp", "fsdp": "dcp", "deepspeed": "deepspeed"}
    ds = backend_class("deepspeed")
    assert not (ds.reshards_checkpoints or ds.has_local_grads or ds.async_checkpoint)
    assert all(backend_class(n).reshards_checkpoints and backend_class(n).has_local_grads
               and backend_class(n).async_checkpoint for n in ("none", "fsdp"))


def test_a_state_saved_by_the_foreach_adamw_of_older_checkpoints_loads_and_stays_fused():
    """Checkpoints written before AdamW was fused hold foreach flags and CPU step counts; loading
    one keeps the optimizer fused (the device-side skip needs it) and trains on exactly alike."""
    cfg = config()
    trained, resumed = fresh(cfg), fresh(cfg)
    trained.measure(batch(0, cfg), MICRO)
    trained.update(1e-3, cfg.optim.grad_clip)
    old = copy.deepcopy(trained.optimizer.state_dict())
    for group in old["param_groups"]:
        group["fused"], group["foreach"] = False, True
    resumed.raw_model.load_state_dict(trained.raw_model.state_dict())
    resumed.optimizer.load_state_dict(old)
    assert all(g["fused"] and not g["foreach"] for g in resumed.optimizer.param_groups)
    for backend in (trained, resumed):
        stats = backend.measure(batch(1, cfg), MICRO)
        backend.update(torch.tensor(2e-3, dtype=torch.float64), cfg.optim.grad_clip, apply=~stats.nonfinite)
    assert equal(snapshot(trained), snapshot(resumed))
