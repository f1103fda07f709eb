"""Document masking: inside a packed window, each document attends only to itself and
its positions restart at 0 (``model.doc_mask: true``).

``bigtrain prepare`` writes every document followed by the tokenizer's separator
(``eot_id``, in the manifest), and samples are cut from the concatenated stream, so a
window holds the tail of one document, whole documents and the head of another. By
default attention runs across them (GPT-2/3 style). With ``doc_mask`` the model finds
the documents in its own input tokens, so nothing else changes: not the batch, the
loader, the loss, the culprit search or ``inspect``. The rules:

* An EOT belongs to the document it ends: a document's tokens and its EOT attend to
  each other (causally); the token after an EOT starts a document at position 0.
* A document cut at the window start starts at position 0 too: its beginning is not
  in the window, so the model sees what it would see given that fragment alone.

So every document computes exactly the function of a model run on it alone: the
logits of a packed window equal those of each document run separately (tests). The
loss keeps every target, including the one at an EOT (the next document's first
token, predicted from the ended document only).

Hugging Face equivalent: an exported model fed one document alone; or fed the packed
window with ``position_ids=find_documents(idx, eot_id).positions``, no ``attention_mask``
and ``use_cache=False``: transformers then sees the positions restart, treats the row as
packed sequences and masks across them (``masking_utils.find_packed_sequence_indices``
for sdpa/eager; for flash-attention only a batch of one flattened row, the layout of
``DataCollatorWithFlattening``).

How attention is computed, chosen once per forward by :func:`find_documents`:

* CUDA, half precision (autocast bf16, or bf16 parameters), no attention dropout:
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) on the batch
  flattened to one sequence cut at every document start; no mask, work O(sum of squared
  document lengths), memory O(T).
* Otherwise SDPA with a dense ``[B, 1, T, T]`` block-diagonal causal mask: O(T^2)
  memory and all T^2 scores computed (CUDA's flash kernel takes no mask). That is fine
  on CPU (tests, smoke runs: ``bench/docmask.py``); on CUDA it is said once per
  process, with the reason, on the log. (FlexAttention would be the other option: it
  needs ``torch.compile`` to be fast and, in torch 2.13, has no backward on CPU.)
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
VARLEN_DEVICES = ("cuda",)  # where varlen_attn has a kernel (FlashAttention)


@functools.cache
def varlen_kernel():
    """``torch.nn.attention.varlen.varlen_attn``, imported on first use: importing it loads
    ``torch._dynamo`` (1.7 s and 70 MB per process on this project's CPU machine), which a run
    that never takes the varlen path does not need. None before torch 2.9 (the dense mask runs
    then, and says so on CUDA)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass
class Documents:
    """Where the documents of a batch of windows are, in the form the attention needs."""
    positions: torch.Tensor           # [B, T] each token's position inside its document
    mask: torch.Tensor | None         # [B, 1, T, T] bool, True where a query may attend (dense path)
    cu_seqlens: torch.Tensor | None   # int32 [n_docs + 1]: document starts in the flattened batch (varlen)
    max_len: int = 0                  # longest document (varlen)


def find_documents(idx: torch.Tensor, eot_id: int, dtype: torch.dtype = torch.float32,
                   dropout_p: float = 0.0) -> Documents:
    """The documents of ``idx`` [B, T]: a new one starts at each row's first token and after
    every EOT. ``dtype`` (of the activations; autocast's when it is on) and ``dropout_p``
    choose the kernel."""
    B, T = idx.shape
    starts = torch.ones_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot_id
    t = torch.arange(T, device=idx.device).expand(B, T)
    positions = t - torch.where(starts, t, 0).cummax(dim=1).values  # distance to the latest start
    if _varlen_fits(idx.device, dtype, dropout_p):
        first = starts.flatten().nonzero().squeeze(1)
        cu_seqlens = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
        return Documents(positions, None, cu_seqlens, int(cu_seqlens.diff().max()))  # int: one device sync
    ids = starts.cumsum(dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return Documents(positions, (ids[:, None, :, None] == ids[:, None, None, :]) & causal, None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, dropout_p: float) -> torch.Tensor:
    """Causal attention within documents; q and the result are [B, H, T, hd], k and v
    [B, H_kv, T, hd] (grouped-query attention when H_kv < H)."""
    grouped = k.size(1) != q.size(1)
    if docs.mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask, dropout_p=dropout_p, enable_gqa=grouped)
    if grouped:  # varlen_attn takes as many k/v heads as query heads
        k, v = (x.repeat_interleave(q.size(1) // k.size(1), dim=1) for x in (k, v))
    # The B rows as one sequence of B*T tokens (documents never cross rows: every row starts one).
    # q and k may be fp32 under autocast (QK-norm); v comes from a Linear, in the compute dtype.
    B, H, T, hd = q.shape
    flat = [x.to(v.dtype).transpose(1, 2).reshape(B * T, H, hd) for x in (q, k, v)]
    y = varlen_kernel()(*flat, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len, window_size=(-1, 0))
    return y.view(B, T, H, hd).transpose(1, 2)


def _varlen_fits(device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    if device.type not in VARLEN_DEVICES:
        return False
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    if varlen_kernel() is None:
        _say_dense_once(f"torch {torch.__version__} has no varlen_attn")
    elif dropout_p:
        _say_dense_once("attention dropout is on; varlen_attn has none")
    elif dtype not in (torch.float16, torch.bfloat16):
        _say_dense_once(f"activations are {dtype}; varlen_attn needs fp16/bf16")
    else:
        return True
    return False


@functools.cache
def _say_dense_once(reason: str) -> None:
    log.warning("bigtrain: doc_mask on %s uses a dense [B, 1, T, T] attention mask (O(T^2) memory and "
                "compute): %s", ", ".join(VARLEN_DEVICES), reason)
