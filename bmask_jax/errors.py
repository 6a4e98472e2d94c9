"""Every command's one error boundary. The errors a user can cause (a bad or unsafe weight file,
a failed download, a damaged checkpoint, a missing input, a config conflict, a missing optional
extra, a file system that refuses a write) end the command with one line on stderr that names
the culprit (file, URL, key) and what to do, and exit status 1. Anything else is a bug and keeps
its traceback. `--verbose` on any command (or BMASK_JAX_VERBOSE=1) shows the traceback of a user
error too.

The error classes live with the code that raises them; this module names them by dotted path
and only looks at modules already imported (an error of a module that was never imported
cannot have been raised), so it imports nothing of bmask_jax and costs nothing to load.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys

USER_ERRORS = (
    "bmask_jax.weights.download.DownloadError",
    "bmask_jax.weights.errors.WeightImportError",       # DamagedWeightsError too
    "bmask_jax.weights.errors.UnsafeCheckpointError",
    "bmask_jax.weights.model_zoo.WeightsNotFoundError",
    "bmask_jax.weights.pretrained.WeightsConflictError",
    "bmask_jax.engine.checkpoints.CheckpointError",
    "bmask_jax.train.ClassCountError",
    "bmask_jax.train.NonFiniteLossError",
    "bmask_jax.evaluation.cityscapes_eval.CityscapesEvalError",
)
# OS errors a user's files, disks and ports cause (the others, e.g. EBADF, are bugs).
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
               errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EADDRINUSE, errno.EADDRNOTAVAIL,
               errno.ENAMETOOLONG, errno.EMFILE, errno.EFBIG}
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "BMASK_JAX_VERBOSE"
MAX_LINES = 3


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says what to pip install."""


class UsageError(ValueError):
    """A command's arguments that cannot work together; the message names them."""


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [MissingExtraError, UsageError, FileNotFoundError]
    for dotted in USER_ERRORS:
        module, _, name = dotted.rpartition(".")
        if module in sys.modules and hasattr(sys.modules[module], name):
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, user_error_types()):
        return True
    return isinstance(e, OSError) and e.errno in USER_ERRNOS


def one_line(e: BaseException) -> str:
    """The error's message, at most MAX_LINES lines (an OSError's names its file)."""
    if isinstance(e, OSError) and e.strerror and type(e).__str__ is OSError.__str__:
        names = " -> ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
        message = f"{names}: {e.strerror}" if names else e.strerror
    else:
        message = str(e).strip() or type(e).__name__
    lines = message.splitlines()
    return "\n".join(lines[:MAX_LINES - 1] + ([" ".join(lines[MAX_LINES - 1:])] if len(lines) >= MAX_LINES else []))


def writable_folder(path: str, what: str) -> str:
    """Makes the folder `path` if needed and proves it writable (a file written and removed), so
    that a run finds out before its work, not when it saves the result; an OSError names `what`
    (the flag) and the path. Returns path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, f"{what}={path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise type(e)(e.errno, f"{what}={path} cannot be written to: {e.strerror}") from None
    return path


def take_verbose_flag(argv: list[str]) -> list[str]:
    """argv without --verbose; its presence sets BMASK_JAX_VERBOSE=1 (seen by boundary)."""
    if VERBOSE_FLAG in argv:
        os.environ[VERBOSE_ENV] = "1"
    return [a for a in argv if a != VERBOSE_FLAG]


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def boundary(command: str = ""):
    """Turns a user error raised inside into `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - sorted into the user's and bugs right here
        if verbose() or not is_user_error(e):
            raise
        prefix = f"{command}: " if command else ""
        sys.exit(f"error: {prefix}{one_line(e)}")
