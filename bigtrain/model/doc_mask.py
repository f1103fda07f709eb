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

Hugging Face equivalent: an exported model fed one document alone, or fed the packed
window with ``position_ids=find_documents(idx, eot_id).positions`` and no
``attention_mask``: transformers then sees positions restarting, treats the row as
packed sequences and masks across them (``masking_utils.find_packed_sequence_indices``
for sdpa/eager; varlen for flash-attention, as ``DataCollatorWithFlattening`` relies on).

How attention is computed:

* CUDA, half-precision q/k/v (autocast bf16 or bf16 parameters), no attention dropout:
  ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) on the batch
  flattened to one sequence cut at every document start; no mask, work and memory
  O(sum of document lengths squared).
* Otherwise SDPA with a dense ``[B, 1, T, T]`` block-diagonal causal mask: O(T^2)
  memory, and CUDA's flash kernel takes no mask. That is fine on CPU (tests, smoke
  runs); on CUDA it is said once per process, with the reason, on the log.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # torch >= 2.9; older versions fall back to the dense mask (and say so on CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

log = logging.getLogger(__name__)
VARLEN_DEVICES = ("cuda",)  # where varlen_attn has a kernel (FlashAttention; half precision only)


@dataclass
class Documents:
    """Where the documents of a batch of windows are, as the attention needs it."""
    positions: torch.Tensor          # [B, T] each token's position inside its document
    ids: torch.Tensor                # [B, T] which document of its row a token belongs to
    cu_seqlens: torch.Tensor | None  # int32 [n_docs + 1]: document starts in the flattened batch (varlen)
    max_len: int                     # longest document (varlen)


def find_documents(idx: torch.Tensor, eot_id: int) -> Documents:
    """The documents of ``idx`` [B, T]: a new one starts at each row's first token and after every EOT."""
    B, T = idx.shape
    starts = torch.ones_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot_id
    t = torch.arange(T, device=idx.device).expand(B, T)
    positions = t - torch.where(starts, t, 0).cummax(dim=1).values  # distance to the latest start
    cu_seqlens, max_len = None, 0
    if idx.device.type in VARLEN_DEVICES and varlen_attn is not None:
        first = starts.flatten().nonzero().squeeze(1)
        cu_seqlens = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
        max_len = int(cu_seqlens.diff().max())  # an int for the kernel: one device sync per forward
    return Documents(positions, starts.cumsum(dim=1), cu_seqlens, max_len)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents, dropout_p: float) -> torch.Tensor:
    """Causal attention within documents; q, k, v and the result are [B, H, T, hd]."""
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    if docs.cu_seqlens is not None and dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0:
        return _varlen(q.to(dtype), k.to(dtype), v.to(dtype), docs)
    if q.is_cuda:
        if varlen_attn is None:
            _say_dense_once(f"torch {torch.__version__} has no varlen_attn")
        else:
            _say_dense_once("attention dropout is on" if dropout_p else f"q/k/v are {dtype}, varlen needs fp16/bf16")
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = (docs.ids[:, None, :, None] == docs.ids[:, None, None, :]) & causal  # [B, 1, T, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """The B rows as one sequence of B*T tokens: documents never cross rows (every row starts one)."""
    B, H, T, hd = q.shape
    flat = [x.transpose(1, 2).reshape(B * T, H, hd) for x in (q, k, v)]
    y = varlen_attn(*flat, docs.cu_seqlens, docs.cu_seqlens, docs.max_len, docs.max_len, window_size=(-1, 0))
    return y.view(B, T, H, hd).transpose(1, 2)


@functools.cache
def _say_dense_once(reason: str) -> None:
    log.warning("bigtrain: doc_mask on CUDA uses a dense [B, 1, T, T] attention mask (O(T^2) memory, "
                "no flash kernel): %s", reason)
