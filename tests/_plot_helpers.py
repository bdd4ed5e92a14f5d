"""Shared by the plot test files: read a PNG back, and write a metrics.jsonl of given records."""
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png_stats(path) -> tuple[tuple[int, int], float]:
    """((width, height), pixel variance over all channels) of the PNG at ``path``."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
        return im.size, float(a.var())


def write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def fake_records(epochs: int = 2, spe: int = 4, every: int = 2, extra_epoch: dict | None = None) -> list[dict]:
    """Step records every ``every`` steps and one epoch record per epoch, shaped like the loop's."""
    out = []
    for ep in range(1, epochs + 1):
        for s in range(every, spe + 1, every):
            g = (ep - 1) * spe + s
            out.append({"type": "step", "epoch": ep, "step": s, "global_step": g, "loss": 5.0 - 0.1 * g,
                        "lr": 0.2 / g, "pos_sim": 0.9, "neg_sim": 0.01 * g, "log_z": None, "images_per_s": 100.0 + g,
                        "steps_per_s": 1.0, "eta_s": 3.0})
        rec = {"type": "epoch", "epoch": ep, "global_step": ep * spe, "loss": 5.0 - ep, "seconds": 1.5}
        rec.update({k: v * ep for k, v in (extra_epoch or {}).items()})
        out.append(rec)
    return out
