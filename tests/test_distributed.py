"""Single-process tests of instdisc/distributed/{partition,bank,data,knn,session}.py (no process group), and of what
training needs for millions of files: the cached file index (RUN_DIR/.index-cache, --index-cache) and file lists.
The two-process runs are in tests/test_distributed_train.py."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from instdisc.bank import MemoryBank
from instdisc.distributed.bank import ShardedBank, _chunk_bounds, draw_shard
from instdisc.distributed.data import ShardedBatches, local_batch_size
from instdisc.distributed.knn import merge_topk
from instdisc.distributed.partition import StridedPartition
from instdisc.distributed.session import DistributedRun
from instdisc.training.strategy import resume_position
from instdisc.errors import InstdiscError

from test_train_loop import tiny_cfg


# ------------------------------------------------------------------------------------------------ partition
@pytest.mark.parametrize("n,w", [(7, 1), (8, 2), (9, 2), (10, 3), (11, 4)])
def test_partition_covers_every_slot_once(n, w):
    parts = [StridedPartition(n, w, r) for r in range(w)]
    assert sum(p.size for p in parts) == n
    assert {p.size for p in parts} <= {n // w, -(-n // w)} and parts[0].max_size == -(-n // w)
    owned = torch.cat([p.owned() for p in parts])
    assert sorted(owned.tolist()) == list(range(n))
    for p in parts:
        g = p.owned()
        assert torch.equal(p.owner(g), torch.full_like(g, p.rank))
        assert torch.equal(p.to_global(p.to_local(g)), g)
        assert torch.equal(p.to_local(g), torch.arange(p.size))
    full = torch.arange(n * 3, dtype=torch.float32).view(n, 3)  # N x 3
    padded = torch.zeros(w, parts[0].max_size, 3)
    for p in parts:
        padded[p.rank, : p.size] = p.slice_full(full)
    assert torch.equal(parts[0].interleave(padded), full)


def test_partition_refuses_foreign_slots():
    p = StridedPartition(10, 2, 1)
    p.check_owned(torch.tensor([1, 3, 9]))
    with pytest.raises(InstdiscError, match="slot 4 lives on rank 0, not on rank 1"):
        p.check_owned(torch.tensor([1, 4]))
    with pytest.raises(InstdiscError, match="out of range"):
        p.check_owned(torch.tensor([11]))
    with pytest.raises(InstdiscError, match="cannot shard a bank of 1 slots over 2"):
        StridedPartition(1, 2, 0)


# ------------------------------------------------------------------------------------------------ bank shards
@pytest.mark.parametrize("n,d,w,chunk", [(97, 16, 2, 32), (50, 3, 3, 48), (49, 1, 2, 48), (40, 128, 4, 64),
                                         (33, 5, 2, 1 << 16)])
def test_shard_draw_equals_rows_of_the_single_process_bank(n, d, w, chunk):
    full = MemoryBank(n, d, generator=torch.Generator().manual_seed(3)).memory  # N x D
    for r in range(w):
        got = draw_shard(StridedPartition(n, w, r), d, generator=torch.Generator().manual_seed(3), chunk_rows=chunk)
        assert torch.equal(got, full[r::w]), (r, n, d)


def test_chunks_never_leave_a_tail_under_16_values():
    for n, d in [(49, 1), (100, 3), (1000, 7)]:
        bounds = _chunk_bounds(n, d, 48)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(((e - s) * d) % 16 == 0 for s, e in bounds[:-1])
        s, e = bounds[-1]
        assert (e - s) * d >= 16 or len(bounds) == 1


def test_sharded_bank_loads_a_full_bank_or_its_shard():
    n, d = 11, 4
    full = MemoryBank(n, d, generator=torch.Generator().manual_seed(1))
    for w in (2, 3):
        for r in range(w):
            shard = ShardedBank(StridedPartition(n, w, r), d, generator=torch.Generator().manual_seed(9))
            shard.load_state_dict(full.state_dict())  # a checkpoint of any world size holds the full bank
            assert torch.equal(shard.memory, full.memory[r::w])
            other = ShardedBank(StridedPartition(n, w, r), d, generator=torch.Generator().manual_seed(5))
            other.load_state_dict(shard.state_dict())
            assert torch.equal(other.memory, shard.memory)


# ------------------------------------------------------------------------------------------------ kNN merge
def test_merge_topk_hand_case():
    # two shards' lists side by side; 0.5 appears twice (ids 7 and 2): the smaller id first; -1 = no hit
    sims = np.array([[0.9, 0.5, -np.inf, 0.5, 0.1, 0.95]], dtype=np.float32)
    ids = np.array([[4, 7, -1, 2, 9, 6]])
    s, i = merge_topk(sims, ids, 4)
    np.testing.assert_array_equal(i, [[6, 4, 2, 7]])
    np.testing.assert_allclose(s, [[0.95, 0.9, 0.5, 0.5]])
    s, i = merge_topk(sims[:, :3], ids[:, :3], 3)  # fewer real hits than k: missing ones last
    np.testing.assert_array_equal(i, [[4, 7, -1]])
    assert s[0, 2] == -np.inf
    with pytest.raises(InstdiscError, match="k=7"):
        merge_topk(sims, ids, 7)


def test_merge_of_shard_topk_equals_global_topk():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((5, 30)).astype(np.float32)  # (Q, N) similarities to a gallery of 30
    k, w = 6, 3
    cand_s, cand_i = [], []
    for r in range(w):  # each shard's own top-k over its strided rows
        cols = np.arange(r, 30, w)
        order = np.argsort(-sims[:, cols], axis=1)[:, :k]
        cand_s.append(np.take_along_axis(sims[:, cols], order, axis=1))
        cand_i.append(cols[order])
    s, i = merge_topk(np.concatenate(cand_s, 1), np.concatenate(cand_i, 1), k)
    np.testing.assert_array_equal(i, np.argsort(-sims, axis=1)[:, :k])


# ------------------------------------------------------------------------------------------------ batches / resume
def test_sharded_batches_partition_each_epoch(fake_mnist, tmp_path):
    from instdisc.data import build_dataset
    from instdisc.training.batches import Batches

    cfg = tiny_cfg(fake_mnist, tmp_path / "r", batch_size=16, device="cpu")
    ds = build_dataset(cfg.data, data_root=cfg.data_root)  # 96 images
    single = Batches(cfg, ds, torch.device("cpu"), True)
    for epoch in (0, 1):
        seen = []
        for r in range(2):
            b = ShardedBatches(cfg, ds, torch.device("cpu"), True, StridedPartition(96, 2, r))
            assert b.batch_size == 8 and b.steps_per_epoch == 6
            perm = single.permutation(epoch)
            assert torch.equal(b.permutation(epoch), perm[perm % 2 == r])  # the single-process order, filtered
            for idx, views in b.epoch(epoch, 0):
                assert idx.shape == (8,) and (idx % 2 == r).all() and views[0].shape[0] == 8
                seen += idx.tolist()
        assert sorted(seen) == list(range(96))  # every image once per epoch, each on its own rank
    assert not torch.equal(ShardedBatches(cfg, ds, torch.device("cpu"), True, StridedPartition(96, 2, 0))
                           .permutation(0)[:8], ShardedBatches(cfg, ds, torch.device("cpu"), True,
                                                               StridedPartition(96, 2, 0)).permutation(1)[:8])
    pil = ShardedBatches(cfg, ds, torch.device("cpu"), False, StridedPartition(96, 2, 1))  # file-dataset path
    batches = list(pil.epoch(0, 4))  # resumed at step 4 of 6
    assert len(batches) == 2 and all((idx % 2 == 1).all() and idx.shape == (8,) for idx, _ in batches)
    assert torch.equal(torch.cat([idx for idx, _ in batches]), pil.permutation(0)[32:48])
    with pytest.raises(InstdiscError, match="divisible by the 3 processes"):
        local_batch_size(16, 3)


def test_resume_position_rules():
    ckpt = {"epoch": 2, "step_in_epoch": 0, "step": 12, "distributed": {"world_size": 2}}
    assert resume_position(ckpt, 6, 2) == (2, 0, 12)
    assert resume_position(ckpt, 5, 1) == (2, 0, 10)  # re-counted with the new steps per epoch
    assert resume_position(dict(ckpt, step_in_epoch=3, step=15), 6, 2) == (2, 3, 15)
    with pytest.raises(InstdiscError, match="middle of epoch 3 .* by 2 process.* this run has 4"):
        resume_position(dict(ckpt, step_in_epoch=3, step=15), 3, 4)
    single = {"epoch": 1, "step_in_epoch": 0, "step": 6}  # a single-process checkpoint
    assert resume_position(single, 6, 1) == (1, 0, 6)
    assert resume_position(single, 6, 2) == (1, 0, 6)


# ------------------------------------------------------------------------------------------------ environment
def test_from_env(monkeypatch, fake_mnist, tmp_path):
    cfg = tiny_cfg(fake_mnist, tmp_path / "r", device="cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistributedRun.from_env(cfg) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DistributedRun.from_env(cfg) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InstdiscError, match="launch with torchrun"):
        DistributedRun.from_env(cfg)
    monkeypatch.setenv("RANK", "0")
    cfg.sync_bn = True
    with pytest.raises(InstdiscError, match="--sync-bn needs CUDA"):
        DistributedRun.from_env(cfg)


# ------------------------------------------------------------------------------------------------ many files
def _image_folder(root, n_per_class=8, classes=("a", "b"), size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    old = time.time() - 3600  # the index cache never trusts a directory modified in the last 2 s
    for d in [root] + [root / c for c in classes]:
        os.utime(d, (old, old))
    return root


def _train_args(data, out, *extra):
    return ["train", str(data), "--out", str(out), "--arch", "convnet-tiny", "--epochs", "1", "--batch-size", "4",
            "--nce-k", "8", "--low-dim", "8", "--image-size", "12", "--device", "cpu", *extra]


def test_training_caches_the_folder_index_next_to_the_run(tmp_path):
    from instdisc.data.folder import index_folder
    from instdisc_cli.main import cli

    folder = _image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, _train_args(folder, run))
    assert res.exit_code == 0, res.output
    caches = list((run / ".index-cache").glob("folder-*.npz"))
    assert len(caches) == 1  # listing and bad-image scan stored next to the run
    assert index_folder(str(folder), cache_dir=str(run / ".index-cache")).from_cache
    # --index-cache DIR: one cache shared by several runs
    shared = tmp_path / "cache"
    for name in ("r1", "r2"):
        res = CliRunner().invoke(cli, _train_args(folder, tmp_path / name, "--index-cache", str(shared)))
        assert res.exit_code == 0, res.output
        assert not (tmp_path / name / ".index-cache").exists()
    assert index_folder(str(folder), cache_dir=str(shared)).from_cache
    # a new image changes the folder's mtime: the cache is stale and the listing is redone
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(folder / "a" / "new.png")
    assert not index_folder(str(folder), cache_dir=str(shared)).from_cache


def test_file_list_trains_end_to_end(tmp_path):
    from instdisc.training import load_run
    from instdisc_cli.main import cli

    folder = _image_folder(tmp_path / "imgs", n_per_class=6)
    lines = ["path,label"] + [f"imgs/{c}/{i:03d}.png,{c}" for c in ("a", "b") for i in range(6)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    del folder
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, _train_args(f"filelist:{tmp_path / 'list.csv'}", run))
    assert res.exit_code == 0, res.output
    cfg, model, ckpt = load_run(run)
    assert ckpt["data"]["n"] == 12 and model.objective.bank.memory.shape == (12, 8)
    assert cfg.data.startswith("filelist:")
