"""``bigtrain report RUN_DIR``: static PNG plots of a run, finished or still running.

TensorBoard needs a server and a browser; a SLURM user on a login node wants a
picture in a file. This reads ``metrics.jsonl`` and ``ledger.jsonl`` (a partial
last line, as left by a run that is writing, is ignored) and draws into
``RUN_DIR/report/``:

* ``loss.png``        train loss and val loss
* ``lr.png``          the learning rate
* ``grad_norm.png``   the pre-clip gradient norm, with ``optim.grad_clip`` as a line
* ``throughput.png``  tokens/s and MFU

Every plot marks the ledger's events, so a loss curve explains itself: vertical
lines for spikes, non-finite steps, rollbacks (with the span of steps that were
undone shaded), preemptions, resumes and aborts; small triangles along the bottom
for skipped updates, crosses along the top for anomaly traces. After a rollback the
metrics hold the redone steps twice; each attempt is drawn as its own segment.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bigtrain.config import ConfigError

# kind -> (colour, line style); "rug" kinds are drawn as markers along an edge instead of lines
EVENT_STYLE = {
    "spike": ("tab:orange", "--"),
    "nonfinite": ("tab:red", "-"),
    "rollback": ("tab:purple", "-"),
    "preempt": ("tab:blue", "-."),
    "resume": ("tab:green", "-."),
    "abort": ("black", "-"),
}
RUG_STYLE = {"skip": ("tab:gray", "^", 0.02), "trace": ("tab:red", "x", 0.97)}  # colour, marker, height


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file that may be mid-write: undecodable lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def segments(records: list[dict], key: str) -> list[tuple[list[int], list[float]]]:
    """``(steps, values)`` runs of ``key``, split where the step goes back (a rollback or a resume)."""
    runs: list[tuple[list[int], list[float]]] = []
    last = None
    for r in records:
        if not isinstance(r.get(key), (int, float)):
            continue
        if last is None or r["step"] <= last:
            runs.append(([], []))
        runs[-1][0].append(r["step"])
        runs[-1][1].append(float(r[key]))
        last = r["step"]
    return runs


def mark_events(axes: list, events: list[dict]) -> dict[str, int]:
    """Draw the ledger's events on every axis in ``axes`` (one figure) and the figure's legend;
    returns how many markers of each kind were drawn on each axis."""
    counts: dict[str, int] = {}
    for kind in (*EVENT_STYLE, *RUG_STYLE):
        n = sum(e.get("event") == kind for e in events)
        if n:
            counts[kind] = n
    for ax in axes:
        for e in events:
            kind = e.get("event")
            if kind in EVENT_STYLE:
                colour, style = EVENT_STYLE[kind]
                ax.axvline(e["step"], color=colour, linestyle=style, linewidth=1.2, alpha=0.8)
                if kind == "rollback" and "to_step" in e:
                    ax.axvspan(e["to_step"], e["step"], color=colour, alpha=0.08)
            elif kind in RUG_STYLE:
                colour, marker, height = RUG_STYLE[kind]
                ax.plot([e["step"]], [height], marker, color=colour, transform=ax.get_xaxis_transform(),
                        markersize=7, clip_on=False)
    handles = [Line2D([], [], color=EVENT_STYLE[k][0], linestyle=EVENT_STYLE[k][1], label=f"{k} ({n})")
               if k in EVENT_STYLE else
               Line2D([], [], color=RUG_STYLE[k][0], marker=RUG_STYLE[k][1], linestyle="", label=f"{k} ({n})")
               for k, n in counts.items()]
    if "rollback" in counts:
        handles.append(Patch(color=EVENT_STYLE["rollback"][0], alpha=0.15, label="undone by rollback"))
    if handles:
        axes[0].figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="ledger events")
    return counts


def _plot(ax, records: list[dict], key: str, label: str, colour: str, **kw) -> bool:
    """Each attempt at a stretch of steps is a segment; the steps a later attempt redid
    (after a rollback or a restart from an older checkpoint) are drawn faint."""
    runs = segments(records, key)
    for i, (steps, values) in enumerate(runs):
        redone_from = min((later[0][0] for later in runs[i + 1:]), default=math.inf)
        kept = bisect.bisect_left(steps, redone_from)
        if kept:
            ax.plot(steps[:kept], values[:kept], color=colour, label=label, **kw)
            label = None
        if kept < len(steps):
            start = max(kept - 1, 0)
            ax.plot(steps[start:], values[start:], color=colour, alpha=0.3, **kw)
    return bool(runs)


def _figure(title: str, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(10, 4.5 if rows == 1 else 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write the PNGs; returns ``{"files": [paths], "markers": {kind: markers per plot}}``."""
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ConfigError(f"run dir {str(run)!r} has no metrics.jsonl; is it a bigtrain run directory?")
    records = read_jsonl(metrics_path)
    train = [r for r in records if "loss" in r and r.get("kind") != "detail"]
    evals = [r for r in records if "val_loss" in r]
    events = read_jsonl(run / "ledger.jsonl")
    cfg = {}
    if (run / "config.yaml").is_file():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    clip = (cfg.get("optim") or {}).get("grad_clip")
    out_dir = Path(out) if out else run / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run.resolve().name
    last = max((r["step"] for r in train), default=0)
    files, markers = [], {}

    def save(fig, axes, filename):
        nonlocal markers
        markers = mark_events(axes, events)
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", fontsize=8)
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        files.append(str(path))

    fig, (ax,) = _figure(f"{name}: loss (step {last})")
    _plot(ax, train, "loss", "train loss", "tab:blue", linewidth=1)
    _plot(ax, evals, "val_loss", "val loss", "tab:red", marker="o", markersize=4)
    ax.set_ylabel("cross-entropy (nats)")
    save(fig, [ax], "loss.png")

    fig, (ax,) = _figure(f"{name}: learning rate")
    _plot(ax, train, "lr", "lr", "tab:brown")
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    save(fig, [ax], "lr.png")

    fig, (ax,) = _figure(f"{name}: gradient norm (before clipping)")
    norms = [v for _, vs in segments(train, "grad_norm") for v in vs if math.isfinite(v)]
    _plot(ax, train, "grad_norm", "grad norm", "tab:blue", linewidth=1)
    if norms and min(norms) > 0 and max(norms) > 20 * min(norms):  # spikes: a log scale keeps the rest visible
        ax.set_yscale("log")
    if clip:
        ax.axhline(clip, color="tab:red", linestyle=":", label=f"clip threshold ({clip:g})")
    ax.set_ylabel("L2 norm")
    save(fig, [ax], "grad_norm.png")

    fig, (top, bottom) = _figure(f"{name}: throughput", rows=2)
    _plot(top, train, "tokens_per_s", "tokens/s", "tab:blue")
    top.set_ylabel("tokens/s")
    mfu = [{"step": r["step"], "mfu": 100 * r["mfu"]} for r in train if isinstance(r.get("mfu"), (int, float))]
    _plot(bottom, mfu, "mfu", "MFU", "tab:orange")
    bottom.set_ylabel("MFU (%)")
    save(fig, [top, bottom], "throughput.png")
    return {"files": files, "markers": markers}
