"""GPU readiness: the smoke config, gpt2-124m and llama-1b for a few dozen steps each on one
CUDA device, compile off and on, tensor parallelism 1; tokens/s, MFU and peak memory as JSON.

    bash bench/gpu.sh            # on the GPU machine (sets up imports, then runs this)
    python bench/gpu.py [--steps 30] [--out FILE]

Each model trains through the real entry point (``bigtrain train``) on the built-in stdlib
corpus, prepared once with a 32k byte-level BPE (nothing is downloaded), one micro-batch
per step so a step is one forward/backward at the config's micro-batch size and context.
Figures are medians over the logged steps after the first ``--skip`` (compile and
allocator warm-up), read back from each run's ``metrics.jsonl``; the MFU's peak is the
one the run's log names (bigtrain/peak.py). A run that fails (out of memory, a compile
error) is reported with its last line instead of stopping the others.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: (config, overrides): one micro-batch per step at each config's shape
    "smoke": ("configs/smoke.yaml", ["batch.global_size=16", "batch.micro_size=16"]),
    "gpt2-124m": ("configs/gpt2-124m.yaml", ["batch.global_size=16", "batch.micro_size=16"]),
    "llama-1b": ("configs/llama-1b.yaml", ["batch.global_size=8", "batch.micro_size=8"]),
}


def prepare(data: Path) -> None:
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "bigtrain", "prepare", "--source", "stdlib",
                        "--tokenizer", "bpe:32000", "--out", str(data)], check=True)


def train(name: str, compile_: bool, data: Path, work: Path, steps: int, skip: int, device: str) -> dict:
    config, extra = RUNS[name]
    run_dir = work / f"{name}-compile{int(compile_)}"
    overrides = [f"run_dir={run_dir}", f"data.path={data}", "model.vocab_size=auto", f"schedule.max_steps={steps}",
                 "schedule.warmup_steps=0", "logging.every=1", "logging.progress=plain", "logging.tensorboard=false",
                 "eval.batches=0", "checkpoint.every=0", "checkpoint.resume=never", "parallel.backend=none",
                 f"parallel.device={device}", f"parallel.compile={str(compile_).lower()}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", config, *overrides],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {tail[0]}", "wall_s": round(wall, 1)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > skip]
    peak_line = next((line for line in proc.stdout.splitlines() if line.startswith("mfu:")), "")
    return {
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows)),
        "mfu": round(statistics.median(r["mfu"] for r in rows), 4),
        "peak_memory_gb": round(max(r.get("memory_gb", 0.0) for r in rows), 2),
        "final_loss": round(rows[-1]["loss"], 4),
        "wall_s": round(wall, 1),  # compile time included
        "peak": peak_line.removeprefix("mfu: peak per device from "),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the medians (warm-up, compile)")
    ap.add_argument("--models", default=",".join(RUNS))
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a machine without a GPU")
    args = ap.parse_args()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine")
    work = Path(tempfile.mkdtemp(prefix="bigtrain-gpu-"))
    data = Path(os.environ.get("BIGTRAIN_GPU_DATA", work / "data"))
    prepare(data)
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "steps": args.steps}
    for name in args.models.split(","):
        for compile_ in (False, True):
            out[f"{name}/compile={'on' if compile_ else 'off'}"] = train(name, compile_, data, work, args.steps, args.skip, args.device)
            print(json.dumps({name: out[f"{name}/compile={'on' if compile_ else 'off'}"]}), file=sys.stderr, flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
