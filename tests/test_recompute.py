"""Activation checkpointing: every policy computes the gradients of the run without it, and
each keeps what it says it keeps (counted on the real autograd graph)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bigtrain.config import load_config
from bigtrain.model.gpt import GPT, lm_loss
from bigtrain.parallel.recompute import checkpoint_blocks

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def run(mode: str, every: int = 1, style: str = "gpt2"):
    """Gradients, bytes saved for backward, and matmuls run in backward, for one policy."""
    extra = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos=rope", "model.bias=false"] if style == "llama" else []
    cfg = load_config(overrides=["model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.seq_len=32",
                                 "model.vocab_size=97", "model.dropout=0.1", *extra])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    checkpoint_blocks(model.blocks, mode, every)
    idx = torch.randint(0, 97, (2, 33))
    torch.manual_seed(1)  # dropout masks
    with torch.profiler.profile(profile_memory=True) as prof:  # what forward leaves allocated for backward
        ce, _ = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    kept = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    with CountMatmuls() as backward_matmuls:
        ce.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, kept, backward_matmuls.count


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_every_policy_gives_the_gradients_of_no_checkpointing(style):
    reference, _, _ = run("none", style=style)
    for mode, every in [("full", 1), ("op", 1), ("full", 2), ("op", 3)]:
        grads, _, _ = run(mode, every, style)
        for name, g in reference.items():
            assert torch.equal(grads[name], g), (mode, every, name)


def test_op_keeps_matmul_outputs_and_full_recomputes_them():
    _, saved_none, mm_none = run("none")
    _, saved_full, mm_full = run("full")
    _, saved_op, mm_op = run("op")
    _, saved_half, mm_half = run("full", every=2)
    # full re-runs every block's forward matmuls in backward; op re-runs none of them
    assert mm_full > mm_none and mm_op == mm_none
    assert mm_none < mm_half < mm_full
    # and each keeps less for backward than the one before it
    assert saved_full < saved_half < saved_none
    assert saved_full < saved_op < saved_none
