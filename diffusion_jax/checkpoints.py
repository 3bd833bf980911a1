"""Orbax checkpoints of a training run, and loading the EMA parameters back for sampling.

A workdir holds ``config.json`` (the :class:`Config` of the run's newest start, written with its
checkpoints) and ``checkpoints/<step>/`` with three items: ``state`` (the whole :class:`TrainState`:
params, EMA, optimiser state, step, PRNG key), ``data`` (each process's data-iterator position, via
grain's Orbax handler) and ``config`` (the config that wrote it). Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint as the newest good one. A run continues only under a config that agrees with both
records on the keys that define it (:func:`config_utils.defines_run`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import config_utils

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def make_manager(
    workdir: epath.PathLike, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` for ``workdir/checkpoints`` keeping the newest ``keep`` steps.

    Saves happen only when :func:`save` is called (the trainer decides when); leftover temporary
    directories of interrupted saves are removed on creation.
    """
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    policies = getattr(ocp, "checkpoint_managers", None)
    if policies is not None and hasattr(policies, "LatestN"):
        keep_kw: dict[str, Any] = {"preservation_policy": policies.LatestN(keep)}
    else:  # older Orbax
        keep_kw = {"max_to_keep": keep}
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        **keep_kw,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "config"))


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


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: Any,
    config: config_utils.Config | None = None,
) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, also moving ``data_iter`` to its position.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (where to put the
    arrays). A checkpoint that fails to load is skipped with a warning in favour of the one before,
    and moved to ``<workdir>/checkpoints.unreadable/`` so that the run can save that step again.
    With ``config``, each checkpoint's saved config is read first, and one saved by a config that
    differs in what defines the run raises ``ValueError`` (see :func:`check_compatible`), before
    anything is restored or moved. Returns None when there is no readable checkpoint.
    """
    import grain

    directory = epath.Path(manager.directory)
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        if config is not None:
            record = directory / str(step) / "config" / "metadata"
            try:
                saved = json.loads(record.read_text())["config"]
            except Exception as e:  # noqa: BLE001 - a checkpoint without its config is unusable
                _warn_unreadable(manager, step, e)
                unreadable.append(step)
                continue
            check_compatible(
                saved, config, f"checkpoint {step} in {directory} was saved by a run", record
            )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if _has_state(data_iter):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure means: this checkpoint is unusable
            _warn_unreadable(manager, step, e)
            unreadable.append(step)
            continue
        _set_aside(manager, unreadable)
        return restored.state, step
    return None


def _warn_unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    logging.warning(
        "Checkpoint at step %d in %s could not be restored (%s: %s); trying the previous one.",
        step, manager.directory, type(error).__name__, str(error)[:500],
    )  # fmt: skip


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves unreadable step directories out of the manager's sight (process 0), then reloads."""
    if not steps:
        return
    directory = epath.Path(manager.directory)
    aside = directory.parent / (directory.name + ".unreadable")
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / f"{step}.{int(time.time())}"
            (directory / str(step)).rename(target)
            logging.warning("Moved the unreadable checkpoint %d to %s", step, target)
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
    ``saved`` (the config recorded in ``record``, described by ``holder``), and what to do."""
    changes = config_utils.incompatible_changes(saved, config.to_dict())
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


def _latest_good_step(directory: epath.Path, step: int | None) -> int:
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "config"),
    )
    steps = manager.all_steps()
    manager.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {directory}; there are {sorted(steps)}"
        )
    return step


def load_ema_params(
    workdir: epath.PathLike, step: int | None = None
) -> tuple[Any, config_utils.Config]:
    """(EMA params, typed Config) of the checkpoint at ``step`` (default: the newest) in ``workdir``.

    Only the EMA parameters are read, onto the first local device, whatever the mesh of the run
    that wrote them. Rebuild the network with ``config_utils.build_model(config)`` and a sampler with
    ``config_utils.build_sampler(config)``, or use :func:`load_sampler`.
    """
    params, config, _ = _load(workdir, step)
    return params, config


class LoadedSampler(NamedTuple):
    """A trained run ready to sample: ``sample(params, rng, (n, *data_shape), **model_kwargs)``."""

    sample: Callable[..., Any]
    params: Any
    config: config_utils.Config
    data_shape: tuple[int, ...]


def load_sampler(
    workdir: epath.PathLike, step: int | None = None, **sample_overrides: Any
) -> LoadedSampler:
    """The EMA parameters of a run with its sampler; ``sample_overrides`` replace ``config.sample``
    entries, e.g. ``sampler="ddim", num_steps=50`` (the returned ``config`` carries them)."""
    params, config, data_shape = _load(workdir, step)
    config = dataclasses.replace(
        config, sample=dataclasses.replace(config.sample, **sample_overrides)
    )
    return LoadedSampler(config_utils.build_sampler(config), params, config, data_shape)


def read_run(workdir: epath.PathLike, step: int | None = None) -> tuple[epath.Path, dict[str, Any]]:
    """(directory of checkpoint ``step`` (default: the newest), the run record saved with it:
    {"config": the config's dict, "data_shape": the shape of one example})."""
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    step_dir = directory / str(_latest_good_step(directory, step))
    return step_dir, json.loads((step_dir / "config" / "metadata").read_text())


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
    step_dir, run = read_run(workdir, step)
    config = config_utils.parse_config(run["config"])
    data_shape = tuple(run["data_shape"])
    model = config_utils.build_model(config)
    params = restore_ema_params(
        step_dir, lambda: config_utils.init_params(model, config, data_shape, jax.random.key(0))
    )
    return params, config, data_shape
