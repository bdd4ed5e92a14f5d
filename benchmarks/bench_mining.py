"""Neighbours of every training image: from the finished run's memory bank (``instdisc mine``) against a second pass
over the data, in one run.

For a trained run (its own data, in bank-slot order) every row's k nearest other training images are found five ways:

* ``bank`` — ``instdisc.mining.mine_bank``: the stored rows, searched with FAISS; no image is read again;
* ``encoder features`` / ``head embeddings`` — every training image embedded again by the trained encoder (eval
  transform), then the same exact search: what a method without a bank has to do;
* ``untrained encoder`` — the same pass with the run's starting weights (``build_seeded_model``);
* ``raw pixels`` — the images' normalised pixels, the same search.

Reports seconds (embedding pass + search; the bank: search + file) and the share of neighbour pairs with the same
label (a measure only: nothing here trains on labels). Prints a table; JSON with the machine.

    python benchmarks/bench_mining.py RUN_DIR [--k 10] [--json-out PATH]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _machine
import numpy as np
import torch

from instdisc.bank_neighbours import label_agreement
from instdisc.data import build_dataset
from instdisc.features import extract_features, eval_mode
from instdisc.knn.search import search
from instdisc.method import build_seeded_model
from instdisc.mining import mine_bank, run_labels
from instdisc.training.checkpoint import load_run


def _pass(fn, ds, labels, k: int) -> dict:
    """Embed ``ds`` with ``fn`` (None: raw pixels), search every row's k nearest others exactly."""
    t0 = time.perf_counter()
    if fn is None:
        x = np.asarray(ds.array).reshape(len(ds), -1).astype(np.float32)  # (N, C*S*S) raw pixels
        x -= x.mean(axis=0, keepdims=True)
    else:
        x = extract_features(fn, ds, desc=None).features  # (N, D)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = search(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(x, dtype=np.float32), k,
                    exclude_self=True)  # (N, k)
    search_s = time.perf_counter() - t0
    return {"embed_s": embed_s, "search_s": search_s, "seconds": embed_s + search_s,
            "label_agreement": label_agreement(torch.from_numpy(ids), labels)}


def run(args) -> dict:
    cfg, model, _ = load_run(args.run)
    labels = run_labels(args.run)
    if labels is None:
        raise SystemExit("bench_mining needs a run on labelled data")
    ds = build_dataset(cfg.data, data_root=cfg.data_root, limit=cfg.limit, skip_bad_images=cfg.skip_bad_images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = mine_bank(args.run, Path(tmp) / "nb.h5", k=args.k, labels=labels)
        rows.append({"source": "bank (instdisc mine)", "embed_s": 0.0, "search_s": res.seconds,
                     "seconds": res.seconds, "label_agreement": res.label_agreement})
    with eval_mode(model):
        with torch.no_grad():
            rows.append({"source": "encoder features (second pass)", **_pass(model.features, ds, labels, args.k)})
            rows.append({"source": "head embeddings (second pass)", **_pass(model.embed, ds, labels, args.k)})
    start = build_seeded_model(cfg, n_data=len(ds), in_channels=ds.channels, image_size=ds.image_size)
    with eval_mode(start):
        with torch.no_grad():
            rows.append({"source": "untrained encoder (second pass)", **_pass(start.features, ds, labels, args.k)})
    if getattr(ds, "array", None) is not None:
        rows.append({"source": "raw pixels", **_pass(None, ds, labels, args.k)})
    return {"run": str(args.run), "data": cfg.data, "n": len(ds), "k": args.k, "rows": rows}


def table(res: dict) -> str:
    lines = [f"{res['n']:,} training images of {res['data']}, k = {res['k']}, exact search",
             "| neighbours from | embedding pass s | search s | total s | same label |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['source']} | {r['embed_s']:.1f} | {r['search_s']:.1f} | {r['seconds']:.1f} | "
                     f"{100 * r['label_agreement']:.1f} % |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run folder (labelled data)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_mining.json"))
    args = ap.parse_args()
    res = run(args)
    print(table(res))
    path = _machine.write_json(args.json_out, {"machine": _machine.machine_info(), "argv": vars(args),
                                               "command": _machine.command_line("bench_mining.py", args), **res})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
