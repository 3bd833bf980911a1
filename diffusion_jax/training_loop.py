"""The training loop that every trainer shares: step, log, save, stop.

A trainer (:mod:`diffusion_jax.trainer` for the diffusion model, :mod:`diffusion_jax.classifier_trainer`
for the noise-aware classifier) builds a :class:`Task`: its jitted step, its state's shapes and
shardings, what it logs and its extra periodic work. :func:`run` does the rest, the same way for
every kind of run:

* restores the newest checkpoint in ``workdir`` (refusing one saved under an incompatible config,
  see :func:`checkpoints.check_compatible`) or initialises the state;
* steps under ``jax.transfer_guard("disallow")``; the step itself drops the update of a batch whose
  loss or gradient is not finite (:func:`train_state.apply_gradients`), and the host stops the run
  (``train.on_nonfinite = "stop"``) at the next log step or before the next save, so that a
  checkpoint never holds a run that had to stop;
* logs the means of the step's metrics to the console and TensorBoard every
  ``train.log_every_steps``;
* saves Orbax checkpoints every ``checkpoint.every_steps`` and at the end, ``config.json`` with
  each, and on SIGTERM or a preemption notice saves and returns early (rerun to continue);
* optionally traces a few steps with ``jax.profiler``.

:func:`prepare` is the start every trainer shares: the storage check, the device mesh and batch
split, and the workdir's ``config.json`` against the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from etils import epath

from diffusion_jax import checkpoints, sharding
from diffusion_jax.config_utils import CheckpointConfig, ProfileConfig, TrainConfig

Metrics = dict[str, jax.Array]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite (``train.on_nonfinite = "stop"``)."""


class RunConfig(Protocol):
    """What the loop reads of a trainer's config (a :class:`config_utils.Config`, or a
    classifier's): its ``data``, ``train`` and ``checkpoint`` sections, and ``to_dict()``, which
    is saved with each checkpoint and as ``config.json``."""

    data: Any
    train: TrainConfig
    checkpoint: CheckpointConfig

    def to_dict(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Periodic:
    """Extra work of a trainer, every ``every_steps`` steps (0: only at the last) and at the last step.

    ``fn(step, state)`` may return TensorBoard values to write at ``step``: floats as scalars,
    uint8 [H, W, C] arrays as images. ``saves``: it writes the state (snapshots of it): the
    non-finite check comes first, and it also runs, when due, at a step where the run stops early;
    other work is skipped then.
    """

    every_steps: int
    fn: Callable[[int, Any], Mapping[str, Any] | None]
    saves: bool = False

    def due(self, step: int, num_steps: int) -> bool:
        return step == num_steps or bool(self.every_steps and step % self.every_steps == 0)


@dataclasses.dataclass(frozen=True)
class Task:
    """What a trainer hands :func:`run`.

    ``init_state()``: the step-0 state (pure; jitted into ``state_shardings``). ``abstract_state``:
    its shapes (``jax.eval_shape`` of it). ``train_step(state, batch, *step_args) -> (state,
    metrics)``: jitted, with ``step_args`` already on the devices; ``metrics`` has a bool
    ``finite`` and the scalars that ``metrics_to_log`` names as (key, name in the console line,
    format). ``batch_keys``: the entries of the data's batches the step takes. ``data_seed``: the
    input pipeline's seed. ``check_batch(batch, step)``: checks a host batch before the step.
    ``on_start(step)``: called with the step the run starts from (0 when fresh).
    """

    config: RunConfig
    data_shape: tuple[int, ...]
    init_state: Callable[[], Any]
    abstract_state: Any
    state_shardings: Any
    train_step: Callable[..., tuple[Any, Metrics]]
    step_args: tuple[Any, ...]
    batch_keys: tuple[str, ...]
    metrics_to_log: tuple[tuple[str, str, str], ...]
    data_seed: int
    periodic: tuple[Periodic, ...] = ()
    check_batch: Callable[[dict[str, np.ndarray], int], None] | None = None
    on_start: Callable[[int], None] | None = None
    profile: ProfileConfig = ProfileConfig()


def prepare(
    workdir: str | epath.PathLike, config: RunConfig
) -> tuple[epath.Path, jax.sharding.Mesh, int]:
    """(workdir, device mesh, examples per process per step) of a run of ``config``, after the
    checks that come before anything is read or written: a storage the setup can use, a batch that
    splits over the devices, and a ``config.json`` (if any) that ``config`` may continue. Creates
    ``workdir`` (process 0); ``config.json`` is written only with the first checkpoint."""
    checkpoints.check_storage(workdir)
    workdir = epath.Path(workdir)
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
    checkpoints.check_workdir(workdir, config)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    return workdir, mesh, local_batch


def run(
    task: Task,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    *,
    hooks: Sequence[Callable[[int], None]] = (),
) -> Any:
    """Trains ``task`` in ``workdir`` (see the module docstring) and returns the final state, or
    the state it stopped at on SIGTERM or a preemption notice. ``hooks`` are called as
    ``hook(step)`` on every process after every step."""
    from diffusion_jax import data

    cfg = task.config
    is_main = jax.process_index() == 0
    train_iter = data.make_train_iterator(
        cfg.data,
        batch_size=sharding.check_batch_size(cfg.train.batch_size, mesh),
        seed=task.data_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    with contextlib.ExitStack() as stack:
        if hasattr(train_iter, "close"):  # grain's reader threads and worker processes
            stack.callback(train_iter.close)
        manager = checkpoints.make_manager(
            workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        # Exits in reverse order: wait for the last save (and its checksums) even when the run
        # failed, then release Orbax's threads and event loop, then the data iterator.
        stack.callback(manager.close)
        stack.callback(manager.wait_until_finished)  # runs first: never exit mid-save
        writer = stack.enter_context(_Writer(workdir / "tensorboard", active=is_main))
        termination = stack.enter_context(_Termination().installed())
        profiler = _Profiler(task.profile, workdir / "tensorboard", active=is_main)
        stack.callback(profiler.stop)
        return _loop(task, workdir, mesh, train_iter, manager, writer, termination, profiler, hooks)


def _loop(
    task: Task,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    train_iter: Any,
    manager: Any,
    writer: _Writer,
    termination: _Termination,
    profiler: _Profiler,
    hooks: Sequence[Callable[[int], None]],
) -> Any:
    """Restore or initialise, then step, log, save and do the periodic work until ``train.num_steps``."""
    cfg = task.config
    is_main = jax.process_index() == 0
    num_steps = cfg.train.num_steps

    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        task.abstract_state,
        task.state_shardings,
    )
    restored = checkpoints.restore_latest(manager, target, train_iter, cfg)
    if restored is not None:
        state, start = restored
        logging.info("Resuming from the checkpoint at step %d in %s", start, manager.directory)
    else:
        state, start = jax.jit(task.init_state, out_shardings=task.state_shardings)(), 0
        logging.info("Starting from scratch (no checkpoint in %s)", manager.directory)
    last_saved = start if restored is not None else None
    if task.on_start is not None:
        task.on_start(start)

    def save(step: int) -> None:
        nonlocal last_saved
        check_finite(state, cfg.train, last_saved, workdir)  # never save a run that must stop
        checkpoints.save(manager, step, state, train_iter, cfg, task.data_shape)
        checkpoints.write_config(workdir, cfg)  # only now: a start that fails leaves it as it was
        last_saved = step

    def periodic(step: int, saves: bool) -> None:
        for work in task.periodic:
            if work.saves == saves and work.due(step, num_steps):
                if work.saves:
                    check_finite(state, cfg.train, last_saved, workdir)
                for name, value in (work.fn(step, state) or {}).items():
                    if np.ndim(value) == 0:
                        writer.scalars(step, {name: float(value)})
                    else:
                        writer.image(step, name, np.asarray(value))

    pending: list[Metrics] = []
    interval_start, interval_step, paused = time.time(), start, 0.0
    for step in range(start + 1, num_steps + 1):
        profiler.before_step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):  # steps in the profile
            local = next(train_iter)
            if task.check_batch is not None:
                task.check_batch(local, step)
            batch = sharding.global_batch({k: local[k] for k in task.batch_keys}, mesh)
            with jax.transfer_guard("disallow"):
                state, metrics = task.train_step(state, batch, *task.step_args)
        profiler.after_step(step, state)
        pending.append(metrics)
        if step == start + 1:  # the first step compiles; time the rest
            jax.block_until_ready(metrics)
            logging.info("First step (with compilation) took %.1fs", time.time() - interval_start)
            interval_start, interval_step, pending = time.time(), step, []
        for hook in hooks:
            hook(step)

        if pending and (step % cfg.train.log_every_steps == 0 or step == num_steps):
            summary = _summarize(pending, [key for key, _, _ in task.metrics_to_log])
            nonfinite = check_finite(state, cfg.train, last_saved, workdir)
            elapsed = time.time() - interval_start - paused
            steps_per_sec = (step - interval_step) / max(elapsed, 1e-9)
            scalars = {f"train/{key}": value for key, value in summary.items()}
            scalars["train/steps_per_sec"] = steps_per_sec
            scalars["train/images_per_sec"] = steps_per_sec * cfg.train.batch_size
            scalars["train/nonfinite_steps"] = float(nonfinite)
            writer.scalars(step, scalars)
            if is_main:
                values = " | ".join(
                    f"{name} {summary[key]:{spec}}" for key, name, spec in task.metrics_to_log
                )
                logging.info(
                    "step %d/%d | %s | %.2f steps/s, %.0f examples/s | ETA %s%s",
                    step, num_steps, values, steps_per_sec, steps_per_sec * cfg.train.batch_size,
                    format_duration((num_steps - step) / max(steps_per_sec, 1e-9)),
                    f" | {nonfinite} non-finite steps skipped" if nonfinite else "",
                )  # fmt: skip
            pending, interval_start, interval_step, paused = [], time.time(), step, 0.0

        preempted = termination.requested or checkpoints.reached_preemption(manager, step)
        pause_start = time.time()
        if step % cfg.checkpoint.every_steps == 0 or step == num_steps or preempted:
            save(step)
        periodic(step, saves=True)
        if preempted:
            manager.wait_until_finished()
            logging.warning(
                "Stopped at step %d on a termination request; checkpoint saved. Run the same "
                "command again to continue.", step,
            )  # fmt: skip
            return state
        periodic(step, saves=False)
        paused += time.time() - pause_start

    if start >= num_steps:
        logging.info(
            "Nothing to do: the checkpoint is at step %d and train.num_steps=%d.", start, num_steps
        )
    check_finite(state, cfg.train, last_saved, workdir)
    manager.wait_until_finished()
    return state


def check_finite(
    state: Any, train: TrainConfig, last_saved: int | None, workdir: epath.Path
) -> int:
    """Number of dropped (non-finite) steps of ``state`` (a :class:`train_state.TrainState`) so
    far; raises :class:`NonFiniteLossError` in ``train.on_nonfinite = "stop"`` mode."""
    count, first = (
        int(v) for v in jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
    )
    if count and train.on_nonfinite == "stop":
        saved = (
            f"the last checkpoint (step {last_saved}) in {workdir / checkpoints.CHECKPOINT_DIR} is untouched"
            if last_saved is not None
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"the loss or gradient became non-finite (NaN or inf) at step {first}; stopping, and "
            f"{saved}. Lower optim.learning_rate, check the data, or set train.on_nonfinite='skip' "
            "to drop such steps instead."
        )
    return count


def format_duration(seconds: float) -> str:
    """``seconds`` as "1h02m", "3m05s" or "42s"."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _summarize(metrics: list[Metrics], keys: Sequence[str]) -> dict[str, float]:
    """Means over a log interval of the metrics ``keys`` of finite steps (host numpy)."""
    finite = [m for m in jax.device_get(metrics) if bool(m["finite"])]
    out = {}
    for key in keys:
        values = [float(m[key]) for m in finite]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


class _Termination:
    """Remembers a SIGTERM in a single-process run.

    Multi-process runs (every pod slice, and any run where ``jax.distributed`` is initialised) leave
    SIGTERM to JAX's preemption notifier instead: each process reports the signal to the
    coordination service, and :func:`checkpoints.reached_preemption` becomes True on every process
    at the same step, so all of them save that step and stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        logging.warning(
            "SIGTERM received: saving a checkpoint at the end of this step, then exiting."
        )
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Termination]:
        install = (
            not jax.distributed.is_initialized()
            and threading.current_thread() is threading.main_thread()
        )
        if install:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            if install:
                signal.signal(signal.SIGTERM, self._previous)


class _Writer:
    """TensorBoard scalars and images (process 0 only; other processes do nothing).

    tensorboardX writes gs:// logdirs itself, through google-cloud-storage (checked at start by
    :func:`checkpoints.check_storage`), re-uploading the event file at every flush.
    """

    def __init__(self, logdir: epath.Path, active: bool):
        self._writer = None
        if active:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def image(self, step: int, name: str, picture_uint8: np.ndarray) -> None:
        if self._writer:
            self._writer.add_image(name, picture_uint8, step, dataformats="HWC")
            self._writer.flush()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._writer:
            self._writer.close()


class _Profiler:
    """A ``jax.profiler`` trace of the steps ``[start_step, start_step + num_steps)`` on process 0,
    into ``logdir/plugins/profile/<time>/`` where TensorBoard's profile plugin finds it.

    JAX writes traces to local folders; for a bucket logdir the trace goes to a temporary folder
    first and is copied over when it stops.
    """

    def __init__(self, config: ProfileConfig, logdir: epath.Path, active: bool):
        self.first, self.last = config.start_step, config.start_step + config.num_steps - 1
        self.active = active and config.num_steps > 0
        self.logdir = logdir
        self.remote = "://" in os.fspath(logdir)
        self._tracing_into: str | None = None

    def before_step(self, step: int) -> None:
        if self.active and step == self.first:
            self._tracing_into = tempfile.mkdtemp() if self.remote else os.fspath(self.logdir)
            jax.profiler.start_trace(self._tracing_into)
            logging.info("Profiling steps %d to %d", self.first, self.last)

    def after_step(self, step: int, state: Any) -> None:
        if self._tracing_into is not None and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        """Ends a running trace (also when the run stops early) and puts it under ``logdir``."""
        if self._tracing_into is None:
            return
        local, self._tracing_into = pathlib.Path(self._tracing_into), None
        jax.profiler.stop_trace()
        if self.remote:
            for path in local.rglob("*"):
                if path.is_file():
                    target = self.logdir / path.relative_to(local).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(path.read_bytes())
            shutil.rmtree(local)
        logging.info("Wrote a profile to %s (TensorBoard: Profile tab)", self.logdir / "plugins")
