"""Checkpoints: the on-disk format and its checks (:mod:`.format`), DCP reads and
writes (:mod:`.dcp_io`), a directory's lifecycle on disk (:mod:`.lifecycle`), the
:class:`Checkpointer` that saves and loads a run's parts (:mod:`.checkpointer`), and
which checkpoint to resume plus reading a model out of one (:mod:`.resume`)."""
from bigtrain.checkpoint.checkpointer import Checkpointer, Resumed
from bigtrain.checkpoint.format import committed, problem, step_dir
from bigtrain.checkpoint.resume import find, load_model, select

__all__ = ["Checkpointer", "Resumed", "committed", "find", "load_model", "problem", "select", "step_dir"]
