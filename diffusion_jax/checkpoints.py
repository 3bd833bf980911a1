"""Orbax checkpoints of a training run, and loading the EMA parameters back for sampling.

A workdir holds ``config.json`` (the :class:`Config` of the run's newest start, written with its
checkpoints) and ``checkpoints/<step>/`` with three items: ``state`` (the whole :class:`TrainState`:
params, EMA, optimiser state, step, PRNG key), ``data`` (each process's data-iterator position, via
grain's Orbax handler) and ``config`` (the config that wrote it), and ``checksums.json``: the size
and SHA-256 of every file of those items, recorded by process 0 once the save has committed (in a
background thread). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoint as the newest good one. A run
continues only under a config that agrees with both records on the keys that define it
(:func:`config_utils.defines_run`).

Every read checks the files against ``checksums.json`` first. A checkpoint that differs from what
was saved (a flipped byte, a truncated or missing file, an unparseable record) is *damaged*
(:class:`CorruptCheckpointError`): the trainer sets it aside and resumes from the one before, and
the loaders fall back to the one before with a warning, unless a step was asked for. A read that
fails with a storage error (``OSError``, TensorStore's ``UNAVAILABLE``, ...) is retried
(:data:`RETRY_DELAYS`) and then stops with :class:`CheckpointUnavailableError`, leaving the
checkpoint in place: a bucket hiccup never rolls a run back. A checkpoint that matches its
checksums but cannot be restored is not damaged, and stops with :class:`CheckpointRestoreError`.
Checkpoints without ``checksums.json`` (saved before it existed, or killed between the commit and
the checksums) are read unverified, and one that fails to load counts as damaged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import config_utils, latent

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"
# Seconds to wait before each further try of a read that failed with a storage error (so 4 tries).
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0, 8.0)
T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint's files differ from what was saved (checksum or size mismatch, a missing file,
    an unparseable record), or a checkpoint without checksums failed to load. ``step`` names it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointUnavailableError(OSError):
    """A checkpoint could not be read now (a storage error, after retries); it is left in place."""


class CheckpointRestoreError(RuntimeError):
    """A checkpoint matches its checksums, so it is intact, but could not be restored."""


class _Manager(ocp.CheckpointManager):
    """Orbax's ``CheckpointManager`` that also records ``checksums.json`` in each step it saves.

    On process 0 a thread per save waits for the save to commit, then hashes the step's files (they
    are final: every process has written its part). ``wait_until_finished`` (and so ``close``) also
    waits for these threads, so a run that exits normally leaves every checkpoint verifiable.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sealing: list[threading.Thread] = []

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        saved = super().save(step, *args, **kwargs)
        if saved and jax.process_index() == 0:
            thread = threading.Thread(
                target=self._record_checksums, args=(int(step),), daemon=True,
                name=f"diffusion_jax-checksums-{step}",
            )  # fmt: skip
            thread.start()
            self._sealing.append(thread)
        return saved

    def _record_checksums(self, step: int) -> None:
        step_dir = epath.Path(self.directory) / str(step)
        try:
            ocp.CheckpointManager.wait_until_finished(self)  # this step's save has committed
            if step_dir.exists():  # not already removed by keep-N
                write_checksums(step_dir)
        except Exception as e:  # noqa: BLE001 - the checkpoint stays usable, only unverified
            if step_dir.exists():
                logging.warning(
                    "Could not record the checksums of checkpoint %d (%s: %s); it will be read "
                    "unverified.", step, type(e).__name__, e,
                )  # fmt: skip

    def wait_until_finished(self) -> None:
        super().wait_until_finished()
        while self._sealing:
            self._sealing.pop().join()


def make_manager(
    workdir: epath.PathLike,
    *,
    keep: int | None = 3,
    async_save: bool = True,
    barrier_prefix: str | None = None,
) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` for ``workdir/checkpoints`` keeping the newest ``keep`` steps
    (None: all).

    Saves happen only when :func:`save` is called (the trainer decides when); leftover temporary
    directories of interrupted saves are removed on creation. Each saved step gets its
    ``checksums.json`` once committed; ``close()`` (or ``wait_until_finished()``) waits for it.
    ``barrier_prefix`` names the multi-process barriers of a second manager that saves at the
    same steps (two managers' barriers would otherwise share names and collide).
    """
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    policies = getattr(ocp, "checkpoint_managers", None)
    if policies is not None and hasattr(policies, "LatestN"):
        keep_kw: dict[str, Any] = {"preservation_policy": policies.LatestN(keep)}
    else:  # older Orbax
        keep_kw = {"max_to_keep": keep}
    barriers: dict[str, Any] = {}
    if barrier_prefix is not None:
        barriers["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=barrier_prefix
        )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        **keep_kw,
        **barriers,
    )
    return _Manager(directory, options=options, item_names=("state", "data", "config"))


def _has_state(data_iter: Any) -> bool:
    return data_iter is not None and hasattr(data_iter, "get_state")


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iter: Any,
    config: config_utils.Config,
    data_shape: tuple[int, ...],
) -> None:
    """Starts saving ``state``, the iterator position, the config and the shape of one example
    (``data_shape``, e.g. (H, W, C)) as checkpoint ``step``.

    With async saving this returns once the arrays are copied off the devices; the files are written
    in the background (call ``manager.wait_until_finished()`` before exiting). All processes call it.
    """
    import grain

    run = {"config": config.to_dict(), "data_shape": list(data_shape)}
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(run)}
    if _has_state(data_iter):
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items))


# ------------------------------------------------------------------------------------------------
# Integrity: checksums, retries, and what a failed read means.


def _files(step_dir: epath.Path, items: Sequence[str] | None) -> Iterator[tuple[str, epath.Path]]:
    """(path relative to ``step_dir``, path) of the files of a checkpoint's items (all items when
    None), without Orbax's ``commit_success.txt`` markers, in a fixed order."""

    def walk(folder: epath.Path) -> Iterator[epath.Path]:  # no rglob: epath refuses ** on GCS
        for path in sorted(folder.iterdir()):
            if path.is_dir():
                yield from walk(path)
            elif path.name != "commit_success.txt":
                yield path

    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        if items is None or item.name in items:
            for path in walk(item):
                yield path.relative_to(step_dir).as_posix(), path


def _digest(path: epath.Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, read in 4 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_checksums(step_dir: epath.Path) -> None:
    """Records the size and SHA-256 of every file of a committed checkpoint in ``checksums.json``
    (atomically, via a temporary file). :class:`_Manager` calls it after each save."""
    files = {}
    for rel, path in _files(step_dir, None):
        size, sha256 = _digest(path)
        files[rel] = {"size": size, "sha256": sha256}
    tmp = step_dir / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    tmp.replace(step_dir / CHECKSUMS_FILE)


def verify_checksums(step_dir: epath.Path, step: int, items: Sequence[str] | None = None) -> bool:
    """Checks the files of ``items`` (default: all) of the checkpoint in ``step_dir`` against its
    ``checksums.json``: True if they match, False if it has none (unverifiable). A mismatch, a
    missing file or an unreadable ``checksums.json`` raises :class:`CorruptCheckpointError`;
    storage errors (``OSError``) propagate, for the caller to retry."""
    record = step_dir / CHECKSUMS_FILE
    if not record.exists():
        return False
    where = f"checkpoint {step} in {step_dir.parent}"
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"{where} is damaged: its {CHECKSUMS_FILE} cannot be parsed ({e})", step
        ) from e
    for rel, expected in sorted(files.items()):
        if items is not None and rel.split("/", 1)[0] not in items:
            continue
        path = step_dir / rel
        if not path.exists():
            raise CorruptCheckpointError(f"{where} is damaged: {rel} is missing", step)
        size, sha256 = _digest(path)
        if size != expected["size"]:
            raise CorruptCheckpointError(
                f"{where} is damaged: {rel} has {size} bytes, {expected['size']} were saved", step
            )
        if sha256 != expected["sha256"]:
            raise CorruptCheckpointError(
                f"{where} is damaged: {rel} differs from what was saved (SHA-256 mismatch)", step
            )
    return True


_TRANSIENT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED)\b")


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen and len(seen) < 10:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """Whether a failed read may succeed if tried again: a storage error (``OSError``: a timeout,
    a lost connection, a permission or quota problem; not a missing file) or a TensorStore status
    UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or ABORTED, here or among its causes."""
    for e in _causes(error):
        if isinstance(e, CorruptCheckpointError | CheckpointUnavailableError):
            return False
        if isinstance(e, FileNotFoundError | NotADirectoryError | IsADirectoryError):
            return False
        if isinstance(e, OSError) or _TRANSIENT_STATUS.search(str(e)[:1000]):
            return True
    return False


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:500]}"


def _with_retries(read: Callable[[], T], what: str) -> T:
    """``read()``, tried again after each of :data:`RETRY_DELAYS` while it fails transiently; then
    :class:`CheckpointUnavailableError`. Other errors propagate at once."""
    delays = RETRY_DELAYS
    for attempt in range(len(delays) + 1):
        try:
            return read()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == len(delays):
                raise CheckpointUnavailableError(
                    f"{what} could not be read: {attempt + 1} tries failed, the last with "
                    f"{_short(e)}. That is a storage problem (network, permissions, quota), not a "
                    "damaged checkpoint, so it was left in place; fix the storage and run again."
                ) from e
            logging.warning(
                "Reading %s failed (%s); trying again in %.1fs.", what, _short(e), delays[attempt]
            )
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def _read_record(step_dir: epath.Path, step: int) -> dict[str, Any]:
    """The run record saved with a checkpoint: {"config": ..., "data_shape": [...]}."""
    path = step_dir / "config" / "metadata"
    try:
        run = json.loads(path.read_text())
        run["config"], run["data_shape"]  # noqa: B018 - both must be there
        return run
    except Exception as e:
        if is_transient(e):
            raise
        raise CorruptCheckpointError(
            f"checkpoint {step} in {step_dir.parent} is damaged: its config record {path} cannot "
            f"be read ({_short(e)})", step,
        ) from e  # fmt: skip


def _check(
    step_dir: epath.Path,
    step: int,
    items: Sequence[str] | None,
    check: Callable[[dict[str, Any]], None] | None,
) -> tuple[bool, dict[str, Any]]:
    """(whether checksums verified the files of ``items``, the run record), once ``check`` accepts
    the record; :class:`CorruptCheckpointError` on a mismatch or an unreadable record."""
    verified = verify_checksums(step_dir, step, items)
    run = _read_record(step_dir, step)
    if check is not None:
        check(run)
    return verified, run


def _read(
    step_dir: epath.Path,
    step: int,
    read: Callable[[dict[str, Any]], T],
    run: dict[str, Any],
    verified: bool,
) -> T:
    """``read(run)``, its errors classified: transient ones as they are (to retry), others as
    :class:`CheckpointRestoreError` if the files were verified, else :class:`CorruptCheckpointError`."""
    try:
        return read(run)
    except Exception as e:
        if isinstance(e, CorruptCheckpointError) or is_transient(e):
            raise
        what = f"checkpoint {step} in {step_dir.parent}"
        if verified:
            raise CheckpointRestoreError(
                f"{what} matches the checksums recorded when it was saved, so it is not damaged, "
                f"but it could not be restored: {_short(e)}"
            ) from e
        raise CorruptCheckpointError(
            f"{what} (saved without checksums) could not be restored: {_short(e)}", step
        ) from e


def read_checkpoint(
    step_dir: epath.Path,
    step: int,
    read: Callable[[dict[str, Any]], T],
    items: Sequence[str] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> T:
    """``read(run)`` of the checkpoint in ``step_dir`` once its files (those of ``items``; default:
    all) match their checksums and ``check(run)`` accepts its run record (``run``: the config and
    data shape saved with it).

    Raises :class:`CorruptCheckpointError` if it is damaged (or, without checksums, if ``read``
    fails), :class:`CheckpointUnavailableError` if storage errors persist through the retries, and
    :class:`CheckpointRestoreError` if it is intact but ``read`` fails; ``check``'s errors propagate.
    """

    def attempt() -> T:
        verified, run = _check(step_dir, step, items, check)
        return _read(step_dir, step, read, run, verified)

    return _with_retries(attempt, f"checkpoint {step} in {step_dir.parent}")


def _all_processes(values: Sequence[int]) -> np.ndarray:
    """``values`` of every process, [process_count, len(values)] (a collective: all must call)."""
    local = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


# Outcomes of one process's try at a checkpoint, compared across processes.
_READ, _DAMAGED, _FAILED = 0, 1, 2


def _attempt(fn: Callable[[], T]) -> tuple[int, Exception | None, T | None]:
    """(outcome, error, result) of ``fn()``: read, damaged or failed."""
    try:
        return _READ, None, fn()
    except CorruptCheckpointError as e:
        return _DAMAGED, e, None
    except Exception as e:  # noqa: BLE001 - reported to the other processes, then raised
        return _FAILED, e, None


def _skip_for_all(outcome: int, error: Exception | None, step: int, directory: epath.Path) -> bool:
    """Whether every process skips checkpoint ``step``: True if it is damaged for any process.
    Raises on every process if any failed otherwise. A collective: all processes call it."""
    outcomes = _all_processes([outcome])[:, 0]
    if outcome == _FAILED:
        raise error
    if (outcomes == _FAILED).any():
        failed = [int(i) for i in np.flatnonzero(outcomes == _FAILED)]
        raise RuntimeError(
            f"process(es) {failed} could not read checkpoint {step} in {directory} (see their "
            "logs); all processes stop."
        )
    if not (outcomes == _DAMAGED).any():
        return False
    if error is not None:
        logging.warning("%s; trying the previous one.", error)
    else:
        damaged = [int(i) for i in np.flatnonzero(outcomes == _DAMAGED)]
        logging.warning(
            "Checkpoint %d in %s is damaged as process(es) %s read it; all processes try the "
            "previous one.", step, directory, damaged,
        )  # fmt: skip
    return True


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: Any,
    config: config_utils.Config | None = None,
) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, also moving ``data_iter`` to its position.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (where to put the
    arrays). Each checkpoint is checked against its checksums first (see :func:`read_checkpoint`).
    A damaged one is skipped with a warning in favour of the one before, and moved to
    ``<workdir>/checkpoints.unreadable/`` so that the run can save that step again; storage errors
    that outlast the retries, and an intact checkpoint that fails to restore, stop with an error
    and move nothing. With ``config``, each checkpoint's saved config is compared first, and one
    saved by a config that differs in what defines the run raises ``ValueError`` (see
    :func:`check_compatible`), before anything is restored or moved.

    With several processes, all restore the same step: each checks a checkpoint's files on its
    own, then they compare outcomes; one damaged for any process is skipped by all, an error on any
    stops all, and only a checkpoint that every process verified is restored (Orbax's restore is a
    collective). Returns None when there is no checkpoint; raises ``RuntimeError`` when none is
    readable.
    """
    import grain

    directory = epath.Path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    if jax.process_count() > 1:  # the same candidates everywhere, or a clear error
        seen = _all_processes([len(steps), steps[0] if steps else -1])
        if len({tuple(row) for row in seen.tolist()}) > 1:
            raise RuntimeError(
                f"the processes see different checkpoints in {directory} ((count, newest step) "
                f"per process: {seen.tolist()}); the workdir must be shared storage."
            )

    def check(step: int, run: dict[str, Any]) -> None:
        if config is not None:
            record = directory / str(step) / "config" / "metadata"
            check_compatible(
                run["config"],
                config,
                f"checkpoint {step} in {directory} was saved by a run",
                record,
            )

    def restore(step: int, run: dict[str, Any]) -> Any:
        del run
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if _has_state(data_iter):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return manager.restore(step, args=ocp.args.Composite(**items)).state

    unreadable = []
    for step in steps:
        step_dir, what = directory / str(step), f"checkpoint {step} in {directory}"
        checked = functools.partial(_check, step_dir, step, None, functools.partial(check, step))
        outcome, error, found = _attempt(functools.partial(_with_retries, checked, what))
        if _skip_for_all(outcome, error, step, directory):
            unreadable.append(step)
            continue
        verified, run = found
        read = functools.partial(_read, step_dir, step, functools.partial(restore, step), run)
        outcome, error, state = _attempt(
            functools.partial(_with_retries, functools.partial(read, verified), what)
        )
        if _skip_for_all(outcome, error, step, directory):
            unreadable.append(step)
            continue
        _set_aside(manager, unreadable)
        return state, step
    if steps:
        raise RuntimeError(
            f"none of the checkpoints {sorted(steps)} in {directory} could be restored (see the "
            "warnings above); move them away to start this run afresh."
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged step directories out of the manager's sight (process 0), then reloads.

    All processes call it with the same ``steps`` (:func:`restore_latest` agrees on them first)."""
    if not steps:
        return
    directory = epath.Path(manager.directory)
    aside = directory.parent / (directory.name + ".unreadable")
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / f"{step}.{int(time.time())}"
            (directory / str(step)).rename(target)
            logging.warning("Moved the damaged checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("diffusion_jax.checkpoints.set_aside")
    manager.reload()


def reached_preemption(manager: ocp.CheckpointManager, step: int) -> bool:
    """True on every process at the same step once any process got a preemption notice (multi-host
    runs with ``jax.distributed``); False otherwise."""
    try:
        return bool(manager.reached_preemption(step))
    except RuntimeError:
        return False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False


def check_storage(workdir: epath.PathLike) -> None:
    """Fails at start, naming what to install, if ``workdir`` is a bucket this setup cannot use.

    Local and mounted folders always work. ``gs://bucket/path`` needs ``gcsfs`` (``etils.epath``'s
    file system for the config, the iterator state, sample PNGs and Orbax's step folders;
    TensorFlow's would do too) and ``google-cloud-storage`` (Orbax lists a bucket's steps with it,
    tensorboardX writes event files with it; recent gcsfs installs it). Orbax writes the arrays
    through TensorStore's own GCS driver. Other URL schemes (s3://, az://, ...) are refused: Orbax
    writes to local paths and gs:// buckets only.
    """
    path = os.fspath(workdir)
    if "://" not in path:
        return
    scheme = path.split("://", 1)[0]
    if scheme != "gs":
        raise ValueError(
            f"workdir {path}: only local (or mounted) folders and gs:// buckets are supported "
            f"(Orbax writes checkpoints to those only); mount the {scheme}:// bucket, or use gs://."
        )
    missing = []
    if not (_installed("gcsfs") or _installed("tensorflow")):
        missing.append("gcsfs")
    if not _installed("google.cloud.storage"):
        missing.append("google-cloud-storage")
    if missing:
        raise ImportError(
            f"workdir {path} needs {' and '.join(missing)}: pip install gcsfs, or the gcs extra "
            "(pip install 'diffusion_jax[gcs]'; gcsfs brings google-cloud-storage too). "
            "Credentials come from the TPU VM's service account or "
            "`gcloud auth application-default login`."
        )


def read_config(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a workdir as a dict, or None if there is none."""
    path = epath.Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_config(workdir: epath.PathLike, config: config_utils.Config) -> None:
    """Writes ``workdir/config.json`` (process 0 only; atomically, via a temporary file).

    The trainer writes it with each checkpoint, so that a start that fails leaves it as it was.
    """
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / CONFIG_FILE
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    tmp.replace(path)


def check_workdir(workdir: epath.PathLike, config: config_utils.Config) -> None:
    """Refuses a workdir whose ``config.json`` differs from ``config`` in what defines the run (its
    seed, data, model, noise process or optimiser state; see :func:`config_utils.defines_run`).

    Settings that only change how a run proceeds (steps, learning rate, logging, checkpointing,
    sampling) may change between runs. :func:`restore_latest` checks the checkpoint's own config too.
    """
    saved = read_config(workdir)
    if saved is not None:
        path = epath.Path(workdir) / CONFIG_FILE
        check_compatible(saved, config, f"workdir {workdir} holds a run", path)


def check_compatible(
    saved: dict[str, Any], config: config_utils.Config, holder: str, record: epath.Path
) -> None:
    """Raises ``ValueError`` listing the keys that define the run in which ``config`` differs from
    ``saved`` (the config recorded in ``record``, described by ``holder``), and what to do.
    ``config`` may also be a classifier's or an autoencoder's (:mod:`diffusion_jax.classifier_trainer`,
    :mod:`diffusion_jax.autoencoder_trainer`); a run of another kind (:func:`config_utils.describe_run`:
    a latent diffusion model is not a diffusion model of the data) is refused."""
    current = config.to_dict()
    kinds = [config_utils.describe_run(c) for c in (saved, current)]
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"{holder} of {kinds[0]}, not of {kinds[1]}: give each its own --workdir (the "
            f"saved config is {record})."
        )
    changes = config_utils.incompatible_changes(saved, current)
    if changes:
        raise ValueError(
            f"{holder} with an incompatible config:\n  "
            + "\n  ".join(changes)
            + "\nThese keys define a run (its seed, data, batch size, model, noise process and "
            "optimiser state), so it cannot continue with them changed; train.num_steps, the "
            "learning rate, logging, checkpoint and sampling settings may change. Use a new "
            f"--workdir to train with these settings, or restore them to continue that run (its "
            f"config is {record})."
        )


def _steps(workdir: epath.PathLike) -> tuple[epath.Path, list[int]]:
    """(the checkpoints directory of ``workdir``, its committed steps, newest first)."""
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoints directory in {workdir}")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "config"),
    )
    try:
        steps = sorted(manager.all_steps(), reverse=True)
    finally:
        manager.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    return directory, steps


def read_newest(
    workdir: epath.PathLike,
    step: int | None,
    read: Callable[[epath.Path, dict[str, Any]], T],
    items: Sequence[str] = ("state", "config"),
) -> tuple[T, int]:
    """(``read(step_dir, run)``, its step) for checkpoint ``step`` of ``workdir``, or (None) the
    newest checkpoint that reads: the one place where readers pick their checkpoint.

    Each try goes through :func:`read_checkpoint` (checksums of ``items``, retries). Without
    ``step``, a damaged checkpoint is skipped with a warning naming it; an explicit ``step`` that is
    damaged raises :class:`CorruptCheckpointError` naming it and the other steps. Nothing is moved.
    """
    directory, steps = _steps(workdir)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {directory}; there are {sorted(steps)}"
            )
        try:
            return read_checkpoint(
                directory / str(step), step, functools.partial(read, directory / str(step)), items
            ), step  # fmt: skip
        except CorruptCheckpointError as e:
            others = sorted(s for s in steps if s != step)
            raise CorruptCheckpointError(
                f"{e}. Choose another checkpoint (step=, or --checkpoint_step in sample.py and "
                f"evaluate.py) of {others}, or none to use the newest readable one.",
                step,
            ) from e
    damaged = []
    for s in steps:
        step_dir = directory / str(s)
        try:
            result = read_checkpoint(step_dir, s, functools.partial(read, step_dir), items)
        except CorruptCheckpointError as e:
            logging.warning("%s; trying the previous one.", e)
            damaged.append(s)
            continue
        if damaged:
            logging.warning(
                "Using checkpoint %d of %s: the newer %s %s damaged.", s, directory,
                ", ".join(map(str, damaged)), "is" if len(damaged) == 1 else "are",
            )  # fmt: skip
        return result, s
    raise CorruptCheckpointError(
        f"none of the checkpoints {sorted(steps)} in {directory} is readable (see the warnings "
        "above)", damaged[-1],
    )  # fmt: skip


def resolve_step(workdir: epath.PathLike, step: int | None = None) -> int:
    """``step`` if its checkpoint is intact (checksums of its state and config), else (None) the
    newest intact checkpoint's step; see :func:`read_newest`."""
    return read_newest(workdir, step, lambda step_dir, run: None)[1]


def load_ema_params(
    workdir: epath.PathLike, step: int | None = None
) -> tuple[Any, config_utils.Config]:
    """(EMA params, typed Config) of the checkpoint at ``step`` (default: the newest readable one,
    with a warning naming each damaged one skipped) in ``workdir``.

    Only the EMA parameters are read, onto the first local device, whatever the mesh of the run
    that wrote them, after checking the checkpoint's files against their checksums. Rebuild the
    network with ``config_utils.build_model(config)`` and a sampler with
    ``config_utils.build_sampler(config)``, or use :func:`load_sampler`. A damaged checkpoint asked
    for by ``step`` raises :class:`CorruptCheckpointError`.
    """
    params, config, _, _ = _load(workdir, step)
    return params, config


class LoadedSampler(NamedTuple):
    """A trained run ready to sample: ``sample(params, rng, (n, *data_shape), **model_kwargs)``.
    ``step``: the checkpoint the parameters came from. For a latent diffusion run ``params`` is
    {"diffusion": ..., "autoencoder": ...}, ``data_shape`` the images' and ``sample`` returns
    decoded images (:func:`latent.make_latent_sampler`)."""

    sample: Callable[..., Any]
    params: Any
    config: config_utils.Config
    data_shape: tuple[int, ...]
    step: int | None = None


def load_sampler(
    workdir: epath.PathLike, step: int | None = None, **sample_overrides: Any
) -> LoadedSampler:
    """The EMA parameters of a run with its sampler (checkpoint ``step``, or the newest readable
    one, as :func:`load_ema_params`); ``sample_overrides`` replace ``config.sample`` entries, e.g.
    ``sampler="ddim", num_steps=50`` (the returned ``config`` carries them)."""
    params, config, data_shape, step = _load(workdir, step)
    config = dataclasses.replace(
        config, sample=dataclasses.replace(config.sample, **sample_overrides)
    )
    return LoadedSampler(config_utils.build_sampler(config), params, config, data_shape, step)


def read_run(workdir: epath.PathLike, step: int | None = None) -> tuple[epath.Path, dict[str, Any]]:
    """(directory of checkpoint ``step`` (default: the newest intact one), the run record saved with
    it: {"config": the config's dict, "data_shape": the shape of one example})."""
    return read_newest(workdir, step, lambda step_dir, run: (step_dir, run))[0]


def restore_ema_params(step_dir: epath.Path, init_fn: Callable[[], Any]) -> Any:
    """Only the EMA parameters of the checkpoint in ``step_dir``, onto the first local device.

    ``init_fn()`` builds parameters of the right structure (run under ``jax.eval_shape``, so free).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), jax.eval_shape(init_fn)
    )
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=device), abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"ema_params": abstract},
                restore_args={"ema_params": restore_args},
                partial_restore=True,
            ),
        )
    return restored["ema_params"]


def _load(workdir: epath.PathLike, step: int | None):
    """(EMA params, config, shape of one sample, step); a latent run's params come with its
    autoencoder's, {"diffusion": ..., "autoencoder": ...}, and its samples have the images' shape."""

    _check_kind(workdir, read_config(workdir), "diffusion", "there is nothing to sample")

    def read(step_dir: epath.Path, run: dict[str, Any]):
        config = config_utils.parse_config(run["config"])
        data_shape = tuple(run["data_shape"])
        model = config_utils.build_model(config)
        params = restore_ema_params(
            step_dir, lambda: config_utils.init_params(model, config, data_shape, jax.random.key(0))
        )
        return params, config, data_shape

    (params, config, data_shape), step = read_newest(workdir, step, read)
    if config.latent is not None:
        autoencoder = load_autoencoder(
            config.latent.autoencoder_workdir, config.latent.autoencoder_step
        )
        if autoencoder.kwargs != config.latent.autoencoder:
            raise ValueError(
                f"the autoencoder in {config.latent.autoencoder_workdir} (step "
                f"{autoencoder.step}) is not the one the latent run in {workdir} was trained on: "
                f"its network is {autoencoder.kwargs}, the run recorded {config.latent.autoencoder}."
            )
        params = {"diffusion": params, "autoencoder": autoencoder.params}
        data_shape = autoencoder.image_shape
    return params, config, data_shape, step


def _check_kind(
    workdir: epath.PathLike, saved: dict[str, Any] | None, kind: str, context: str
) -> None:
    """Raises a ValueError naming what ``workdir`` holds if its ``config.json`` (``saved``; None:
    not checked) is of another kind of run than ``kind`` (:func:`config_utils.run_kind`)."""
    if saved is None or config_utils.run_kind(saved) == kind:
        return
    holds = config_utils.RUN_KINDS[config_utils.run_kind(saved)]
    raise ValueError(f"{workdir} holds {holds}, not {config_utils.RUN_KINDS[kind]} ({context}).")


class LoadedAutoencoder(NamedTuple):
    """An autoencoder run's EMA ``params``, its network's keyword arguments ``kwargs``
    (:func:`config_utils.build_autoencoder`), the ``image_shape`` it was trained on (H, W, C), its
    ``step`` and its ``stats`` (:data:`latent.LATENT_STATS_FILE`, or None if not yet measured)."""

    params: Any
    kwargs: dict[str, Any]
    image_shape: tuple[int, ...]
    step: int
    stats: dict[str, Any] | None


def load_autoencoder(workdir: epath.PathLike | None, step: int | None = None) -> LoadedAutoencoder:
    """The autoencoder of an autoencoder workdir (``train.py`` with an autoencoder config) at
    checkpoint ``step`` (None: the newest readable one); a FileNotFoundError that says how to make
    one if ``workdir`` holds no checkpoints, a ValueError if it holds another kind of run."""
    if workdir is None or not (epath.Path(workdir) / CHECKPOINT_DIR).exists():
        raise FileNotFoundError(
            f"latent.autoencoder_workdir={workdir} holds no trained autoencoder (no "
            f"{CHECKPOINT_DIR}/ there): train one first, e.g. python train.py --config "
            f"configs/digits_autoencoder.py --workdir {workdir or '/tmp/digits_autoencoder'}"
        )

    _check_kind(workdir, read_config(workdir), "autoencoder", "latent.autoencoder_workdir")

    def read(step_dir: epath.Path, run: dict[str, Any]):
        kwargs = config_utils.autoencoder_module_kwargs(run["config"]["autoencoder"])
        image_shape = tuple(run["data_shape"])
        model = config_utils.build_autoencoder(kwargs)
        x = np.zeros((1, *image_shape), np.float32)
        params = restore_ema_params(step_dir, lambda: model.init(jax.random.key(0), x)["params"])
        return params, kwargs, image_shape

    (params, kwargs, image_shape), step = read_newest(workdir, step, read)
    return LoadedAutoencoder(params, kwargs, image_shape, step, latent.read_latent_stats(workdir))


def resolve_latent(
    config: config_utils.Config,
) -> tuple[config_utils.Config, LoadedAutoencoder | None]:
    """(``config`` with its ``latent`` section completed from the autoencoder workdir, the
    autoencoder): the checkpoint step (the newest readable one unless given), the scale factor
    (unless given: the one measured at that step, from :data:`latent.LATENT_STATS_FILE`) and the
    network. A config without a latent section comes back as it is, with None. Raises with what
    to do when the workdir has no autoencoder, or no statistics for that step."""
    lat = config.latent
    if lat is None:
        return config, None
    found = load_autoencoder(lat.autoencoder_workdir, lat.autoencoder_step)
    scale = lat.scale_factor
    if scale is None:
        stats = found.stats
        stats_file = epath.Path(lat.autoencoder_workdir) / latent.LATENT_STATS_FILE
        if stats is None:
            raise FileNotFoundError(
                f"{stats_file} does not exist: the autoencoder trainer writes it (the latents' "
                "scale factor) when its training ends. Finish that run (rerun train.py on its "
                "workdir), or set latent.scale_factor yourself."
            )
        if stats["step"] != found.step:
            raise ValueError(
                f"{stats_file} was measured at step {stats['step']}, but the autoencoder's "
                f"checkpoint is step {found.step}: set latent.autoencoder_step={stats['step']}, "
                "or latent.scale_factor yourself."
            )
        scale = float(stats["scale_factor"])
    if lat.autoencoder and lat.autoencoder != found.kwargs:
        raise ValueError(
            f"latent.autoencoder={dict(lat.autoencoder)} is not the network in "
            f"{lat.autoencoder_workdir} ({found.kwargs}); leave the key out, the trainer fills it in."
        )
    resolved = dataclasses.replace(
        lat, autoencoder_step=found.step, scale_factor=scale, autoencoder=found.kwargs
    )
    return dataclasses.replace(config, latent=resolved), found
