"""Multi-GPU / multi-node training: torchrun + DistributedDataParallel, and the few helpers it needs.

    torchrun --nproc_per_node=8 -m lckd_kit train --data /data/BraTS2021 --config paper --out runs/p --device cuda

torchrun starts one process ("rank") per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT. ``lckd-kit train`` sees them (:func:`launch`), joins the process group -- NCCL on
CUDA, gloo on the CPU -- and :func:`lckd_kit.train.train` runs its one loop with the model wrapped
in DDP. Without those variables nothing here does anything: one process, as always.

What a distributed run means (``N = world_size``):

* Batch. ``batch_size`` is per rank; the global batch is ``N * batch_size``. Rank ``r`` builds
  slice ``r`` of the step's global case positions (:func:`lckd_kit.train.make_batch`), and every
  random draw (case order, crops, augmentation, stage-2 subset) is keyed by the step and the
  global position, never the rank. So N ranks with batch B see exactly the samples one process
  with batch N*B sees, and since the loss is a mean over the batch and DDP averages gradients,
  they take the same step up to float rounding (the same maths with ``stage2_sampling="batch"``;
  with ``"sample"`` the KD pair means are per rank). Not bit-identical: over many steps the two
  runs part as any two roundings of this model do (tests/test_distributed.py has the numbers).
* Sharding. The cases of a step are a pure function of ``(seed, step)``: a walk through seeded
  per-epoch permutations (:func:`lckd_kit.train.case_indices`). Splitting each step's positions
  between ranks is what a ``DistributedSampler`` over that permutation would do, with no sampler
  epoch to restore: resume stays bit-identical. Election / validation cases are sharded too
  (:func:`shard`), each scored once, and the Dice sums are all-reduced.
* Learning rate: NOT scaled for you. The reference trains batch 2 on one GPU at lr 1e-2. On N
  GPUs either keep ``batch_size`` and accept a global batch of 2N at the same lr (the default), or
  pass ``--batch-size`` to choose the global batch (``--batch-size 1`` on 2 GPUs is the
  reference's global batch 2). If you do grow the batch, scaling the lr is your call: the
  reference has no rule (one GPU only); IM-Fuse scales it by ``sqrt(global_batch / 2)``; the
  linear rule would be ``global_batch / 2``. A step is a global step: step counts, the poly
  schedule and ``elect_every`` are unchanged, so N ranks see N times the samples per step.
* Stage-2 subsets: one per step (the reference draws one per batch), the same on every rank;
  ``stage2_sampling="sample"`` draws one per global sample position. Either way a seed fixes them.
* Teachers: every rank scores its shard, the sums are reduced, every rank elects the same teachers.
* Files: only rank 0 writes config.json, history.jsonl and checkpoints (plain state_dicts without
  DDP's ``module.`` prefix, so they load anywhere with ``train.load_model``). Every rank resumes
  from the same last.pt, so for multi-node runs ``--out`` must be on a filesystem all nodes share.
* Failures: a rank that raises inside :func:`launch` posts its message in the process group's
  store and leaves the group, which breaks the other ranks' pending collectives at once; they
  raise :class:`PeerFailed` quoting the failing rank's message instead of waiting for the
  process-group timeout (:data:`DEFAULT_TIMEOUT_S`, ``LCKD_KIT_DDP_TIMEOUT_S``), which remains
  the backstop for a rank that hangs without raising.
"""
from __future__ import annotations

import inspect
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist


#: process-group timeout (seconds) for a collective whose peers neither answer nor fail; long,
#: because ranks legitimately wait for each other while one loads its cases or writes a checkpoint
DEFAULT_TIMEOUT_S = 1800.0
_FAILURE_KEY = "lckd_kit/failure"
_ACK_KEY = "lckd_kit/failure_seen"


class PeerFailed(RuntimeError):
    """Another rank of the process group failed; the message is that rank's."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """True when torchrun (or anything setting RANK and WORLD_SIZE) started this process."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def from_env(environ: Mapping[str, str] | None = None) -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK of the environment (torchrun's); DistInfo() when absent."""
    env = os.environ if environ is None else environ
    if not launched(env):
        return DistInfo()
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistInfo(rank, world, int(env.get("LOCAL_RANK", rank)))


def current() -> DistInfo:
    """This process in the initialised default process group; DistInfo() when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank = dist.get_rank()
    return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def is_main() -> bool:
    """Rank 0 of the process group, or a plain single process."""
    return current().is_main


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: torch.device | str, local_rank: int) -> torch.device:
    """The device of this rank: a bare ``cuda`` means ``cuda:LOCAL_RANK``; anything else as given."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch sees no CUDA GPU")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"rank wants {device} but only {torch.cuda.device_count()} GPU(s) are visible: "
                         f"--nproc_per_node must not exceed the GPUs per node")
    return device


def init(device: torch.device | str = "cpu", backend: str | None = None,
         timeout_s: float | None = None) -> tuple[DistInfo, torch.device]:
    """Join the default process group described by the environment (torchrun's variables).

    Returns ``(info, device)`` with ``device`` this rank's (``cuda`` -> ``cuda:LOCAL_RANK``, also
    made the current CUDA device). ``backend`` defaults to :func:`backend_for` the device.
    ``timeout_s``: how long a collective waits for a silent peer (default ``LCKD_KIT_DDP_TIMEOUT_S``
    or :data:`DEFAULT_TIMEOUT_S`); a peer that raises inside :func:`launch` ends the others sooner.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("LCKD_KIT_DDP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    backend = backend or backend_for(device)
    if backend == "nccl" and torch.device(device).type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA tensors but the device is {device}: use --device cuda, "
                         f"or backend 'gloo' to train on the CPU")
    if not launched():
        raise ValueError("no RANK / WORLD_SIZE in the environment: start the processes with torchrun")
    info = from_env()
    device = local_device(device, info.local_rank)
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend 'nccl' requested but this torch build has no NCCL; use 'gloo'")
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            kwargs["device_id"] = device  # NCCL then knows each rank's GPU (barrier needs it)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return info, device


def destroy() -> None:
    """Leave the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def launch(device: torch.device | str = "cpu", backend: str | None = None) -> Iterator[tuple[DistInfo, torch.device]]:
    """``with launch(device) as (info, device):`` -- the process group for the body, when launched.

    Under torchrun with WORLD_SIZE > 1: init, yield this rank's info and device, destroy at exit.
    A group the caller already owns is used as it is (not destroyed); a single process (plain
    run, or WORLD_SIZE 1) gets DistInfo() and the device unchanged.
    """
    if dist.is_available() and dist.is_initialized():
        info = current()
        yield info, local_device(device, info.local_rank)
        return
    info = from_env()
    if info.world_size == 1:  # one process: nothing to join, the device exactly as given
        yield info, torch.device(device)
        return
    info, device = init(device, backend)
    try:
        yield info, device
    except BaseException as exc:
        store = _store()  # kept: the group's store outlives the group while referenced
        peer = _failure_report(store, info, exc)
        destroy()  # closes this rank's connections: the others' pending collectives fail now
        if peer is not None:
            raise PeerFailed(peer) from exc
        _wait_for_acks(store, info)
        raise
    finally:
        destroy()


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API, or no group
        return None


def _failure_report(store, info: DistInfo, exc: BaseException) -> str | None:
    """Post this rank's failure in the group's store, unless another rank failed first: then
    return that rank's message (this rank's own error is then a consequence of it)."""
    if store is None:
        return None
    own = f"rank {info.rank} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    try:
        # a collective broken by a failing peer fails here a moment after that peer posted
        deadline = time.monotonic() + (2.0 if _looks_like_peer_loss(exc) else 0.0)
        while True:
            if store.check([_FAILURE_KEY]):
                first = store.get(_FAILURE_KEY).decode()
                if not first.startswith(f"rank {info.rank} "):
                    store.add(_ACK_KEY, 1)
                    return first
                return None
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        store.set(_FAILURE_KEY, own)
    except Exception:  # the store itself is gone (its host rank ended): nothing to share
        return None
    return None


def _looks_like_peer_loss(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("connection", "closed", "reset", "peer", "timed out", "timeout", "gloo", "nccl",
                                   "distbackend", "broken pipe"))


def _wait_for_acks(store, info: DistInfo, timeout_s: float = 5.0) -> None:
    """The failing rank may host the store (rank 0 under a plain env:// start): give the others a
    few seconds to read its message before this process goes."""
    if store is None or info.world_size == 1:
        return
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if store.add(_ACK_KEY, 0) >= info.world_size - 1:
                return
            time.sleep(0.1)
    except Exception:
        return


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items rank ``rank`` handles: ``items[rank::world_size]`` (each item exactly once overall).

    The partition of ``monai.data.DistributedSampler(items, shuffle=False, even_divisible=False)``,
    computed directly because MONAI refuses fewer items than ranks (2 election cases, 8 GPUs).
    A rank may get none; the reductions below still count it.
    """
    return list(items)[rank::world_size]


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x):
    """Sum ``x`` (numpy array or tensor) over all ranks; every rank gets the result.

    Identity without an initialised group of more than one process. A numpy array is reduced in
    float64 and returned as float64 numpy; a tensor comes back on its own device and dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x):
        t = torch.as_tensor(np.asarray(x, dtype=np.float64), device=_reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()
    t = x.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(x.device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = ["DistInfo", "PeerFailed", "DEFAULT_TIMEOUT_S", "launched", "from_env", "current", "is_main", "backend_for", "local_device", "init",
           "destroy", "launch", "shard", "all_reduce_sum", "barrier"]
