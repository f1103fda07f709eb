"""A checkpoint directory's life on disk: commit, replace, retire, abandon, recover.

Every operation here is done by one process (rank 0) and is built from renames
inside ``RUN_DIR/checkpoints`` followed by an fsync of that directory, so that a
crash at any instant leaves a state the next start understands:

* **commit**: ``step-N.tmp`` -> ``step-N``. Committing a step that is already
  committed (the same step saved again, e.g. after a rollback) first moves the old
  one to ``step-N.old``; a crash between the two renames leaves the old one there
  and :func:`recover` puts it back, so a crash leaves the old or the new checkpoint,
  never neither.
* **retire** (retention, ``checkpoint.keep``) and **abandon** (a rollback's dead
  timeline): rename to ``step-N.deleting``, fsync, then delete. A half-deleted
  directory therefore never looks committed, and after the fsync the abandoned
  steps are gone for good even if the process dies before the delete finishes.
* **recover**, at the start of a run: delete ``.tmp`` and ``.deleting`` leftovers;
  an ``.old`` goes back to ``step-N`` if that step has no committed checkpoint,
  otherwise it is deleted.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bigtrain.checkpoint.format import aside_dir, committed, deleting_dir, fsync_dir, leftovers


def commit(tmp: Path, final: Path) -> None:
    """Make the fully written ``tmp`` the committed checkpoint ``final``, atomically."""
    root = final.parent
    fsync_dir(tmp)
    aside = aside_dir(final)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        fsync_dir(root)
    tmp.rename(final)  # the commit
    fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def remove(root: Path, paths: list[Path]) -> None:
    """Delete committed checkpoints so that none of them can be loaded again, whatever happens."""
    if not paths:
        return
    doomed = []
    for path in paths:
        doomed.append(deleting_dir(path))
        shutil.rmtree(doomed[-1], ignore_errors=True)  # a leftover of an earlier crash, if any
        path.rename(doomed[-1])
    fsync_dir(root)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def retire(root: Path, keep: int, protected: int | None) -> list[int]:
    """Delete all but the ``keep`` newest committed checkpoints, except step ``protected``.
    Returns the steps deleted."""
    old = [(s, p) for s, p in committed(root)[:-keep] if s != protected]
    remove(root, [p for _, p in old])
    return [s for s, _ in old]


def abandon(root: Path, after: int) -> list[int]:
    """Delete every committed checkpoint newer than step ``after``; returns their steps."""
    newer = [(s, p) for s, p in committed(root) if s > after]
    remove(root, [p for _, p in newer])
    return [s for s, _ in newer]


def recover(root: Path) -> list[str]:
    """Undo what a crash left half done; returns one line per directory acted on."""
    done = []
    for path in leftovers(root, ".tmp") + leftovers(root, ".deleting"):
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed unfinished {'write' if path.suffix == '.tmp' else 'delete'} {path}")
    for aside in leftovers(root, ".old"):
        final = aside.with_name(aside.name[:-len(".old")])
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            done.append(f"removed replaced checkpoint {aside}")
        else:
            aside.rename(final)
            done.append(f"restored {final}: its replacement never committed")
    if done:
        fsync_dir(root)
    return done
