"""How fast `bigtrain prepare` tokenizes with 1 and N worker processes, against the tokenizer itself.

    python bench/prepare.py [--source stdlib|shakespeare|PATH] [--tokenizer bpe:8192] [--workers N]
                            [--repeats 3] [--full] [--memory]

Prints one JSON object; every time is the median of ``--repeats`` runs (the machine may be
shared: the load average is reported too, and CPU seconds, which load does not inflate).

- ``tokenizer_mb_s``: the raw ``tokenizers`` rate, ``Tokenizer.encode_batch_fast`` in one
  thread (TOKENIZERS_PARALLELISM=false, as in prepare's workers, each of which is one
  thread) on the same documents in the same batches as prepare's units; ``tokenizer_ids_mb_s``
  adds what prepare needs besides (the ids as lists: bigtrain's ``Tokenizer.encode_batch``).
- ``prepare_mb_s``: MB of source text per second of prepare's tokenize + write + cut, for 1
  and N workers; the tokenizer is trained once beforehand (BPE training is the ``tokenizers``
  library's own, in one process; ``--full`` adds ``full_prepare_s``, the whole command).
- ``of_n_tokenizers``: prepare_mb_s[N] / (N x tokenizer_mb_s), goal >= 0.85;
  ``speedup``: prepare_mb_s[N] / prepare_mb_s[1], goal >= 1.7 at N = 2.
- ``cpu``: the same figures from CPU seconds (what they would be with a core per process),
  for a machine that others share: there, wall times measure the neighbours as much as prepare.
- ``--memory``: peak RSS of prepare's main process and of its largest worker (bytes tokenizer,
  N workers) on the source as JSONL.zst, once as is and once 4 times over: flat, not 4x.

``--source shakespeare`` is ../shared/data/tinyshakespeare.txt as JSONL, one paragraph per
document (as one text file it is a single document, which one worker tokenizes alone).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, here and in the workers

from bigtrain.data.encode import default_workers  # noqa: E402
from bigtrain.data.parts import cut, read_parts  # noqa: E402
from bigtrain.data.prepare import prepare, write_part  # noqa: E402
from bigtrain.data.sources import open_source  # noqa: E402
from bigtrain.data.units import UNIT_BYTES  # noqa: E402
from bigtrain.data.tokenizer import build_tokenizer  # noqa: E402
from common import SHAKESPEARE  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU of this process, and of its finished children (prepare's workers)."""
    return tuple(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def measured(fn, repeats: int) -> dict:
    walls, mains, workers = [], [], []
    for _ in range(repeats):
        c, t = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        after = cpu_seconds()
        mains.append(after[0] - c[0])
        workers.append(after[1] - c[1])
    return {"wall_s": statistics.median(walls), "walls": walls, "main_cpu_s": statistics.median(mains),
            "workers_cpu_s": statistics.median(workers)}


def cpu_bound_rate(mb: float, run: dict, workers: int) -> float:
    """MB/s if every process had a core of its own: the busiest of the main process and the
    workers (their CPU shared evenly; units are small, so they are) sets the pace."""
    if workers == 1:
        return mb / run["main_cpu_s"]
    return mb / max(run["main_cpu_s"], run["workers_cpu_s"] / workers)


def batches(texts: list[str]) -> list[list[str]]:
    """The documents grouped as prepare's units group them (about UNIT_BYTES each)."""
    out, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= UNIT_BYTES:
            out.append(batch)
            batch, size = [], 0
    return out + [batch] if batch else out


def shakespeare_jsonl(tmp: Path) -> str:
    path = tmp / "shakespeare.jsonl"
    paragraphs = SHAKESPEARE.read_text().split("\n\n")
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return str(path)


def tokenize_once(src, tok, workers: int, tmp: Path) -> None:
    run = Path(tempfile.mkdtemp(dir=tmp))
    (run / "part").mkdir()
    write_part(src, tok, run / "part", 0, 1, workers)
    cut(read_parts([run / "part"]), run, 0.005, 2**27, consume=True)


def rss(source: str, workers: int) -> dict:
    """Run prepare in a fresh process; its peak RSS and its largest worker's, in MB."""
    code = ("import json, resource, sys, tempfile\n"
            "from bigtrain.data.prepare import prepare\n"
            "if __name__ == '__main__':\n"
            "    with tempfile.TemporaryDirectory() as d:\n"
            f"        prepare({source!r}, 'bytes', d + '/out', workers={workers})\n"
            "    kb = [resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
            "    print(json.dumps({'main_mb': kb[0] / 1024, 'worker_mb': kb[1] / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout)


def memory(texts: list[str], workers: int, tmp: Path) -> dict:
    import zstandard
    result = {}
    for times in (1, 4):
        path = tmp / f"corpus-x{times}.jsonl.zst"
        with zstandard.ZstdCompressor().stream_writer(open(path, "wb")) as f:
            for _ in range(times):
                for t in texts:
                    f.write((json.dumps({"text": t}) + "\n").encode())
        result[f"x{times}"] = {"source_mb": sum(len(t.encode()) for t in texts) * times / 1e6, **rss(str(path), workers)}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="stdlib")
    p.add_argument("--tokenizer", default="bpe:8192")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also time the whole prepare, tokenizer training included")
    p.add_argument("--memory", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        source = shakespeare_jsonl(tmp) if args.source == "shakespeare" else args.source
        load_before = os.getloadavg()[0]
        src = open_source(source)
        texts = list(src.texts())
        mb = sum(len(t.encode()) for t in texts) / 1e6
        full = {w: measured(lambda: prepare(source, args.tokenizer, str(tmp / "full"), workers=w, overwrite=True),
                            1)["wall_s"] for w in sorted({1, args.workers})} if args.full else {}
        tok = build_tokenizer(args.tokenizer, src.texts)
        units = batches(texts)
        rust = getattr(tok, "tok", None)
        raw = measured(lambda: [rust.encode_batch_fast(b, add_special_tokens=False) for b in units],
                       args.repeats) if rust is not None and hasattr(rust, "encode_batch_fast") else None
        ids = measured(lambda: [tok.encode_batch(b) for b in units], args.repeats)
        runs = {w: measured(lambda: tokenize_once(src, tok, w, tmp), args.repeats) for w in sorted({1, args.workers})}
        n = args.workers
        rate = {w: mb / r["wall_s"] for w, r in runs.items()}
        tok_rate = mb / (raw or ids)["wall_s"]
        tok_cpu = (raw or ids)["main_cpu_s"]
        cpu_rate = {w: cpu_bound_rate(mb, r, w) for w, r in runs.items()}
        result = {
            "source": args.source, "tokenizer": args.tokenizer, "source_mb": round(mb, 2), "documents": len(texts),
            "units": len(units), "workers": n, "cores": os.cpu_count(), "repeats": args.repeats,
            "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
            "tokenizer_mb_s": round(tok_rate, 3),
            "tokenizer_ids_mb_s": round(mb / ids["wall_s"], 3),
            "prepare_mb_s": {w: round(r, 3) for w, r in rate.items()},
            "of_n_tokenizers": round(rate[n] / (n * tok_rate), 3),
            "speedup": round(rate[n] / rate[1], 3),
            # the same from CPU seconds, which a shared machine's load does not inflate as much
            "cpu": {"tokenizer_s": round(tok_cpu, 2),
                    **{f"prepare_{w}": {"main_s": round(r["main_cpu_s"], 2), "workers_s": round(r["workers_cpu_s"], 2)}
                       for w, r in runs.items()},
                    "tokenizer_mb_s": round(mb / tok_cpu, 3),
                    "prepare_mb_s": {w: round(r, 3) for w, r in cpu_rate.items()},
                    "of_n_tokenizers": round(cpu_rate[n] / (n * mb / tok_cpu), 3),
                    "speedup": round(cpu_rate[n] / cpu_rate[1], 3)},
            "full_prepare_s": {w: round(s, 2) for w, s in full.items()},
            "walls_s": {"tokenizer": [round(x, 2) for x in (raw or ids)["walls"]],
                        **{f"prepare_{w}": [round(x, 2) for x in r["walls"]] for w, r in runs.items()}},
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        if args.memory:
            result["memory"] = memory(texts, n, tmp)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
