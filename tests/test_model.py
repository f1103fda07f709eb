"""The transformer: parameter count, equivalence with HF GPT-2 / LLaMA, init, training, causality."""
import itertools
import math

import pytest
import torch

from bigtrain.config import ModelConfig
from bigtrain.export import to_hf  # the weight mapping `bigtrain export` writes
from bigtrain.model.gpt import GPT, lm_loss


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, seq_len=32, vocab_size=97)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- size and FLOPs

def test_gpt2_124m_matches_gpt2_small_parameter_count():
    cfg = ModelConfig(preset="gpt2-124m")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    # 6 * (N_non_embedding + V * d) + 12 * L * d * T, the head matmul counted once.
    assert model.flops_per_token() == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 768 * 1024


def test_untied_head_counts_as_a_parameter_but_not_non_embedding():
    tied, untied = GPT(tiny(tie_embeddings=True)), GPT(tiny(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 97 * 64
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)
    assert untied.flops_per_token() == tied.flops_per_token()


# ---------------------------------------------------------------- equivalence with Hugging Face

def randomize(model: GPT) -> None:
    """Move away from the init, which would hide mistakes: norm weights/biases are 1/0 there
    (a swapped or missing norm), biases 0, and activations so small that GELU's tanh and erf
    forms agree to 1e-6. Block weights ~ N(0, 1/fan_in) keep activations O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith("blocks."):
                p.normal_(0, p.shape[1] ** -0.5)


@pytest.mark.parametrize("arch, options", [
    ("GPT2LMHeadModel", dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)),
    ("LlamaForCausalLM", dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False,
                              rope_theta=500.0, norm_eps=1e-6)),
    ("LlamaForCausalLM", dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False,
                              rope_theta=500.0, norm_eps=1e-6, n_kv_head=2)),  # grouped-query attention
], ids=["gpt2", "llama", "llama-gqa"])
def test_logits_equal_hf(arch, options):
    torch.manual_seed(0)
    model = GPT(tiny(**options)).eval()
    randomize(model)
    hf = to_hf(model)
    assert type(hf).__name__ == arch
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- init

def test_init_statistics_and_tying():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=256, n_head=8, vocab_size=512, bias=True))
    std, proj_std = 0.02, 0.02 / math.sqrt(16)
    for b in model.blocks:
        for w, want in [(b.attn.q.weight, std), (b.attn.k.weight, std), (b.attn.v.weight, std), (b.mlp.fc.weight, std),
                        (b.attn.proj.weight, proj_std), (b.mlp.proj.weight, proj_std)]:
            assert abs(w.std().item() - want) < 0.05 * want
            assert abs(w.mean().item()) < 0.05 * want
        for lin in (b.attn.q, b.attn.k, b.attn.v, b.attn.proj, b.mlp.fc, b.mlp.proj):
            assert torch.all(lin.bias == 0)
        for norm in (b.norm1, b.norm2):
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert abs(model.tok_emb.weight.std().item() - std) < 0.05 * std
    assert abs(model.pos_emb.weight.std().item() - std) < 0.05 * std
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.bias is None


def test_init_after_meta_and_to_empty_gives_a_working_model():
    cfg = tiny(pos="rope", norm="rmsnorm", qk_norm=True)
    reference = GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight  # to_empty unties; init_weights re-ties
    assert model.num_params() == reference.num_params()
    # the same seed (torch.initial_seed()) and a per-parameter draw: bitwise the eager model
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)
    assert "rope_cos" not in model.state_dict()
    for b in model.blocks:
        assert torch.all(b.attn.q_norm.weight == 1) and torch.all(b.norm1.weight == 1)
        assert abs(b.attn.q.weight.std().item() - 0.02) < 0.002
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 33))
    ce, _ = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    assert abs(ce.item() / 64 - math.log(97)) < 0.1


# ---------------------------------------------------------------- behaviour

COMBOS = list(itertools.product(["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"],
                                [True, False], [False, True]))


@pytest.mark.parametrize("norm,mlp,pos,bias,qk_norm", COMBOS)
def test_every_option_combination_trains(norm, mlp, pos, bias, qk_norm):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64, norm=norm, mlp=mlp,
                            pos=pos, bias=bias, qk_norm=qk_norm, tie_embeddings=bias))
    idx = torch.randint(0, 64, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        ce, z = lm_loss(model(x), y, z_loss=1e-4)
        loss = (ce + z) / y.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2, losses


def test_qk_norm_normalises_each_head_of_q_and_k():
    """With QK-norm, scaling one head's query or key rows changes nothing (up to the norm's eps,
    made negligible here); without, it does."""
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny(qk_norm=qk_norm, bias=False, pos="rope", norm_eps=1e-10)).eval()
        assert (model.blocks[0].attn.q_norm is None) != qk_norm
        if qk_norm:  # RMS over head_dim, as OLMo-2 / Qwen3 (a LayerNorm would also pass the scaling check)
            assert isinstance(model.blocks[0].attn.k_norm, torch.nn.RMSNorm)
            assert model.blocks[0].attn.k_norm.normalized_shape == (16,)
        randomize(model)
        with torch.no_grad():
            before = model(idx)
            attn = model.blocks[0].attn
            attn.q.weight.view(4, 16, 64)[1].mul_(5.0)  # (head, head_dim, d)
            attn.k.weight.view(4, 16, 64)[2].mul_(0.2)
            after = model(idx)
        change = (before - after).abs().max().item()
        assert change < 1e-5 if qk_norm else change > 1e-2


@pytest.mark.parametrize("doc_mask", [False, True])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(doc_mask):
    """n_kv_head=2 of 4 heads computes what the 4-head model computes when its k/v heads come in
    identical pairs (heads 0,1 share k/v head 0; 2,3 share head 1): the closed form of GQA."""
    torch.manual_seed(0)
    options = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, doc_mask=doc_mask, eot_id=0)
    gqa = GPT(tiny(n_kv_head=2, **options)).eval()
    randomize(gqa)
    mha = GPT(tiny(**options)).eval()
    assert gqa.blocks[0].attn.k.weight.shape == (32, 64) and mha.blocks[0].attn.k.weight.shape == (64, 64)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            mine = gqa.get_parameter(name)
            if name.endswith(("attn.k.weight", "attn.v.weight")):  # [kv heads * hd, d] -> each head twice
                mine = mine.view(2, 1, 16, 64).expand(2, 2, 16, 64).reshape(64, 64)
            p.copy_(mine)
    idx = torch.randint(1, 97, (2, 32))
    idx[:, 10] = 0  # a document boundary for doc_mask
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=0)
    assert gqa.num_params() == mha.num_params() - 2 * 2 * 32 * 64  # two layers, k and v half the rows


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causality(pos):
    torch.manual_seed(0)
    model = GPT(tiny(pos=pos)).eval()
    idx = torch.randint(0, 97, (1, 32))
    changed = idx.clone()
    t = 20
    changed[0, t] = (idx[0, t] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=256))
    idx = torch.randint(0, 256, (8, 33))
    with torch.no_grad():
        ce, z = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    assert abs(ce.item() / (8 * 32) - math.log(256)) < 0.1
    assert z.item() == 0.0


def test_lm_loss_returns_fp32_sums_and_z_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5))
    ce, z = lm_loss(logits, targets, z_loss=1e-3)
    assert ce.dtype == torch.float32 and z.dtype == torch.float32
    flat = logits.float().reshape(-1, 11)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(flat, targets.reshape(-1)) * 10)
    torch.testing.assert_close(z, 1e-3 * (torch.logsumexp(flat, -1) ** 2).sum())


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.2))
    idx = torch.randint(0, 97, (2, 32))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_too_long_sequence_raises():
    model = GPT(tiny(seq_len=8))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 97)


def test_unresolved_vocab_raises():
    with pytest.raises(ValueError, match="auto"):
        GPT(ModelConfig(vocab_size="auto"))


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_tied_tables_gradient_is_the_dense_one_and_stays_dense(micro_batches, monkeypatch):
    """On the CPU the token lookup of a tied model hands back a sparse gradient that is added
    into the head's dense one (GPT.sparse_lookup_grad): the table's gradient is what the dense
    lookup gives, dense, over several micro-batches too; repeated tokens included."""
    cfg = ModelConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=32, tie_embeddings=True)
    idx = torch.randint(0, 8, (micro_batches, 3, 17))  # few distinct tokens: many repeats

    def table_grad(model: GPT) -> torch.Tensor:
        for rows in idx:
            lm_loss(model(rows[:, :-1]), rows[:, 1:])[0].backward()
        return model.tok_emb.weight.grad

    torch.manual_seed(0)
    sparse_model = GPT(cfg)
    dense_model = GPT(cfg)
    dense_model.load_state_dict(sparse_model.state_dict())
    assert sparse_model.sparse_lookup_grad(idx[0])
    monkeypatch.setattr(dense_model, "sparse_lookup_grad", lambda idx: False)
    grad, dense = table_grad(sparse_model), table_grad(dense_model)
    assert grad.layout == torch.strided and grad.is_contiguous()
    torch.testing.assert_close(grad, dense, rtol=1e-5, atol=1e-6)
    assert not GPT(cfg.model_copy(update={"tie_embeddings": False})).sparse_lookup_grad(idx[0])
