"""``bigtrain <command>``: the commands users type (README.md describes each).

Each command is a small function; heavy imports happen inside it so that
``bigtrain --help`` is instant. Bad input anywhere (config, data, checkpoint,
command line) is a :class:`ConfigError`: one line on stderr, exit status 2,
before any process group starts and before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys

from bigtrain.config import ConfigError


def cmd_prepare(args) -> int:
    from bigtrain.data import prepare as p
    cut = {"val_fraction": args.val_fraction, "shard_tokens": args.shard_tokens, "overwrite": args.overwrite}
    if args.slice and args.merge:
        raise ConfigError("--slice and --merge are two steps: run the slices first, then --merge")
    if args.slice:
        index, _, count = args.slice.partition("/")
        if not (index.isdigit() and count.isdigit()):
            raise ConfigError(f"--slice {args.slice!r}: expected I/N, e.g. 3/16")
        part = p.prepare_slice(args.source, args.tokenizer, args.out, int(index), int(count),
                               overwrite=args.overwrite, strict=args.strict, workers=args.workers)
        print(f"prepared slice {args.slice} of {args.source!r} into {part['path']} "
              f"({part['documents']:,} documents, {part['tokens']:,} tokens)")
        return 0
    if args.merge:
        manifest = p.merge(args.source, args.tokenizer, args.out, **cut)
    else:
        manifest = p.prepare(args.source, args.tokenizer, args.out, strict=args.strict, workers=args.workers, **cut)
    print(p.summary(args.out, manifest))
    return 0


def cmd_train(args) -> int:
    from bigtrain.config import config_from_args
    return train(config_from_args(args.config))  # before importing torch: a bad config is answered at once


def cmd_anneal(args) -> int:
    from bigtrain.anneal import anneal_config
    from bigtrain.config import split_args
    files, overrides = split_args(args.config, require_file=False)
    cfg = anneal_config(args.source, args.step, args.out, args.decay_steps, files, overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    return train(cfg)


def train(cfg) -> int:
    """``bigtrain train`` (and ``anneal``) once the config is known: checks, then the run."""
    from bigtrain.checkpoint import select as select_checkpoint
    from bigtrain.data.splits import check_world, open_splits
    from bigtrain.parallel.backend import backend_class
    from bigtrain.parallel.env import fail_fast, init_distributed, process_layout, shutdown, world_size
    from bigtrain.rundir import check as check_run_dir
    from bigtrain.stability.guard import StabilityAbort
    from bigtrain.trainer import Trainer

    if not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path {cfg.data.path!r} does not exist; run `bigtrain prepare` first")
    check_world(cfg, world_size())
    splits = open_splits(cfg)  # verifies the shards before any process group starts
    check_run_dir(cfg.run_dir, alone=world_size() == 1)  # a file, STOP a directory, a live RUN_DIR/LOCK
    # a bad checkpoint stops here too; rank 0 reads every byte, the others check the files
    select_checkpoint(cfg, world_size(), verify=process_layout()[0] == 0, reader=backend_class(cfg.parallel.backend))
    env = init_distributed(cfg.parallel.device, group=cfg.parallel.backend != "none")
    try:
        with fail_fast(env):  # an exception on one rank ends the whole job now, not at a timeout
            trainer = Trainer(cfg, env, splits)
            try:
                trainer.fit()
            except StabilityAbort as e:  # every rank reaches it; say it once
                if env.is_main:
                    print(str(e), file=sys.stderr)
                return e.exit_code
            finally:
                trainer.close()
        if env.is_main:
            print(f"run: {cfg.run_dir}\ntensorboard: tensorboard --logdir {os.path.join(cfg.run_dir, 'tb')}")
    finally:
        shutdown()
    return 0


def cmd_launch(args) -> int:
    from bigtrain.config import split_args
    from bigtrain.launch import Topology, launch
    files, overrides = split_args(args.config)
    topo = Topology(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint)
    return launch(files, overrides, topo, args.launcher, args.dry_run)


def cmd_export(args) -> int:
    from bigtrain.export import export
    out = export(args.run_dir, args.out or os.path.join(args.run_dir, "export"), args.step, args.tokenizer,
                 args.overwrite, args.ema)
    print(f"exported to {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def cmd_inspect(args) -> int:
    import json

    from bigtrain.inspect import format_report, inspect_step
    report = inspect_step(args.run_dir, args.step, args.data, args.chars)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_bisect(args) -> int:
    import json

    from bigtrain.inspect import bisect_step, format_bisect
    report = bisect_step(args.run_dir, args.step, args.data, args.chars)
    print(json.dumps(report) if args.json else format_bisect(report))
    return 0


def cmd_preflight(args) -> int:
    import json

    from bigtrain.config import config_from_args
    cfg = config_from_args(args.config)  # before importing torch, as in cmd_train

    from bigtrain.preflight import run_preflight
    if not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path {cfg.data.path!r} does not exist; run `bigtrain prepare` first")
    report = run_preflight(cfg, num_samples=args.samples, overfit_steps=args.overfit_steps,
                           overfit_target=args.overfit_target, lr_range=args.lr_range,
                           lr_range_steps=args.lr_range_steps)
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0 if report.passed else 1


def cmd_plan(args) -> int:
    import json

    from bigtrain.config import config_from_args
    from bigtrain.plan import plan
    result = plan(config_from_args(args.config), args.gpus, args.gpu, args.mfu)
    print(json.dumps({k: v for k, v in result.items() if k != "text"}) if args.json else result["text"])
    return 0


def cmd_report(args) -> int:
    from bigtrain.report import draw_report
    drawn = draw_report(args.run_dir, args.out)
    for path in drawn["files"]:
        print(path)
    return 0


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="config files, later ones win (each may name a `base:` file), then key=value "
                        "overrides, which win over every file, e.g. optim.lr=3e-4")


def add_step_args(p: argparse.ArgumentParser) -> None:
    """What `inspect` and `bisect` share: a run directory and one of its steps."""
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--data", help="the prepared data dir, if it moved since the run")
    p.add_argument("--chars", type=int, default=80, help="characters of text per sample; 0: all")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Pretrain GPT-style language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into shards (on one machine, or in slices and a merge)")
    p.add_argument("--source", required=True, help="stdlib | PATH | GLOB | DIR (of parquet/JSONL) | "
                                                   "hf:PATH (a local dataset); .gz/.zst text and JSONL too")
    p.add_argument("--tokenizer", required=True, help="bytes | char | bpe:N | DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="tokenizing processes (default: every core this process may use)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="the last documents held out as val")
    p.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict", action="store_true", help="refuse bytes that are not UTF-8 and rows without text")
    p.add_argument("--slice", metavar="I/N", help="tokenize only slice I of N of the source's files, into "
                                                 "OUT.parts/ (one task of slurm/prepare.sbatch)")
    p.add_argument("--merge", action="store_true", help="cut every slice's part in OUT.parts/ into OUT, as one "
                                                       "machine would have written it, then remove OUT.parts")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train from a YAML config (one process, or under torchrun/deepspeed)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("anneal", help="a new run that decays the LR (wsd) from a stable checkpoint of another "
                                      "run, with its weights, optimizer and data position")
    p.add_argument("source", help="the stable run's directory, or one of its checkpoint directories")
    p.add_argument("--step", type=int, help="its checkpoint of this step (default: the newest)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--decay-steps", type=int, required=True, help="updates in the decay; the run ends at step + this")
    p.add_argument("--print-config", action="store_true",
                   help="print the anneal's config (YAML) instead of training, e.g. for `bigtrain launch`")
    p.add_argument("config", nargs="*", metavar="CONFIG.yaml|key=value",
                   help="files and overrides over the source run's config, e.g. schedule.decay_shape=linear")
    p.set_defaults(func=cmd_anneal)

    p = sub.add_parser("launch", help="print and run the torchrun or deepspeed command for a config; "
                                      "exit 3 when the run aborted (RUN_DIR/ABORTED)")
    add_config_args(p)
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes per node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, help="this node's rank (needed by the deepspeed launcher)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT on the first node; needed with --nnodes > 1")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], help="default: by parallel.backend")
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model (safetensors + tokenizer)")
    p.add_argument("run_dir", help="a run directory (its newest checkpoint) or one checkpoint directory")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--out", help="default: RUN_DIR/export")
    p.add_argument("--tokenizer", help="a prepared data dir whose tokenizer to ship (default: the run's data.path)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--ema", action="store_true", help="export the EMA of the weights (runs with ema.decay > 0)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="decode the samples a step trained on")
    add_step_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bisect", help="score a step's samples under the checkpoint before it and name the "
                                      "ones that made it spike (the culprits)")
    add_step_args(p)
    p.set_defaults(func=cmd_bisect)

    p = sub.add_parser("preflight", help="check data, parameters, initial loss and one-batch overfitting "
                                         "before a run (exit 1 when a check fails)")
    add_config_args(p)
    p.add_argument("--samples", type=int, default=3, help="samples of the first batch to decode")
    p.add_argument("--overfit-steps", type=int, default=150)
    p.add_argument("--overfit-target", type=float, default=0.1,
                   help="the one-batch loss must fall below this fraction of ln(vocab)")
    p.add_argument("--lr-range", action="store_true", help="also run an LR range test")
    p.add_argument("--lr-range-steps", type=int, default=100)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("plan", help="per-GPU memory, tokens/s and days for a config on N GPUs, and a "
                                    "tp, micro-batch and checkpointing policy that fit")
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run: parallel.tp x data-parallel ranks")
    p.add_argument("--gpu", default="H100", help="H100 [PCIe|NVL], H200, A100 [40GB], L40S, L4, A10G, V100")
    p.add_argument("--mfu", type=float, default=0.4, help="the MFU to estimate time at")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="PNG plots of a finished or running run, with its ledger's events")
    p.add_argument("run_dir")
    p.add_argument("--out", help="where to write the PNGs (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    # deepspeed's launcher appends --local_rank=N; everything else unknown is an error.
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if hasattr(args, "config"):  # argparse hands back files and key=value given after an option
        args.config += [u for u in unknown if not u.startswith("-")]
        unknown = [u for u in unknown if u.startswith("-")]
    if unknown:
        print(f"bigtrain: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
