"""Orbax checkpointing of the train state: async saves, keep-N, resume from the newest intact
step, and the failures a careful user meets said in one line each:

- a damaged or empty newest step (a truncated or deleted file, a missing _METADATA, an empty
  folder left behind) is reported with its folder and what is wrong, and the newest intact
  step is used instead; the damaged folder is never deleted (training moves it aside to
  `<step>.damaged` so that the step can be saved again);
- a save that fails (a full disk) stops training with one line naming the path and the cause;
- partial `*.orbax-checkpoint-tmp*` folders of an interrupted save are removed on the next start.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import threading

import jax
import orbax.checkpoint as ocp

TMP_MARKER = ".orbax-checkpoint-tmp"
# Written beside each finished step: every file's size. A truncated or deleted file is found by
# comparing sizes, before orbax reads anything (orbax's failed reads end in a storm of
# "Event loop is closed" tracebacks from its reader threads).
MANIFEST = "bmask_files.json"


class CheckpointError(RuntimeError):
    """No intact checkpoint, or a save that failed; the message is one line."""


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _closed_loop_error(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_closed_loop_errors() -> None:
    """After a failed read or write, orbax's tensorstore callbacks keep calling into the asyncio
    loop it closed, and each prints a RuntimeError("Event loop is closed") traceback: hundreds of
    lines that bury the one that matters. Drop those (only those)."""
    if getattr(sys, "_bmask_quiet_loop", False):
        return
    sys._bmask_quiet_loop = True
    previous_unraisable, previous_thread, previous_except = sys.unraisablehook, threading.excepthook, sys.excepthook

    def unraisable(args):
        if not _closed_loop_error(args.exc_value):
            previous_unraisable(args)

    def thread(args):
        if not _closed_loop_error(args.exc_value):
            previous_thread(args)

    def excepthook(kind, value, tb):
        if not _closed_loop_error(value):
            previous_except(kind, value, tb)

    sys.unraisablehook, threading.excepthook, sys.excepthook = unraisable, thread, excepthook
    # The failed write itself is logged by each of orbax's threads with its traceback, and by
    # asyncio for each future nobody awaited; save_failure says it once.
    logging.getLogger("absl").addFilter(_drop_write_failure_logs)
    logging.getLogger("asyncio").addFilter(_drop_write_failure_logs)


_WRITE_FAILURE = ("RESOURCE_EXHAUSTED", "No space left on device", "Failed writing", "exception was never retrieved")


def _drop_write_failure_logs(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
        return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return not any(marker in text for marker in _WRITE_FAILURE)


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    quiet_closed_loop_errors()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(directory(workdir), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
    """Start saving `step`; a failure of an earlier (asynchronous) save is raised here, as a
    one-line CheckpointError."""
    try:
        mgr.wait_until_finished()                 # the save in flight, if any: its failure is raised here
        mgr.check_for_errors()
        write_manifests(str(mgr.directory))       # the steps finished so far (the folders orbax renamed in)
    except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
        raise CheckpointError(save_failure(mgr.directory, e)) from e
    # A save that cannot fit is not started: a full disk mid-write leaves a partial folder.
    need = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(state))
    free = shutil.disk_usage(str(mgr.directory)).free
    if free < need:
        raise CheckpointError(f"saving checkpoint {step} needs about {need / 2**20:.1f} MiB, but {mgr.directory} "
                              f"has {free / 2**20:.1f} MiB free: no space left on device; training stopped")
    # Inodes too: orbax's threads wait on each other, and one that cannot create its folder
    # left the others waiting 5 minutes before the error came (seen on a tmpfs out of inodes).
    need_files, free_files = files_needed(str(mgr.directory)), files_free(str(mgr.directory))
    if need_files and free_files is not None and free_files < need_files:
        raise CheckpointError(f"saving checkpoint {step} needs about {need_files} files, but {mgr.directory} "
                              f"has {free_files} free inodes: no space left on device; training stopped")
    try:
        mgr.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(save_failure(mgr.directory, e)) from e


def files_needed(folder: str) -> int:
    """Files and folders a save creates, as many as the newest finished step holds (plus its
    own folder and a temporary one); 0 before the first."""
    steps = step_folders(folder)
    if not steps:
        return 0
    return 2 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(os.path.join(folder, str(steps[0]))))


def files_free(folder: str) -> int | None:
    """Free inodes for an unprivileged writer, or None where the filesystem has no fixed
    number (it reports a total of 0, e.g. btrfs)."""
    st = os.statvfs(folder)
    return int(st.f_favail) if st.f_files else None


def write_manifests(folder: str) -> None:
    """MANIFEST in every finished step folder that has none (process 0 writes)."""
    if jax.process_index() != 0:
        return
    for step in step_folders(folder):
        path = os.path.join(folder, str(step))
        if os.path.exists(os.path.join(path, MANIFEST)) or not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
            continue
        sizes = {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(path) for f in files}
        with open(os.path.join(path, MANIFEST + ".tmp"), "w") as f:
            json.dump(sizes, f)
        os.replace(os.path.join(path, MANIFEST + ".tmp"), os.path.join(path, MANIFEST))


def check(mgr: ocp.CheckpointManager) -> None:
    """Raise a failure of the asynchronous save in flight (cheap: called every step, so that a
    full disk stops training within one step of the failed write)."""
    try:
        mgr.check_for_errors()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(save_failure(mgr.directory, e)) from e


def finish(mgr: ocp.CheckpointManager, raise_errors: bool = True) -> None:
    """Wait for the last save and close the manager (its threads end here, not in a storm of
    errors at interpreter exit); a failed save as a one-line CheckpointError unless
    raise_errors is False (an error is already on its way)."""
    try:
        mgr.wait_until_finished()
        mgr.check_for_errors()
        write_manifests(str(mgr.directory))
    except Exception as e:  # noqa: BLE001
        if raise_errors:
            raise CheckpointError(save_failure(mgr.directory, e)) from e
    finally:
        try:
            mgr.close()
        except Exception:  # noqa: BLE001 - closing after a failed save
            pass


def save_failure(folder, error: BaseException) -> str:
    """One line for a failed save: the path orbax was writing and the cause."""
    text = " ".join(str(x) for x in _chain(error))
    path = re.search(r"(/[^\s'\"]*" + re.escape(TMP_MARKER) + r"[^\s'\":]*)", text)
    where = path.group(1) if path else str(folder)
    no_space = any(getattr(x, "errno", None) == errno.ENOSPC for x in _chain(error)) or \
        "No space left on device" in text or "ENOSPC" in text
    cause = "no space left on device" if no_space else _first_line(error)
    return f"saving a checkpoint failed: {where}: {cause}; training stopped"


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    root = list(_chain(error))[-1]
    lines = [x for x in str(root).strip().splitlines() if x.strip()]
    return f"{type(root).__name__}: {lines[0][:300] if lines else ''}"


def remove_partial_saves(workdir: str) -> list[str]:
    """Delete the `*.orbax-checkpoint-tmp*` folders an interrupted save left (they hold no
    usable checkpoint and may fill the disk); returns their names."""
    folder = directory(workdir)
    removed = sorted(n for n in os.listdir(folder) if TMP_MARKER in n) if os.path.isdir(folder) else []
    for name in removed:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    if removed:
        logging.warning("removed %d partial checkpoint folder(s) of an interrupted save: %s", len(removed),
                        ", ".join(removed))
    return removed


def step_folders(folder: str) -> list[int]:
    """The step numbers of the step folders in a checkpoints folder, newest first."""
    return sorted((int(n) for n in os.listdir(folder) if n.isdigit()), reverse=True) if os.path.isdir(folder) else []


def _quick_problem(path: str) -> str | None:
    """What is visibly wrong with a step folder before orbax reads it, or None."""
    try:
        if not os.listdir(path):
            return "empty folder"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    for required in ("_CHECKPOINT_METADATA", os.path.join("default", "_METADATA")):
        if not os.path.exists(os.path.join(path, required)):
            return f"{required} is missing"
    manifest = os.path.join(path, MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                sizes = dict(json.load(f))
        except (OSError, ValueError, TypeError):
            return f"{MANIFEST} is unreadable"
        for rel, size in sorted(sizes.items()):
            file = os.path.join(path, rel)
            if not os.path.exists(file):
                return f"{rel} is missing"
            if os.path.getsize(file) != size:
                return f"{rel} is {os.path.getsize(file)} bytes, {size} when saved"
    return None


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, set_aside_damaged: bool = False,
                   partial: bool = False):
    """Restore the newest intact checkpoint into the structure/shardings of abstract_state, or
    return None when the directory holds none. partial: abstract_state is a dict naming some
    of the saved state's fields (e.g. step, params, frozen), and only those are read. A damaged
    newer step is reported in one line (and moved aside to <step>.damaged with
    set_aside_damaged, for a run that will save that step again); if every step is damaged,
    CheckpointError names them."""
    folder = str(mgr.directory)
    steps = step_folders(folder)
    if not steps:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    if partial:
        args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    else:
        args = ocp.args.StandardRestore(abstract)
    damaged = []
    for step in steps:
        path = os.path.join(folder, str(step))
        problem = _quick_problem(path)
        if problem is None:
            try:
                restored = mgr.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - tensorstore, orbax and OS errors alike
                problem = _first_line(e)
            else:
                for bad, why in damaged:
                    # Moved aside only now that an intact step exists: with none, the next run
                    # must stop again rather than start afresh.
                    where = f"moved to {_set_aside(bad)}" if set_aside_damaged else "left in place"
                    logging.warning("checkpoint %s is damaged (%s): skipped, %s", bad, why, where)
                if damaged:
                    logging.warning("using step %d, the newest intact checkpoint", step)
                    if set_aside_damaged:
                        mgr.reload()           # the moved steps are no longer the manager's
                return restored
        damaged.append((path, problem))
    raise CheckpointError(f"no intact checkpoint under {folder}: "
                          + "; ".join(f"{path} ({why})" for path, why in damaged))


def _set_aside(path: str) -> str:
    target, k = f"{path}.damaged", 1
    while os.path.exists(target):
        k += 1
        target = f"{path}.damaged{k}"
    os.rename(path, target)
    return os.path.basename(target)
