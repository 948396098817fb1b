"""How a failure reaches a user of the command line: one line, ``<what>: <problem>; <what to do>``.

:class:`CLIError` is a failure the user can fix; :func:`describe` turns any exception into the one
line ``lckd-kit`` prints, adding a hint for the usual disk and permission errors; :func:`expected`
tells failures of the input, the disk or the run (exit status 2) from bugs of the kit (exit 1).
No torch import here: the CLI checks its arguments before anything heavy is loaded.
"""
from __future__ import annotations

import errno


class CLIError(Exception):
    """A failure the user can fix: ``problem`` (starting with the file or option concerned) and
    ``hint``, what to do."""

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(problem)
        self.problem, self.hint = problem, hint

    def __str__(self) -> str:
        return self.problem + (f"; {self.hint}" if self.hint else "")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


OS_HINTS = {
    errno.ENOSPC: "free space on that disk, or write to another one",
    errno.EDQUOT: "free space on that disk, or write to another one",
    errno.EROFS: "choose a folder on a writable disk",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENOTDIR: "a file is in the way: choose another path",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EISDIR: "it is a folder: pass a file",
    errno.ENOENT: "check the path",
}


def describe(exc: BaseException, command: str) -> str:
    """The one-line message of an exception: what, problem, what to do."""
    if isinstance(exc, CLIError):
        return one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
        hint = OS_HINTS.get(exc.errno or 0)
        if hint and ";" not in exc.strerror:
            text += f"; {hint}"
        return one_line(text)
    text = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory ({text}); use a smaller --config, fewer cases (--max-cases) or a bigger machine"
    if ";" not in text:
        hint = "check the path" if isinstance(exc, FileNotFoundError) else \
            f"rerun with --debug to see where it failed"
        text += f"; {hint}"
    return text


def expected(exc: BaseException) -> bool:
    """Failures of the input, the disk or the run (exit 2), not bugs of the kit (exit 1)."""
    from_kit = type(exc).__name__ in ("TrainingDiverged", "PeerFailed", "RunFolderBusy", "CheckpointError")
    return isinstance(exc, (CLIError, ValueError, OSError, MemoryError)) or from_kit


__all__ = ["CLIError", "OS_HINTS", "describe", "expected", "one_line"]
