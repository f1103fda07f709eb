"""model.doc_mask: a packed window computes what each of its documents computes alone, in
bigtrain and in the exported Hugging Face model; a run with it trains and exports."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from bigtrain.checkpoint import load_model
from bigtrain.cli import main
from bigtrain.config import ConfigError, ModelConfig
from bigtrain.data.tokenizer import BytesTokenizer
from bigtrain.export import to_hf
from bigtrain.model import doc_mask
from bigtrain.model.doc_mask import attend, find_documents
from bigtrain.model.gpt import GPT
from helpers import fit, tiny_config, train_losses
from test_model import randomize

EOT = 96
GPT2 = dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, rope_theta=500.0,
             norm_eps=1e-6)
STYLES = pytest.mark.parametrize("options", [GPT2, LLAMA], ids=["gpt2", "llama"])


def model(options: dict, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_head=4, d_model=64, seq_len=32, vocab_size=97, eot_id=EOT, **options, **kw))
    randomize(m)
    return m.eval()


def windows() -> torch.Tensor:
    """Rows of 32 tokens: (0) a document cut at the window start, whole documents, an EOT at the
    last position; (1) an EOT first, an empty document (two EOTs in a row), a document cut at the
    end; (2) no EOT at all: one document, the whole window."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, EOT, (3, 32), generator=g)
    rows[0, [6, 7, 19, 31]] = EOT
    rows[1, [0, 12, 13]] = EOT
    return rows


def documents(row: list[int], eot: int = EOT) -> list[tuple[int, int]]:
    """[start, end) of each document of a row, cut after every EOT (the EOT ends its document)."""
    cuts = [0] + [i + 1 for i, t in enumerate(row[:-1]) if t == eot] + [len(row)]
    return list(zip(cuts, cuts[1:]))


@STYLES
def test_packed_window_equals_each_document_alone(options):
    """Logits, and the gradients of any function of them: a packed window with doc_mask is each
    document through the plain causal model (doc_mask off), separately."""
    on, off, idx = model(options, doc_mask=True), model(options), windows()
    weights = torch.randn(*idx.shape, 97, generator=torch.Generator().manual_seed(2))
    packed = on(idx)
    (packed * weights).sum().backward()
    for r, row in enumerate(idx.tolist()):
        for a, b in documents(row):
            alone = off(idx[r:r + 1, a:b])[0]
            torch.testing.assert_close(packed[r, a:b], alone, atol=1e-5, rtol=0)
            (alone * weights[r, a:b]).sum().backward()
    for (name, p), q in zip(on.named_parameters(), off.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5, msg=name)


@STYLES
def test_without_doc_mask_documents_see_each_other(options):
    """The control: the same window with doc_mask off differs after the first EOT, and a window
    without any EOT is the same function either way."""
    on, off, idx = model(options, doc_mask=True), model(options), windows()
    with torch.no_grad():
        a, b = on(idx), off(idx)
    torch.testing.assert_close(a[0, :7], b[0, :7], atol=1e-5, rtol=0)  # row 0 up to its first EOT
    assert (a[0, 8:] - b[0, 8:]).abs().max() > 1e-2
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)


def test_positions_restart_after_each_eot():
    docs = find_documents(torch.tensor([[5, EOT, EOT, 1, 2, EOT, 3]]), EOT)
    assert docs.positions.tolist() == [[0, 1, 0, 0, 1, 2, 0]]


@STYLES
def test_hf_model_on_one_document_or_with_restarting_position_ids_matches(options):
    """What Hugging Face computes: the exported model fed one document alone, or fed the packed
    window with position_ids restarting at each document and no cache (transformers then masks
    across them, as for DataCollatorWithFlattening), gives bigtrain's doc_mask logits."""
    m, idx = model(options, doc_mask=True), windows()
    hf = to_hf(m)
    with torch.no_grad():
        packed = m(idx)
        flattened = hf(input_ids=idx, position_ids=find_documents(idx, EOT).positions, use_cache=False).logits
        torch.testing.assert_close(flattened, packed, atol=1e-5, rtol=0)
        for a, b in documents(idx[0].tolist()):
            torch.testing.assert_close(hf(idx[:1, a:b]).logits[0], packed[0, a:b], atol=1e-5, rtol=0)


def test_varlen_layout_matches_the_mask(monkeypatch):
    """The CUDA path (FlashAttention varlen on the flattened batch) computes what the dense mask
    does; here with a reference varlen kernel, since this machine has no CUDA."""
    def reference(q, k, v, cu_q, cu_k, max_q, max_k, window_size):
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == int(cu_q.diff().max())
        out = [F.scaled_dot_product_attention(*(x[a:b].float().transpose(0, 1) for x in (q, k, v)), is_causal=True)
               for a, b in zip(cu_q.tolist(), cu_q[1:].tolist())]
        return torch.cat(out, dim=1).transpose(0, 1)

    idx = windows()
    q, k, v = torch.randn(3, 3, 4, 32, 8).bfloat16().unbind(0)
    dense = attend(q.float(), k.float(), v.float(), find_documents(idx, EOT), 0.0)
    monkeypatch.setattr(doc_mask, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(doc_mask, "varlen_kernel", lambda: reference)
    docs = find_documents(idx, EOT, torch.bfloat16)
    assert docs.mask is None and docs.cu_seqlens.tolist() == [0, 7, 8, 20, 32, 33, 45, 46, 64, 96]
    torch.testing.assert_close(attend(q, k, v, docs, 0.0), dense, atol=1e-5, rtol=0)


def test_a_dense_mask_where_varlen_would_run_is_said_once(monkeypatch, caplog):
    """On CUDA, fp32 (or attention dropout) cannot use FlashAttention varlen: the O(T^2) mask
    that runs instead is named once per process, with the reason."""
    monkeypatch.setattr(doc_mask, "VARLEN_DEVICES", ("cpu",))
    with caplog.at_level(logging.WARNING, logger="bigtrain.model.doc_mask"):
        for _ in range(3):
            assert find_documents(windows(), EOT, torch.float32).mask is not None
            assert find_documents(windows(), EOT, torch.bfloat16, dropout_p=0.1).mask is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("dense [B, 1, T, T] attention mask" in line for line in lines), lines
    assert "torch.float32" in lines[0] and "dropout" in lines[1]


def test_needs_an_eot_id():
    with pytest.raises(ValueError, match="eot_id"):
        GPT(ModelConfig(vocab_size=97, doc_mask=True))


# ---------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def paragraphs(docs_text, tmp_path_factory) -> str:
    """The prose corpus as one document per paragraph (~40-1000 bytes), byte tokenizer: windows of
    64 tokens hold document boundaries."""
    from bigtrain.data.prepare import prepare
    src = tmp_path_factory.mktemp("src") / "paragraphs.jsonl"
    src.write_text("".join(json.dumps({"text": p}) + "\n" for p in docs_text[:200_000].split("\n\n")))
    out = tmp_path_factory.mktemp("data") / "paragraphs"
    prepare(str(src), "bytes", str(out), val_fraction=0.0)
    return str(out)


def test_an_eot_id_that_is_not_the_datas_is_refused(paragraphs, tmp_path):
    from bigtrain.parallel.env import DistEnv
    from bigtrain.trainer import Trainer
    cfg = tiny_config(paragraphs, tmp_path / "run", model__doc_mask=True, model__eot_id=10)
    with pytest.raises(ConfigError, match=r"^config error: model.eot_id=10 but the data ends documents with "
                                          r"token 256; use eot_id: auto$"):
        Trainer(cfg, DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    assert not (tmp_path / "run").exists()


def test_a_run_with_doc_mask_trains_and_exports(paragraphs, tmp_path):
    from transformers import AutoModelForCausalLM
    run, out = tmp_path / "run", tmp_path / "hf"
    cfg = tiny_config(paragraphs, run, model__doc_mask=True, model__seq_len=64, schedule__max_steps=30,
                      **{f"model__{k}": v for k, v in LLAMA.items()})
    assert cfg.model.eot_id == BytesTokenizer.eot_id  # resolved from the manifest
    fit(cfg)
    losses = [loss for _, loss in train_losses(run)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

    assert main(["export", str(run), "--out", str(out)]) == 0
    hf, ours = AutoModelForCausalLM.from_pretrained(str(out)).eval(), load_model(run)
    tok = BytesTokenizer()
    texts = ("The end of one.", "A second document, alone.", "A third one, cut by the end of the window.")
    stream = sum((tok.encode(t) + [tok.eot_id] for t in texts), [])
    window = torch.tensor([stream[5:69]])  # the first document cut at the start, the last at the end
    with torch.no_grad():
        packed = ours(window)
        for a, b in documents(window[0].tolist(), tok.eot_id):
            torch.testing.assert_close(hf(window[:, a:b]).logits[0], packed[0, a:b], atol=1e-5, rtol=0)
