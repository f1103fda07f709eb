"""``python -m bigtrain``: the CLI, and how one rank of a multi-process job leaves.

A rank of a job of several processes (``WORLD_SIZE`` > 1: torchrun, deepspeed, srun) leaves
with ``os._exit`` once the CLI has returned. By then the run has closed its files, committed
its checkpoint and destroyed the process group (:func:`bigtrain.parallel.env.shutdown`); what
the interpreter's teardown would still do is free torch's distributed objects in whatever
order it finds them. A finished gloo rank aborted at exit now and then ("terminate called
without an active exception", SIGABRT: 1 of 120 two-rank runs of the smoke config here), and
the launcher then reports a successful job as failed. Where inside torch is not pinned down;
PyTorch's tracker describes the pattern (gloo work objects freed during interpreter
finalization), which this exit skips. Error paths end the same way, earlier
(:func:`bigtrain.parallel.env.fail_fast`).
"""
import os
import sys

from bigtrain.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
