"""How many CPU threads the kit should use: the cores that are actually free, not the cores there are.

PyTorch starts one intra-op thread per core. On a machine where another program keeps a core busy,
a thread on that core is descheduled in the middle of every parallel region and the other threads
wait for it at the region's end, so a step can take several times as long as with one thread fewer
(docs/performance.md, "Sharing the CPU"). :func:`set_threads` ``("auto")`` looks at how busy each
core is right now and uses only the free ones:

    from lckd_kit.runtime import set_threads
    n, message = set_threads("auto")     # e.g. (1, "1 torch thread: 1 of 2 cores free")

The ``lckd-kit`` commands do this by default (``--threads auto``; ``--threads N`` fixes it).
Also here: :func:`resolve_device`, :func:`format_seconds`, and the malloc setting the CLI applies to
its own process (:func:`retain_freed_memory`).
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

__all__ = ["allowed_cores", "free_cores", "parse_threads", "set_threads", "resolve_device", "format_seconds",
           "retain_freed_memory", "user_tuned_malloc"]


def allowed_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity), else ``range(os.cpu_count())``."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """cpu id -> (idle jiffies, total jiffies) from /proc/stat; {} where it cannot be read."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                out[int(name[3:])] = (idle, sum(values))
    except (OSError, ValueError):
        return {}
    return out


def free_cores(interval: float = 0.3, stat_path: str = "/proc/stat") -> int:
    """How many of this process's cores are idle: the idle share of each allowed core over
    ``interval`` seconds, summed and rounded (at least 1). Where ``/proc/stat`` cannot be read
    (not Linux), all allowed cores count as free."""
    cores = allowed_cores()
    before = _cpu_times(stat_path)
    if not before:
        return max(1, len(cores))
    time.sleep(interval)
    after = _cpu_times(stat_path)
    idle = 0.0
    for c in cores:
        if c not in before or c not in after:
            idle += 1.0  # a core we cannot see: assume it is free
            continue
        d_idle, d_total = after[c][0] - before[c][0], after[c][1] - before[c][1]
        idle += min(1.0, max(0.0, d_idle / d_total)) if d_total > 0 else 1.0
    return max(1, min(len(cores), int(idle + 0.5)))


def parse_threads(spec) -> int | None:
    """``"auto"`` -> None; ``N`` / ``"N"`` (N >= 1) -> N; anything else raises ValueError."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return None
    try:
        n = int(str(spec).strip())
    except ValueError:
        raise ValueError(f"threads must be 'auto' or a whole number >= 1, got {spec!r}") from None
    if n < 1:
        raise ValueError(f"threads must be 'auto' or a whole number >= 1, got {spec!r}")
    return n


def set_threads(spec="auto", interval: float = 0.3) -> tuple[int, str]:
    """Set torch's intra-op thread count -> ``(n, one-line message saying why)``.

    ``spec``: ``"auto"`` (the default) or a whole number. ``auto`` uses :func:`free_cores`, shared
    between the processes torchrun started on this node (``LOCAL_WORLD_SIZE``), and leaves an
    explicit ``OMP_NUM_THREADS`` alone (the user chose)."""
    import torch

    n = parse_threads(spec)
    if n is not None:
        torch.set_num_threads(n)
        return n, f"{n} torch thread{'s' if n > 1 else ''} (--threads {n})"
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        return n, f"{n} torch thread{'s' if n > 1 else ''} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    total = len(allowed_cores())
    free = free_cores(interval)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n = max(1, free // local)
    torch.set_num_threads(n)
    share = f", shared by {local} processes" if local > 1 else ""
    return n, f"{n} torch thread{'s' if n > 1 else ''}: {free} of {total} cores free{share} (--threads N to choose)"


def resolve_device(device=None):
    """``None`` or ``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device``."""
    import torch  # here, not at the top: the CLI checks its arguments before torch is imported

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def format_seconds(seconds: float) -> str:
    """A duration for a progress line or a report: ``"42 s"``, or ``"3.5 min"`` from 90 s on."""
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------------------------
# memory: what the CLI does for its own process


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS (glibc only;
    returns False, changing nothing, elsewhere).

    glibc serves every allocation above its mmap threshold (adaptive, at most 32 MB) with fresh pages
    from mmap and unmaps them on free, so every large activation (a paper-size stem map is 113 MB)
    pays page faults and kernel zeroing again, step after step. With mmap and trimming off, freed
    blocks are reused, which makes the paper config's CPU training step faster (benchmarks/run.py,
    ``alloc`` section; docs/performance.md). The cost: the process keeps its peak
    memory (and some fragmentation) until it exits, which is why the library never does this by
    itself; the CLI does, for its own process. There is no undo: glibc's adaptive defaults cannot
    be restored once set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def user_tuned_malloc(environ=os.environ) -> bool:
    """Whether the environment already tunes glibc malloc (then the CLI leaves it alone)."""
    return any(k.startswith("MALLOC_") for k in environ) or "malloc" in environ.get("GLIBC_TUNABLES", "")
