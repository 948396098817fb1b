"""Data-parallel training (DDP) on the CPU with gloo: 2 processes, tiny 32^3 phantoms, 2-D model.

Starting a process costs seconds of imports, so ONE spawned pair runs every DDP scenario (a full
run, an interrupted + resumed run, an election with an empty shard, single optimiser steps) and
saves what it saw; the tests below compare those files with each other and with single-process
runs of the same global batch. One more test launches the real command line with torchrun. Every
wait has a timeout: a hang fails, it never blocks CI.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lckd_kit import distributed, phantom
from lckd_kit.election import elect_teachers
from lckd_kit.batches import StepBatches, make_batch, split_cases, training_cases
from lckd_kit.checkpoint import load_checkpoint, load_model, read_history
from lckd_kit.data import as_case
from lckd_kit.train import get_train_config, train

WORLD = 2
TIMEOUT_S = 150  # generous for 2 busy cores; a deadlock fails here instead of hanging
N_CASES = 5  # 3 training cases (so steps wrap across epochs) + 2 validation cases, one per rank
# ASPP's global branch is a constant (model.ASPP.global_branch): these never get a gradient
UNUSED = ["encoder.aspp.branch5_conv.weight", "encoder.aspp.branch5_norm.weight"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cases() -> list[dict]:
    return [phantom.make_case(s, grid=32) for s in range(N_CASES)]


def ddp_config(**kw):
    """tiny with 2 validation cases; per rank 1 case x 2 slices, so the global batch is 4 = tiny's."""
    return get_train_config("tiny", n_val=2, elect_max_cases=2, batch_size=2, **kw)


def single_config(**kw):
    """The same run in one process: batch 4 = 2 ranks x 2."""
    return get_train_config("tiny", n_val=2, elect_max_cases=2, **kw)


def one_step_runs(cfg, warm: Path) -> list[dict]:
    """One optimiser step from the same state, in stage 1 (from init) and in stage 2 (from the
    end-of-stage-1 checkpoint ``warm``). No elections: the weights right after the step."""
    cfg = dataclasses.replace(cfg, elect_every=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resuming another batch size / world size warns, rightly
        init = state_of(train(cfg, make_cases(), progress=False, max_steps=0).model)
        first = train(cfg, make_cases(), progress=False, max_steps=1)
        stage2 = train(cfg, make_cases(), progress=False, resume=warm, max_steps=cfg.stage1_steps + 1)
    return [{"state": state_of(r.model), "history": r.history, "before": before}
            for r, before in ((first, init), (stage2, None))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ the 2-process run


def _worker(rank: int, port: int, root: str, warm: str) -> None:
    """One rank, as torchrun would start it: the environment says who it is."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root, cases, cfg = Path(root), make_cases(), ddp_config()
    with distributed.launch("cpu") as (info, device):
        assert (info.rank, info.world_size, device.type) == (rank, WORLD, "cpu")
        assert torch.distributed.get_backend() == "gloo"
        # a separate folder per rank: whatever rank 1 would write would show up in its own
        full = train(cfg, cases, out_dir=root / f"full_rank{rank}", progress=False)
        no_grad = [n for n, p in full.model.named_parameters() if p.grad is None]
        # interrupted in stage 1 (3 of 4 warm-up steps), resumed in the shared folder
        cut = train(cfg, cases, out_dir=root / "cut", progress=False, max_steps=3)
        resumed = train(cfg, cases, out_dir=root / "cut", progress=False, resume=True)
        # 1 case for 2 ranks: rank 1's shard is empty and still counts in the reduction
        _, val_idx = split_cases(len(cases), cfg.n_val, cfg.seed)
        one = elect_teachers(full.model, [as_case(cases[val_idx[0]], normalize=True)] if rank == 0 else [],
                             reduce=distributed.all_reduce_sum)
        steps = one_step_runs(cfg, Path(warm))
    torch.save({
        "state": state_of(full.model), "no_grad": no_grad, "history": full.history,
        "teachers": list(full.teachers), "scores": [e.scores.tolist() for e in full.elections],
        "cut_step": cut.step, "resumed": state_of(resumed.model), "resumed_history": resumed.history,
        "one_scores": one.scores.tolist(), "one_n": one.n_cases, "one_all": one.all_dice.tolist(),
        "steps": steps,
    }, root / f"rank{rank}.pt")


def spawn(fn, *args, nprocs: int = WORLD, timeout: float = TIMEOUT_S) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed (and ends the others)
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:  # only our own children, by handle
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawn the pair once; plus the single-process run with the same global batch (4)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ddp")
    cfg = single_config()
    # the end of stage 1 in one process: the common start of the stage-2 step compared below
    train(dataclasses.replace(cfg, elect_every=100), make_cases(), out_dir=root / "warm", progress=False,
          max_steps=cfg.stage1_steps)
    warm = root / "warm" / "last.pt"
    spawn(_worker, free_port(), str(root), str(warm))
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = train(cfg, make_cases(), out_dir=root / "single", progress=False)
    return {"root": root, "ranks": ranks, "single": single, "single_steps": one_step_runs(cfg, warm)}


def test_parameters_teachers_and_history_are_identical_on_all_ranks(run):
    r0, r1 = run["ranks"]
    assert states_equal(r0["state"], r1["state"])  # bit-identical, not close
    assert r0["teachers"] == r1["teachers"]
    assert len(r0["scores"]) == 2 and r0["scores"] == r1["scores"]  # both elections, every score
    # losses are reduced before logging: the record is the global batch's, the same on every rank
    assert r0["history"] == r1["history"]
    assert [e["n_cases"] for e in r0["history"] if e["kind"] == "election"] == [2, 2]  # 1 per rank, summed


def test_only_rank_0_writes_files(run):
    root = run["root"]
    assert not (root / "full_rank1").exists()  # rank 1 wrote nothing, not even the folder
    files = sorted(p.name for p in (root / "full_rank0").iterdir())
    assert files == ["config.json", "final.pt", "history.jsonl", "last.pt"]  # no leftover temporaries
    assert sorted(p.name for p in (root / "cut").iterdir()) == files
    assert read_history(root / "full_rank0") == run["ranks"][0]["history"]
    stored = json.loads((root / "full_rank0" / "config.json").read_text())
    assert stored["world_size"] == WORLD and stored["batch_size"] == 2


def test_resume_under_ddp_matches_an_uninterrupted_run(run):
    r0, r1 = run["ranks"]
    assert r0["cut_step"] == 3
    assert states_equal(r0["resumed"], r0["state"]) and states_equal(r1["resumed"], r0["state"])
    assert r0["resumed_history"] == r0["history"]
    assert read_history(run["root"] / "cut") == read_history(run["root"] / "full_rank0")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(run):
    """2 ranks x batch 2 == 1 process x batch 4: same samples (make_batch), mean losses, averaged grads.

    Compared one optimiser step at a time from the same state: over several steps the two runs part
    the way any two float roundings of this model do. Measured in ONE process: a random 1e-7 change
    of the weights moves some stem gradients by 0.1-0.5 (of up to ~7), and averaging two half
    batches instead of taking the whole batch ends 8 tiny steps ~0.8 apart, as DDP vs one process does."""
    (first, stage2), (first1, stage2_1) = run["ranks"][0]["steps"], run["single_steps"]
    # stage 1 from the same init: the same loss, and the same update up to float rounding, which
    # the stem's gradient amplifies on some phantoms (measured: |diff| / |update| ~1e-3)
    assert first["history"][0]["loss"] == pytest.approx(first1["history"][0]["loss"], rel=1e-6)
    init = first1["before"]
    assert states_equal(init, first["before"])  # the same seeded initialisation in both
    update = torch.cat([(first1["state"][k] - init[k]).flatten() for k in init])
    diff = torch.cat([(first["state"][k] - first1["state"][k]).flatten() for k in init])
    assert update.norm() > 0 and diff.norm() < 1e-2 * update.norm(), (diff.norm(), update.norm())
    # stage 2 from the same checkpoint: the same subset, the same loss; the update agrees to float
    # rounding, which along the all-zero input of the missing modalities is large in a few
    # cancelling sums (the stem InstanceNorm bias; also between batch 4 and two batches of 2 in one
    # process): measured max |diff| 4e-4 (that bias), the difference 1e-3 of the update's norm
    assert stage2["history"][0]["subset"] == stage2_1["history"][0]["subset"] != "flair+t1+t1ce+t2"
    assert stage2["history"][0]["loss"] == pytest.approx(stage2_1["history"][0]["loss"], rel=1e-6)
    warm = load_checkpoint(run["root"] / "warm" / "last.pt")["model"]
    update = torch.cat([(stage2_1["state"][k] - warm[k]).flatten() for k in warm])
    diff = torch.cat([(stage2["state"][k] - stage2_1["state"][k]).flatten() for k in warm])
    assert diff.norm() < 1e-2 * update.norm(), (diff.norm(), update.norm())
    # whole runs: the same schedule, subsets and first loss; DDP left the never-used parameters'
    # grads None, as one process does, so the optimiser state has the same entries
    ddp, single = run["ranks"][0], run["single"]
    steps = [(a, b) for a, b in zip(ddp["history"], single.history) if a["kind"] == "step"]
    assert len(steps) == 8 and all(a["subset"] == b["subset"] and a["lr"] == b["lr"] for a, b in steps)
    assert steps[0][0]["loss"] == pytest.approx(steps[0][1]["loss"], rel=1e-6)
    ddp_ckpt = load_checkpoint(run["root"] / "full_rank0" / "final.pt")
    one_ckpt = load_checkpoint(run["root"] / "single" / "final.pt")
    assert ddp_ckpt["optimizer"]["state"].keys() == one_ckpt["optimizer"]["state"].keys()


def test_ddp_checkpoint_loads_in_a_single_process(run):
    path = run["root"] / "full_rank0" / "final.pt"
    raw = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in raw["model"])
    model, ckpt = load_model(path)
    assert states_equal(state_of(model), run["ranks"][0]["state"]) and not model.training
    # resuming it in one process works and says that the global batch changes
    with pytest.warns(UserWarning, match=r"world_size \(2 -> 1\)"):
        res = train(ddp_config(), make_cases(), resume=path, progress=False)
    assert res.step == 8 and states_equal(state_of(res.model), run["ranks"][0]["state"])


def test_election_reduces_over_ranks_even_with_an_empty_shard(run):
    r0, r1 = run["ranks"]
    assert r0["one_n"] == r1["one_n"] == 1
    assert r0["one_scores"] == r1["one_scores"] and r0["one_all"] == r1["one_all"]
    model, _ = load_model(run["root"] / "full_rank0" / "final.pt")
    cfg, cases = ddp_config(), make_cases()
    alone = elect_teachers(model, [as_case(cases[split_cases(len(cases), cfg.n_val, cfg.seed)[1][0]], normalize=True)])
    np.testing.assert_array_equal(np.asarray(r0["one_scores"]), alone.scores)


def test_the_same_parameters_are_unused_in_every_step(run):
    """Why static_graph is right: whatever the stage, subset or KD, exactly UNUSED get no gradient."""
    assert run["ranks"][0]["no_grad"] == run["ranks"][1]["no_grad"] == UNUSED
    model = run["single"].model.train()
    assert [n for n, p in model.named_parameters() if p.grad is None] == UNUSED
    for sampling in ("batch", "sample"):
        cfg = get_train_config("tiny", stage2_sampling=sampling)
        src = StepBatches(training_cases(make_cases()[:3]), cfg, spatial_dims=2, steps=[])
        for step in (0, 4, 5, 6):
            batch = make_batch(step, src, cfg)
            model.zero_grad(set_to_none=True)
            logits, feats = model(batch["image"], batch["available"])
            logits.sum().backward()  # the seg loss alone (no KD) reaches the same parameters
            assert [n for n, p in model.named_parameters() if p.grad is None] == UNUSED, (sampling, step)


# ------------------------------------------------------------------------ a failing rank


def _failing_worker(rank: int, port: int, root: str) -> None:
    """Rank 1 raises in its third training step; rank 0 is then waiting in that step's gradient
    all-reduce. Each rank records how it ended instead of raising (so the harness waits for both)."""
    import lckd_kit.train as train_module

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:
        step_fn = train_module.train_step

        def failing_step(net, batch, *args, **kwargs):
            if batch["step"] == 2:
                raise ValueError("rank 1 cannot read case X (a test failure)")
            return step_fn(net, batch, *args, **kwargs)

        train_module.train_step = failing_step
    cases, outcome = make_cases(), {}
    start = time.monotonic()
    try:
        with distributed.launch("cpu"):
            train(ddp_config(elect_every=100), cases, out_dir=Path(root) / "failing", progress=False)
        outcome["error"] = None
    except Exception as e:  # what the rank's user would see
        outcome["error"] = f"{type(e).__name__}: {e}"
    outcome["seconds"] = time.monotonic() - start
    (Path(root) / f"failing{rank}.json").write_text(json.dumps(outcome))


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    spawn(_failing_worker, free_port(), str(tmp_path), timeout=90)
    outcomes = [json.loads((tmp_path / f"failing{r}.json").read_text()) for r in range(WORLD)]
    assert outcomes[1]["error"] == "ValueError: rank 1 cannot read case X (a test failure)"
    # rank 0 was blocked in a collective: it ends with rank 1's message, long before the group's
    # timeout (distributed.DEFAULT_TIMEOUT_S)
    assert outcomes[0]["error"].startswith("PeerFailed: rank 1 failed: ValueError: rank 1 cannot read case X")
    assert outcomes[0]["seconds"] < 60 and distributed.DEFAULT_TIMEOUT_S >= 600
    assert not (tmp_path / "failing" / ".lock").exists()  # rank 0 released the run folder


# ------------------------------------------------------------------------ torchrun + CLI


def test_torchrun_command_line(tmp_path):
    phantom.generate(tmp_path / "data", n=3, seed=0, grid=32, progress=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "lckd_kit", "train", "--data", str(tmp_path / "data"), "--config", "tiny", "--out", str(out),
           "--device", "cpu", "--stage1-steps", "2", "--stage2-steps", "1", "--elect-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # own session: on a timeout the launcher AND its workers are killed, nothing is left behind
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{stdout[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:]
    # only rank 0 prints; batch_size is per rank
    assert stdout.count("finished 3 steps on 2 processes (global batch 8)") == 1, stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "final.pt", "history.jsonl", "last.pt"]
    assert json.loads((out / "config.json").read_text())["world_size"] == WORLD
    hist = read_history(out)
    assert [r["kind"] for r in hist] == ["step", "step", "step", "election", "features", "val"]
    model, ckpt = load_model(out / "final.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["world_size"] == WORLD


# ------------------------------------------------------------------------ helpers, no processes


def test_shard_is_monai_distributed_sampler_partition_and_covers_everything():
    from monai.data import DistributedSampler

    items = list(range(7))
    for world in (1, 2, 3):
        shards = [distributed.shard(items, r, world) for r in range(world)]
        assert sorted(sum(shards, [])) == items  # each item exactly once
        for r in range(world):
            sampler = DistributedSampler(items, even_divisible=False, num_replicas=world, rank=r, shuffle=False)
            assert shards[r] == list(sampler)
    assert [distributed.shard([0, 1], r, 8) for r in range(3)] == [[0], [1], []]  # MONAI would refuse


def test_batches_do_not_depend_on_the_case_cache():
    """Each rank builds its batches alone, so a batch must be a function of the step even when the
    cases are not cached (the z-scoring prefix once ran in place on the case's own array)."""
    cached, uncached = ddp_config(), ddp_config(cache_cases=False)
    src = StepBatches(training_cases(make_cases()), uncached, spatial_dims=2, steps=[], rank=1, world_size=WORLD)
    ref = StepBatches(training_cases(make_cases()), cached, spatial_dims=2, steps=[], rank=1, world_size=WORLD)
    for step in (2, 2, 5):
        assert torch.equal(make_batch(step, src, uncached, 1, WORLD)["image"], make_batch(step, ref, cached, 1, WORLD)["image"])


def test_environment_and_errors(monkeypatch):
    assert distributed.from_env({}) == distributed.DistInfo() and distributed.DistInfo().is_main
    info = distributed.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 8, 1, False)
    with pytest.raises(ValueError, match="RANK=8"):
        distributed.from_env({"RANK": "8", "WORLD_SIZE": "8"})
    assert distributed.backend_for("cuda") == "nccl" and distributed.backend_for("cpu") == "gloo"
    with pytest.raises(ValueError, match="nccl.*CUDA.*cpu"):
        distributed.init("cpu", backend="nccl")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with distributed.launch("cpu") as (info, device):  # a plain process: nothing to join
        assert info == distributed.DistInfo() and device == torch.device("cpu")
        assert not torch.distributed.is_initialized()
    x = np.arange(3.0)
    assert distributed.all_reduce_sum(x) is x and distributed.is_main()
    with pytest.raises(ValueError, match="process group"):
        train(ddp_config(), make_cases(), progress=False, ddp=True)
