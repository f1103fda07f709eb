"""What the benchmarks share: a prepared corpus and the model sizes they measure."""
from __future__ import annotations

from pathlib import Path

from bigtrain.data.prepare import prepare

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# The smoke model and a ~30M one, as configs overrides (global batch = one micro-batch).
MODELS = {
    "smoke": ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.seq_len=128",
              "batch.global_size=16", "batch.micro_size=8"],
    "30M": ["model.n_layer=9", "model.n_head=8", "model.d_model=512", "model.seq_len=256",
            "batch.global_size=8", "batch.micro_size=8"],
}


def prepared_data(data: str | None, tmp: Path) -> str:
    """``data`` if given; else tiny Shakespeare (the stdlib corpus without ../shared), bytes, in ``tmp``."""
    if data is not None:
        return data
    out = str(tmp / "data")
    prepare(str(SHAKESPEARE) if SHAKESPEARE.is_file() else "stdlib", "bytes", out, overwrite=True)
    return out
