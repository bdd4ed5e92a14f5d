"""Two CPU processes (torchrun, gloo) against one: instdisc/distributed/{objective,session,comm,knn}.py and the loop's
distributed hooks.

One torchrun launch (``python tests/test_distributed_train.py worker OUT FMNIST`` on 2 processes, ~30 s on 2 cores)
runs every distributed scenario and saves what it saw under OUT; the tests below compare it with single-process
references computed here:

- objective: for each loss / negatives / positive combination, the two ranks' losses, gradients, stats, log Z and
  bank rows against ``Objective`` on the concatenated batch with the same generator (same negative slots).
- model: the sharded model starts from the single-process weights and bank rows (bitwise).
- training: each rank holds N/2 bank rows, the loss falls, an interrupted + resumed run equals an uninterrupted
  one bitwise, and the checkpoint holds the full bank.
- kNN: the sharded monitor's accuracy equals a single-process kNN on the gathered bank.
- world-size change: the 2-process checkpoint resumes in 1 process at an epoch end; mid-epoch is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WORLD = 2
N_OBJ, D_OBJ, K_OBJ, B_OBJ = 43, 8, 12, 5  # objective cases: odd N -> shards of 22 and 21 rows

OBJECTIVE_CASES = {
    "nce-per-sample-bank": dict(loss="nce", negatives="per-sample", positive="bank", z_mode="first-batch"),
    "nce-shared-running": dict(loss="nce", negatives="shared", positive="bank", z_mode="running"),
    "nce-per-sample-bf16": dict(loss="nce", negatives="per-sample", positive="bank", z_mode="running",
                                bank_dtype="bfloat16"),
    "infonce-shared-view-inbatch": dict(loss="infonce", negatives="shared", positive="view", in_batch=True),
    "infonce-per-sample-bank-inbatch": dict(loss="infonce", negatives="per-sample", positive="bank", in_batch=True),
    "softmax-bank": dict(loss="softmax", positive="bank"),
    "softmax-view": dict(loss="softmax", positive="view"),
    "infonce-shared-view+bank": dict(loss="infonce", negatives="shared", positive="view+bank", in_batch=True),
    "infonce-per-sample-view+bank": dict(loss="infonce", negatives="per-sample", positive="view+bank",
                                         in_batch=True, bank_weight=0.3),
    "infonce-view-no-bank": dict(loss="infonce", positive="view", in_batch=True, k=0),
    "infonce-neighbour": dict(loss="infonce", positive="neighbour", in_batch=True, k=0),
    # bank neighbours (AND): the table searched over the gathered shards, neighbour rows scored by their owners
    "infonce-shared-view+bank-neighbours": dict(loss="infonce", negatives="shared", positive="view+bank",
                                                in_batch=True, neighbours=3),
    "infonce-per-sample-view+bank-neighbours": dict(loss="infonce", negatives="per-sample", positive="view+bank",
                                                    in_batch=True, neighbours=4, bank_weight=0.7),
    "infonce-per-sample-bank-neighbours": dict(loss="infonce", negatives="per-sample", positive="bank",
                                               neighbours=2),
    # AND's confidence selection: the same half of the pairs kept on every rank, the rest absent (-1)
    "infonce-shared-view+bank-neighbours-select": dict(loss="infonce", negatives="shared", positive="view+bank",
                                                       in_batch=True, neighbours=4, neighbour_select=0.5),
    # bank clusters: k-means over the gathered bank on every rank, same-cluster columns of the GLOBAL batch
    "infonce-shared-view+bank-clusters": dict(loss="infonce", negatives="shared", positive="view+bank",
                                              in_batch=True, clusters=3),
    "infonce-shared-view+bank-clusters-select": dict(loss="infonce", negatives="shared", positive="view+bank",
                                                     in_batch=True, clusters=3, neighbour_select=0.5),
    "infonce-view-no-bank-clusters": dict(loss="infonce", positive="view", in_batch=True, k=0, clusters=2,
                                          neighbours=0),
}


SEARCH_K = 7


def _search_inputs():
    rng = np.random.default_rng(3)
    return rng.standard_normal((57, 6)).astype(np.float32), rng.standard_normal((9, 6)).astype(np.float32)


def _train_kwargs(**kw):
    """The training runs: fast recipe with bank neighbours and clusters searched after every epoch (so a resume
    crosses a search), constant lr (the loss falls over 4 epochs of the fake data)."""
    base = dict(recipe="fast", epochs=4, schedule="constant", lr=0.03, device="cpu", neighbours=3, clusters=4)
    base.update(kw)
    return base


def _objective_inputs(case: dict):
    """Global batch (rank-major: rank r's samples are rows r*B..), its slots (rank r's are slots = r mod 2)."""
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.arange(r, N_OBJ, WORLD), B_OBJ, replace=False) for r in range(WORLD)])
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(WORLD * B_OBJ, D_OBJ, generator=g), dim=1)  # W*B x D
    zp = F.normalize(torch.randn(WORLD * B_OBJ, D_OBJ, generator=g), dim=1)
    kw = dict(k=K_OBJ, tau=0.1, m=0.5)
    kw.update({k: v for k, v in case.items() if k != "bank_dtype"})
    kw["bank_dtype"] = getattr(torch, case.get("bank_dtype", "float32"))
    return torch.from_numpy(idx), z, zp, kw


def _objective_step(obj, z, zp, idx, view: bool):
    """What the loop's two-view step does: two calls with one generator, mean loss, backward, bank update."""
    g = torch.Generator().manual_seed(11)
    l1, stats = obj(z, idx, z_pos=zp if view else None, generator=g)
    l2, _ = obj(zp, idx, z_pos=z if view else None, generator=g)
    loss = 0.5 * (l1 + l2)
    loss.backward()
    obj.update(idx, F.normalize(z.detach() + zp.detach(), dim=1))
    return loss.detach(), stats


# ------------------------------------------------------------------------------------------------ the worker
def _worker(out: Path, fm_root: str) -> None:  # runs in each torchrun process
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist

    from instdisc.distributed.objective import ShardedObjective
    from instdisc.distributed.knn import sharded_search
    from instdisc.distributed.partition import StridedPartition
    from instdisc.distributed.session import DistributedRun
    from instdisc.data import build_dataset
    from instdisc.training import train
    from instdisc_cli.main import cli
    from test_train_loop import tiny_cfg
    from test_train_resume import StopAfter

    rank = int(os.environ["RANK"])
    report: dict = {"rank": rank}

    # 1. the CLI under torchrun: train() initialises and tears down the process group itself; kNN monitor on.
    # Seed 1: with seed 0 an AVX2 CPU left one of the 20 test images on a near-tie of class votes (the shard-merged
    # and the single search rounded it to different classes: 0.05 against 0.10)
    cli.main(["train", "fashion-mnist:train", "--data-root", fm_root, "--out", str(out / "C"), "--arch",
              "convnet-tiny", "--epochs", "2", "--batch-size", "16", "--nce-k", "32", "--low-dim", "16",
              "--device", "cpu", "--knn-every", "1", "--knn-data", "fashion-mnist:test", "--log-every", "3", "--seed", "1"],
             standalone_mode=False)
    assert not dist.is_initialized()

    # from here on train() finds this group and leaves it alone. Its own key prefix in torchrun's store: a second
    # default rendezvous in one process could read the first group's stale addresses.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("test-worker/", store), rank=rank, world_size=WORLD)

    # 2. the objective cases
    part = StridedPartition(N_OBJ, WORLD, rank)
    objective = {}
    for name, case in OBJECTIVE_CASES.items():
        idx, z, zp, kw = _objective_inputs(case)
        mine = slice(rank * B_OBJ, (rank + 1) * B_OBJ)
        z, zp = z[mine].clone().requires_grad_(), zp[mine].clone().requires_grad_()
        obj = ShardedObjective(N_OBJ, D_OBJ, partition=part, generator=torch.Generator().manual_seed(7), **kw)
        bank0 = obj.bank.memory.clone()
        if case.get("neighbours") or case.get("clusters"):
            obj.refresh_neighbours()  # a collective: every rank searches the gathered bank
        loss, stats = _objective_step(obj, z, zp, idx[mine], case.get("positive", "bank") != "bank")
        objective[name] = dict(loss=loss, stats=stats, grad_z=z.grad, grad_zp=zp.grad, log_z=obj.z.log_z.clone(),
                               bank0=bank0, bank1=obj.bank.memory.clone(),
                               **({"neighbours": obj.neighbours.slots.clone(), "clusters": obj.neighbours.assign.clone()}
                                  if obj.neighbours is not None else {}))
    torch.save(objective, out / f"objective_rank{rank}.pt")

    # 3. the sharded model at start (random bank init)
    cfg = tiny_cfg(fm_root, out / "unused", **_train_kwargs(bank_init="random"))
    ds = build_dataset(cfg.data, data_root=cfg.data_root)
    run = DistributedRun.from_env(cfg)
    run.check_data(cfg, len(ds), ds.fingerprint())
    model = run.build_model(cfg, n_data=len(ds), in_channels=ds.channels, image_size=ds.image_size)
    torch.save(model.state_dict(), out / f"model0_rank{rank}.pt")
    run.init_bank_from_encoder(model, ds, 256)  # bank_init "encoder": each rank embeds its own slots
    torch.save(model.objective.bank.memory.clone(), out / f"bank_encoder_rank{rank}.pt")
    run.close()

    # 4. kNN searched per shard and merged
    gallery, queries = _search_inputs()
    sims, ids = sharded_search(gallery[rank::WORLD], np.arange(rank, len(gallery), WORLD), queries, SEARCH_K)
    np.savez(out / f"search_rank{rank}.npz", sims=sims, ids=ids)

    # 5. uninterrupted run; interrupted mid-epoch (a stop seen at different steps by the ranks) and resumed
    res = train(tiny_cfg(fm_root, out / "U", **_train_kwargs()))
    report["U_bank_rows"] = list(res.model.objective.bank.memory.shape)
    stop_at = 9 if rank == 0 else 10  # rank 1 "gets the signal" a step later: the ranks must still agree
    res = train(tiny_cfg(fm_root, out / "I", **_train_kwargs()), stop_flag=StopAfter(stop_at))
    report["I_interrupted"] = res.interrupted
    report["I_stop_step"] = res.global_step
    if rank == 0:
        shutil.copy(out / "I" / "checkpoint.pt", out / "I_interrupted.pt")
    dist.barrier()
    res = train(tiny_cfg(fm_root, out / "I", **_train_kwargs()), resume=True)
    report["I_final_step"] = res.global_step
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the fixture
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    from conftest import make_fake_mnist

    root = tmp_path_factory.mktemp("dist")
    fm = make_fake_mnist(root / "fmnist")
    out = root / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "worker", str(out), str(fm)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return out, fm, proc


# ------------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("name", list(OBJECTIVE_CASES))
def test_objective_matches_single_process(two_procs, name):
    from instdisc.objective import Objective

    out, _, _ = two_procs
    ranks = [torch.load(out / f"objective_rank{r}.pt", weights_only=True)[name] for r in range(WORLD)]
    case = OBJECTIVE_CASES[name]
    idx, z, zp, kw = _objective_inputs(case)
    z, zp = z.clone().requires_grad_(), zp.clone().requires_grad_()
    ref = Objective(N_OBJ, D_OBJ, generator=torch.Generator().manual_seed(7), **kw)
    bank0 = ref.bank.memory.clone()
    if ref.neighbours is not None:
        ref.refresh_neighbours()
    loss, stats = _objective_step(ref, z, zp, idx, case.get("positive", "bank") != "bank")

    for r, got in enumerate(ranks):
        if ref.neighbours is not None:  # every rank holds the whole table the single process searched
            assert torch.equal(got["neighbours"], ref.neighbours.slots)
            assert torch.equal(got["clusters"], ref.neighbours.assign)
        # exact: the initial shard, and the bank rows after the same update (the rows' arithmetic is row-local)
        assert torch.equal(got["bank0"], bank0[r::WORLD]), "initial shard differs from the single-process rows"
        assert torch.equal(got["bank1"], ref.bank.memory[r::WORLD]), "updated shard differs"
        mine = slice(r * B_OBJ, (r + 1) * B_OBJ)
        # float reductions run in another order: equal to rounding. d(mean of rank losses)/dz = grad / W.
        torch.testing.assert_close(got["grad_z"] / WORLD, z.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad_zp"] / WORLD, zp.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["log_z"], ref.z.log_z, rtol=1e-6, atol=1e-9, equal_nan=True)
        for key in ("loss", "pos_sim", "neg_sim", "own_sim", "inbatch_sim", "bank_share", "neighbour_sim"):
            assert got["stats"][key] == pytest.approx(stats[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    mean_loss = sum(g["loss"] for g in ranks) / WORLD
    torch.testing.assert_close(mean_loss, loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ model / training
def test_sharded_model_starts_from_single_process_weights(two_procs):
    from instdisc.method import build_seeded_model
    from test_train_loop import tiny_cfg

    out, fm, _ = two_procs
    cfg = tiny_cfg(fm, out / "ref", **_train_kwargs(bank_init="random"))
    ref = build_seeded_model(cfg, n_data=96, in_channels=1, image_size=28).state_dict()
    for r in range(WORLD):
        got = torch.load(out / f"model0_rank{r}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        for k in ref:
            want = ref[k][r::WORLD] if k == "objective.bank.memory" else ref[k]
            torch.testing.assert_close(got[k], want, rtol=0, atol=0, equal_nan=True, msg=k)  # bitwise


def test_encoder_bank_init_matches_single_process(two_procs):
    from instdisc.data import build_dataset
    from instdisc.method import build_seeded_model
    from instdisc.training.strategy import SingleProcess
    from test_train_loop import tiny_cfg

    out, fm, _ = two_procs
    cfg = tiny_cfg(fm, out / "ref", **_train_kwargs(bank_init="random"))
    ds = build_dataset(cfg.data, data_root=cfg.data_root)
    model = build_seeded_model(cfg, n_data=96, in_channels=1, image_size=28)
    SingleProcess(torch.device("cpu")).init_bank_from_encoder(model, ds, 256)
    for r in range(WORLD):  # other batch compositions in the encoder: equal up to float rounding
        got = torch.load(out / f"bank_encoder_rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got, model.objective.bank.memory[r::WORLD], rtol=1e-5, atol=1e-6)


def test_sharded_search_equals_exact_search(two_procs):
    from instdisc.knn import search

    out, _, _ = two_procs
    gallery, queries = _search_inputs()
    want_s, want_i = search(gallery, queries, SEARCH_K)
    for r in range(WORLD):  # every rank holds the merged answer
        got = np.load(out / f"search_rank{r}.npz")
        np.testing.assert_array_equal(got["ids"], want_i)
        np.testing.assert_allclose(got["sims"], want_s, rtol=1e-5, atol=1e-6)


def test_each_rank_holds_half_the_bank_and_loss_falls(two_procs):
    from instdisc.training import load_run

    out, _, _ = two_procs
    for r in range(WORLD):
        report = json.loads((out / f"report_rank{r}.json").read_text())
        assert report["U_bank_rows"] == [96 // WORLD, 16]
    _, model, ckpt = load_run(out / "U")  # the checkpoint holds the full bank, loadable by one process
    assert model.objective.bank.memory.shape == (96, 16)
    assert ckpt["distributed"]["world_size"] == WORLD and ckpt["distributed"]["batch_per_rank"] == 8
    epochs = [json.loads(x) for x in (out / "U" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in epochs if e["type"] == "epoch"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def test_interrupt_and_resume_is_exact(two_procs):
    from instdisc.training.checkpoint import read_checkpoint
    from test_train_resume import assert_same_state

    out, _, _ = two_procs
    reports = [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(WORLD)]
    # rank 0 saw the stop at its 10th check, rank 1 would have at its 11th: both stopped after 9 steps
    assert all(rep["I_interrupted"] and rep["I_stop_step"] == 9 for rep in reports)
    assert all(rep["I_final_step"] == 24 for rep in reports)  # 4 epochs x 6 steps (48 images, 8 per rank)
    a, b = read_checkpoint(out / "U"), read_checkpoint(out / "I")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"], b["optimizer"])


def test_cli_run_and_sharded_knn_match_single_process(two_procs):
    from instdisc.data import build_dataset
    from instdisc.features import extract_features
    from instdisc.knn import knn_evaluate
    from instdisc.training import load_run

    out, fm, proc = two_procs
    assert proc.stdout.count("done: 2 epochs") == 1  # one summary line, from rank 0
    cfg, model, ckpt = load_run(out / "C")
    records = [json.loads(x) for x in (out / "C" / "metrics.jsonl").read_text().splitlines()]
    assert [x["type"] for x in records].count("verdict") == 1  # computed and written by rank 0 alone
    last = [x for x in records if x["type"] == "epoch"][-1]
    test = build_dataset("fashion-mnist:test", data_root=str(fm))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1): the same float sums, the same votes
    try:
        feats = extract_features(model.embed, test)
    finally:
        torch.set_num_threads(threads)
    bank = F.normalize(model.objective.bank.memory.float(), dim=1).numpy()
    with pytest.warns(UserWarning, match="exceeds"):  # k=200 > 96 bank rows: clamped, as in the sharded search
        ref = knn_evaluate(bank, np.asarray(build_dataset("fashion-mnist:train", data_root=str(fm)).labels),
                           feats.features, feats.labels, k=cfg.knn_k, tau=cfg.nce_t)
    assert last["knn_top1"] == pytest.approx(ref["top1"])


def test_resume_with_another_world_size(two_procs, tmp_path):
    from instdisc.errors import InstdiscError
    from instdisc.training import train
    from test_train_loop import tiny_cfg

    out, fm, _ = two_procs
    # epoch end, 2 processes -> 1: the bank is the full one, training continues for a 5th epoch
    run = tmp_path / "U1"
    shutil.copytree(out / "U", run)
    res = train(tiny_cfg(fm, run, **_train_kwargs(epochs=5)), resume=True)
    assert res.epochs_done == 5 and res.global_step == 5 * 6 and np.isfinite(res.last_loss)
    assert res.model.objective.bank.memory.shape == (96, 16)
    # mid-epoch: the batches of an epoch depend on the partition -> refused
    run = tmp_path / "I1"
    run.mkdir()
    shutil.copy(out / "I_interrupted.pt", run / "checkpoint.pt")
    with pytest.raises(InstdiscError, match="middle of epoch 2 .* by 2 process"):
        train(tiny_cfg(fm, run, **_train_kwargs()), resume=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(Path(sys.argv[2]), sys.argv[3])
