"""Two CPU processes (torchrun, gloo) on file data: instdisc/distributed/{data,session}.py with image caches and
folders.

One torchrun launch (``python tests/test_distributed_files.py worker OUT FOLDER CACHE``, ~30 s on 2 cores):

- cache: a 2-process run from an image cache trains on the BatchAugment path; each rank gathers only the rows of
  its own slots (training batches and the encoder bank init), and its checkpoint describes the same dataset as a
  single process sees;
- unreadable image mid-run (PIL path, folder): the rank that cannot read it reports it, every rank stops at the
  same step boundary, a checkpoint is saved there, every rank raises a one-line error; with the file back,
  ``--resume`` finishes the run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
WORLD = 2


def _cfg(data, out, **kw):
    from test_train_loop import tiny_cfg

    base = dict(data=data, data_root=None, nce_k=16, batch_size=8, epochs=2, device="cpu", knn_every=0)
    base.update(kw)
    return tiny_cfg(None, out, **base)


def _worker(out: Path, folder: str, cache: str) -> None:  # runs in each torchrun process
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    import instdisc.distributed.data as ddata
    import instdisc.distributed.session as sess
    from instdisc.data import build_dataset
    from instdisc.errors import InstdiscError
    from instdisc.training import train

    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("files-worker/", store), rank=rank, world_size=WORLD)
    report: dict = {"rank": rank}

    # 1. from the cache: record every slot this rank gathers
    seen_train, seen_init = set(), set()
    real_epoch, real_get = ddata.ShardedBatches.epoch, sess._RowArray.__getitem__

    def epoch(self, e, start):
        for idx, views in real_epoch(self, e, start):
            seen_train.update(idx.tolist())
            yield idx, views

    def get(self, rows):
        seen_init.update(self.idx[torch.as_tensor(rows)].tolist())
        return real_get(self, rows)

    ddata.ShardedBatches.epoch, sess._RowArray.__getitem__ = epoch, get
    res = train(_cfg(f"cache:{cache}", out / "C", bank_init="encoder"))
    ddata.ShardedBatches.epoch, sess._RowArray.__getitem__ = real_epoch, real_get
    report.update(C_loss=res.last_loss, C_rows=list(res.model.objective.bank.memory.shape),
                  C_train_slots=sorted(seen_train), C_init_slots=sorted(seen_init))

    # 2. an image of rank 1 disappears after the start-up checks: it is read at step 2 of epoch 0 on rank 1
    cfg = _cfg(folder, out / "E", bank_init="random", augment="pil")
    ds = build_dataset(folder)
    b = ddata.ShardedBatches(cfg, ds, torch.device("cpu"), False, sess.StridedPartition(len(ds), WORLD, 1))
    victim_slot = int(b.permutation(0)[2 * b.batch_size + 1])  # rank 1's batch of step 2
    victim = ds.paths[victim_slot]
    data = open(victim, "rb").read()
    dist.barrier()
    if rank == 0:
        os.remove(victim)
    dist.barrier()
    try:
        train(cfg, dataset=ds)
        report["E_error"] = None
    except InstdiscError as e:
        report["E_error"] = str(e)
    dist.barrier()
    if rank == 0:
        ck = torch.load(out / "E" / "checkpoint.pt", map_location="cpu", weights_only=False)
        report.update(E_epoch=ck["epoch"], E_step_in_epoch=ck["step_in_epoch"], E_step=ck["step"])
        with open(victim, "wb") as f:
            f.write(data)
    dist.barrier()
    res = train(cfg, dataset=ds, resume=True)
    report["E_final_step"] = res.global_step
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from test_data_prepare import make_folder

    from instdisc.data.prepare import prepare_cache

    root = tmp_path_factory.mktemp("distfiles")
    folder = make_folder(root / "src", n_per_class=16, classes=("a", "b", "c"), size=(20, 18))  # 48 images
    cache = root / "c.h5"
    prepare_cache(str(folder), cache)
    out = root / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "worker", str(out),
           str(folder), str(cache)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(WORLD)]
    return out, folder, cache, reports


def test_cache_run_reads_only_each_ranks_slots(launched):
    out, _, cache, reports = launched
    for r, rep in enumerate(reports):
        assert np.isfinite(rep["C_loss"]) and rep["C_rows"][0] == 24
        assert rep["C_train_slots"] and all(s % WORLD == r for s in rep["C_train_slots"])
        assert rep["C_init_slots"] == list(range(r, 48, WORLD))  # the bank init embeds exactly its own slots
    conf = json.loads((out / "C" / "config.json").read_text())
    from instdisc.data import build_dataset

    single = build_dataset(f"cache:{cache}")
    assert conf["augment_resolved"] == "batch"
    assert conf["dataset"]["fingerprint"] == single.fingerprint() and conf["dataset"]["n"] == 48
    ck = torch.load(out / "C" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["model"]["objective.bank.memory"].shape[0] == 48


def test_unreadable_image_mid_run_saves_at_the_step_boundary(launched):
    _, _, _, reports = launched
    for r, rep in enumerate(reports):
        assert rep["E_error"] is not None and "progress is saved at step 2 of this epoch" in rep["E_error"]
        assert f"(rank {r})" in rep["E_error"]
    assert "cannot read image" in reports[1]["E_error"]
    assert (reports[0]["E_epoch"], reports[0]["E_step_in_epoch"], reports[0]["E_step"]) == (0, 2, 2)
    steps_per_epoch = (48 // WORLD) // (8 // WORLD)
    assert reports[0]["E_final_step"] == reports[1]["E_final_step"] == 2 * steps_per_epoch


def test_sharded_pil_batches_protect_workers_from_ctrl_c(tmp_path, monkeypatch):
    """ShardedBatches starts its DataLoader workers through ``training.batches.worker_batches`` (SIGINT blocked while
    they start, ignored in them, shut down here), as a single process does."""
    from test_data_prepare import make_folder

    import instdisc.training.batches as batches_module
    from instdisc.data import build_dataset
    from instdisc.distributed.data import ShardedBatches
    from instdisc.distributed.partition import StridedPartition

    folder = make_folder(tmp_path / "src", n_per_class=4, size=(12, 12))
    ds = build_dataset(str(folder))
    used = []
    real = batches_module.worker_batches

    def spy(loader):
        used.append(loader.num_workers)
        return real(loader)

    monkeypatch.setattr(batches_module, "worker_batches", spy)
    cfg = _cfg(str(folder), tmp_path / "r", batch_size=4, workers=1, augment="pil")
    b = ShardedBatches(cfg, ds, torch.device("cpu"), False, StridedPartition(len(ds), WORLD, 0))
    idx, views = next(b.epoch(0, 0))
    assert used == [1] and all(i % WORLD == 0 for i in idx.tolist()) and len(views) == 2


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "worker":
    _worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
