"""How fast `bigtrain prepare` tokenizes with 1 and N worker processes, against the tokenizer itself.

    python bench/prepare.py [--source stdlib|shakespeare|PATH] [--tokenizer bpe:8192] [--workers N]
                            [--repeats 3] [--memory]

Prints one JSON object. The tokenizer is made once (BPE training is the ``tokenizers``
library's own, serial, and not what is measured) and saved; then each measurement runs
in a fresh process that loads it from disk, as prepare's workers do, interleaved
(tokenizer, 1 worker, N workers, tokenizer, ...) so that a busy neighbour hurts each
alike; figures are medians of ``--repeats``. The load average is reported: on a shared
machine wall times measure the neighbours too, so CPU seconds are reported as well. Where
the kernel groups processes by session (``autogroup``, reported), a session's processes
share one fair share of the cores however many there are: with other sessions busy, N
workers cannot be faster than one in wall time, and only the CPU figures tell.

- ``tokenizer_mb_s``: the raw ``tokenizers`` rate, ``Tokenizer.encode_batch_fast`` in one
  thread (TOKENIZERS_PARALLELISM=false, as in prepare's workers, which are one thread each)
  on the same documents in the same batches as prepare's units, text already in memory.
- ``prepare_mb_s``: MB of source text per second of prepare's read + tokenize + write +
  cut (``write_part`` and ``cut``: all of ``prepare`` but the tokenizer's training), for
  1 and N workers.
- ``of_n_tokenizers``: prepare_mb_s[N] / (N x tokenizer_mb_s), goal >= 0.85;
  ``speedup``: prepare_mb_s[N] / prepare_mb_s[1], goal >= 1.7 at N = 2.
- ``cpu``: the same from CPU seconds, as if each process had a core of its own: the
  busiest of the main process and the workers (their CPU shared evenly) sets the pace.
- ``--memory``: peak RSS of prepare's main process and of its largest worker (bytes
  tokenizer, N workers) on the source as one JSONL.zst file, as is and 4 times over.

``--source shakespeare`` is ../shared/data/tinyshakespeare.txt as JSONL, one paragraph per
document (as one text file it is one document, which one worker tokenizes alone).
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
from bigtrain.data.tokenizer import build_tokenizer, load_tokenizer  # noqa: E402
from bigtrain.data.units import UNIT_BYTES  # noqa: E402
from common import SHAKESPEARE  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU of this process, and of its finished children (prepare's workers)."""
    return tuple(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(fn) -> dict:
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - t, cpu_seconds()
    return {"wall_s": wall, "main_cpu_s": after[0] - c[0], "workers_cpu_s": after[1] - c[1]}


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


def run_one(what: str, source: str, tok_dir: str, tmp: str) -> dict:
    """One measurement, in this (fresh) process: ``raw`` or ``prepare-W``."""
    tok, src = load_tokenizer(tok_dir), open_source(source)
    if what == "raw":
        units = batches(list(src.texts()))
        rust = {"bpe": lambda: tok.tok, "hf": lambda: tok.tok.backend_tokenizer}.get(tok.kind, lambda: None)()
        encode = ((lambda b: rust.encode_batch_fast(b, add_special_tokens=False)) if rust is not None
                  else tok.encode_batch)  # bytes, char: bigtrain's own encoders are what prepare runs
        return timed(lambda: [encode(b) for b in units])
    workers = int(what.split("-")[1])
    run = Path(tempfile.mkdtemp(dir=tmp))

    def once():
        (run / "part").mkdir()
        write_part(src, tok, run / "part", 0, 1, workers)
        cut(read_parts([run / "part"]), run, 0.005, 2**27, consume=True)
    return timed(once)


def measure(what: str, source: str, tok_dir: Path, tmp: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--run", what, "--source", source, "--tok", str(tok_dir),
                          "--tmp", str(tmp)], capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout)


def rss(source: str, workers: int) -> dict:
    """Run prepare in a fresh process; its peak RSS and its largest worker's, in MB."""
    code = ("import json, resource, sys, tempfile\n"
            "from bigtrain.data.prepare import prepare\n"
            "if __name__ == '__main__':\n"
            "    with tempfile.TemporaryDirectory() as d:\n"
            f"        prepare({source!r}, 'bytes', d + '/out', workers={workers})\n"
            "    kb = [resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
            "    print(json.dumps({'main_mb': kb[0] / 1024, 'worker_mb': kb[1] / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=3600)
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
        mb = sum(len(t.encode()) for t in texts) * times / 1e6
        result[f"x{times}"] = {"source_mb": round(mb, 1), **rss(str(path), workers)}
    return result


def shakespeare_jsonl(tmp: Path) -> str:
    path = tmp / "shakespeare.jsonl"
    paragraphs = SHAKESPEARE.read_text().split("\n\n")
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="stdlib")
    p.add_argument("--tokenizer", default="bpe:8192")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    p.add_argument("--tok", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.source, args.tok, args.tmp)))
        return
    n = args.workers
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        source = shakespeare_jsonl(tmp) if args.source == "shakespeare" else args.source
        load = [os.getloadavg()[0]]
        src = open_source(source)
        texts = list(src.texts())
        mb = sum(len(t.encode()) for t in texts) / 1e6
        build_tokenizer(args.tokenizer, src.texts).save(tmp / "tok")
        kinds = ["raw", "prepare-1", f"prepare-{n}"] if n > 1 else ["raw", "prepare-1"]
        runs = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for k in kinds:
                runs[k].append(measure(k, source, tmp / "tok", tmp))
        load.append(os.getloadavg()[0])
        med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
        wall = {k: mb / m["wall_s"] for k, m in med.items()}
        cpu = {k: mb / max(m["main_cpu_s"], m["workers_cpu_s"] / int(k.split("-")[1]) if "-" in k else 0)
               for k, m in med.items()}
        result = {
            "source": args.source, "tokenizer": args.tokenizer, "source_mb": round(mb, 2),
            "documents": len(texts), "units": len(batches(texts)), "workers": n, "cores": len(os.sched_getaffinity(0)),
            "repeats": args.repeats, "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
            "tokenizer_mb_s": round(wall["raw"], 3),
            "prepare_mb_s": {k.split("-")[1]: round(v, 3) for k, v in wall.items() if k != "raw"},
            "of_n_tokenizers": round(wall[f"prepare-{n}"] / (n * wall["raw"]), 3),
            "speedup": round(wall[f"prepare-{n}"] / wall["prepare-1"], 3),
            "cpu": {"tokenizer_mb_s": round(cpu["raw"], 3),
                    "prepare_mb_s": {k.split("-")[1]: round(v, 3) for k, v in cpu.items() if k != "raw"},
                    "of_n_tokenizers": round(cpu[f"prepare-{n}"] / (n * cpu["raw"]), 3),
                    "speedup": round(cpu[f"prepare-{n}"] / cpu["prepare-1"], 3),
                    "seconds": {k: {f: round(v, 2) for f, v in m.items() if f != "wall_s"} for k, m in med.items()}},
            "walls_s": {k: [round(r["wall_s"], 2) for r in rs] for k, rs in runs.items()},
            "load_average": [round(x, 2) for x in load],
            "autogroup": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
            if Path("/proc/sys/kernel/sched_autogroup_enabled").exists() else None,
        }
        if args.memory:
            result["memory"] = memory(texts, n, tmp)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
