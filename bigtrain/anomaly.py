"""Where did the NaN come from? (``stability.trace_anomalies: true``; off by default.)

After a step whose loss or gradient was not finite (the guard has already refused its
update, so the model is still the one that produced it), every rank re-runs its
micro-batches of that step and watches:

* **forward**: a hook on every module checks the module's output; the first module
  whose output is not finite, in execution order, is named (e.g. ``blocks.1.mlp``).
  Hooks fire innermost first, so this is the smallest module where it appeared.
* **backward**, when the forward was clean: the autograd graph of the loss is walked
  and a hook put on every node; the first node that turns finite incoming gradients
  into non-finite ones is named (e.g. ``SqrtBackward0``), together with the line of
  forward code that created it (recorded by anomaly mode).

This is what ``torch.autograd.detect_anomaly`` reports, done without raising: an
exception in one rank's backward would leave the other ranks waiting in FSDP's
collectives. Every rank runs the same micro-batches to the end, the findings are
gathered, and rank 0 logs the first one (lowest rank, earliest micro-batch) and
appends ``{"event": "trace", "step", "module", "op", ...}`` to the ledger. Parameters
that are already non-finite are listed too. If the re-run is finite, the anomaly did
not reproduce: a transient fault (or one injected after the backward), as Megatron's
re-run logic would conclude. RNG states are restored, so tracing does not change
the rest of the run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from bigtrain.ledger import Ledger
from bigtrain.parallel.backend import Backend
from bigtrain.parallel.env import DistEnv, rng_state, set_rng_state
from bigtrain.parallel.vocab_parallel import EXCHANGE_OPS


def _nonfinite(*values) -> bool:
    """Whether any floating tensor among ``values`` holds a NaN/inf (of a sparse one, its values:
    a tied model's token lookup hands back a sparse gradient on the CPU, GPT.sparse_lookup_grad)."""
    return any(isinstance(t, torch.Tensor) and t.is_floating_point()
               and not bool(torch.isfinite(t._values() if t.is_sparse else t).all())
               for t in tree_leaves(values))


def _graph(root) -> list:
    """Every autograd node reachable from ``root``."""
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


def _forward_line(node) -> str | None:
    """The innermost frame of the forward code that created ``node`` (anomaly mode records it)."""
    frames = node.metadata.get("traceback_") or []
    return frames[-1].strip() if frames else None


class AnomalyTracer:
    def __init__(self, backend: Backend, env: DistEnv, ledger: Ledger, log, micro_size: int):
        self.backend, self.env, self.ledger, self.log, self.micro_size = backend, env, ledger, log, micro_size

    def trace(self, step: int, batch) -> dict:
        """Re-run ``batch`` (this rank's rows) and record where it first went non-finite."""
        saved = rng_state()
        try:
            local = self._rerun(batch)
        finally:
            self.backend.discard()
            set_rng_state(saved)
        found = self._gather(local)
        if found.get("module"):
            where = f"forward: first non-finite output from module {found['module']}"
        elif found.get("op"):
            where = f"backward: first non-finite gradient from {found['op']} (forward: {found.get('line')})"
        else:
            where = "not reproduced: the re-run was finite (a transient fault?)"
        bad = f"; non-finite parameters: {', '.join(found['params'][:5])}" if found.get("params") else ""
        rank = f" on rank {found['rank']}" if self.env.distributed and "rank" in found else ""
        self.log(f"step {step}: anomaly trace{rank}: {where}{bad}")
        return self.ledger.record("trace", step, module=found.get("module"), op=found.get("op"),
                                  line=found.get("line"), micro_batch=found.get("micro_batch"),
                                  rank=found.get("rank"), params=found.get("params", []),
                                  reproduced=bool(found.get("module") or found.get("op")))

    def _rerun(self, batch) -> dict:
        model = self.backend.raw_model
        found: dict = {"params": [n for n, p in model.named_parameters()
                                  if _nonfinite(p.to_local() if isinstance(p, DTensor) else p.detach())]}
        current: dict = {}

        def forward_hook(name):
            def hook(module, args, output):
                if "module" not in current and _nonfinite(output):
                    current["module"] = name
            return hook

        def node_hook(node):
            def hook(grad_inputs, grad_outputs):
                if "op" not in current and _nonfinite(grad_inputs) and not _nonfinite(grad_outputs):
                    current.update(op=node.name(), line=_forward_line(node))
            return hook

        handles = [m.register_forward_hook(forward_hook(n)) for n, m in model.named_modules() if n]
        micro = list(batch.micro_batches(self.micro_size))
        scale = 1.0 / batch.tokens[:, 1:].numel()
        try:
            for i, (inputs, targets) in enumerate(micro):
                current.clear()
                with torch.autograd.set_detect_anomaly(True, check_nan=False):  # records forward lines
                    ce_sum, z_sum = self.backend.loss_terms(inputs, targets)
                    loss = (ce_sum + z_sum) * scale
                if "module" not in current and _nonfinite(loss):
                    current["module"] = "loss"
                nodes = _graph(loss.grad_fn) if "module" not in current and loss.grad_fn else []
                node_handles = [node.register_hook(node_hook(node)) for node in nodes]
                try:
                    # every rank runs every backward: FSDP's collectives match
                    self.backend.backward(loss, last=i == len(micro) - 1)
                finally:
                    for h in node_handles:
                        h.remove()
                if ("module" in current or "op" in current) and "micro_batch" not in found:
                    found.update(current, micro_batch=i)
        finally:
            for h in handles:
                h.remove()
        return found

    def _gather(self, local: dict) -> dict:
        """The first rank's finding that names a module (forward comes first), else an op, else
        rank 0's; with every rank's bad parameters. An op that exchanges values between ranks
        (the token table on its shards, bigtrain/parallel/vocab_parallel.py) spreads one rank's
        non-finite gradient to the others, so another rank's own op is named before it."""
        if not self.env.distributed:
            return local
        everyone = [None] * self.env.world
        dist.all_gather_object(everyone, {**local, "rank": self.env.rank})
        params = sorted({p for f in everyone for p in f["params"]})
        named = ([f for f in everyone if f.get("module")]
                 or [f for f in everyone if f.get("op") and f["op"] not in EXCHANGE_OPS]
                 or [f for f in everyone if f.get("op")])
        return {**(named[0] if named else everyone[0]), "params": params}
