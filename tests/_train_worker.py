"""A training run in its own process, for the tests in tests/test_train_*.py.

    python tests/_train_worker.py --workdir W --out result.npz [--set train.num_steps=8 ...]
        [--kill_at STEP --after_checkpoint STEP] [--term_at STEP]
        [--process_id I --num_processes P --port PORT] [--local_gcs FOLDER]

Runs ``trainer.train_and_evaluate`` on ``configs/tiny.py`` with the overrides, then writes every
leaf of the final state (as numpy, gathered to this process) to ``--out``. ``--kill_at`` SIGKILLs
the process after that step, once the checkpoint ``--after_checkpoint`` is on disk; ``--term_at``
sends it SIGTERM. With ``--num_processes`` > 1 it joins a ``jax.distributed`` run on 127.0.0.1, and
every process reads its slice of the same global batches a single process would read, so the runs
can be compared. ``--local_gcs`` serves ``gs://`` workdirs from a local folder (tests/_local_gcs.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], help="key.path=json_value")
    p.add_argument("--kill_at", type=int, default=0)
    p.add_argument("--after_checkpoint", type=int, default=0)
    p.add_argument("--term_at", type=int, default=0)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--local_gcs", default="", help="serve gs:// URLs from this folder")
    return p.parse_args()


class GlobalBatchSlice:
    """This process's rows of the batches a single process would read with the global batch size."""

    def __init__(self, make_iterator, data_cfg, *, batch_size, seed, process_index, process_count):
        self.it = make_iterator(data_cfg, batch_size=batch_size * process_count, seed=seed)
        self.lo, self.hi = process_index * batch_size, (process_index + 1) * batch_size

    def __iter__(self):
        return self

    def __next__(self):
        return {k: v[self.lo : self.hi] for k, v in next(self.it).items()}

    def get_state(self) -> bytes:  # grain's Orbax handler stores bytes for non-grain iterators
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.it.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        pass


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(filename)s] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
    if args.num_processes > 1:
        os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{args.port}"
        os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
        os.environ["JAX_PROCESS_ID"] = str(args.process_id)
    from diffusion_jax import sharding

    sharding.initialize_distributed()

    import importlib

    import jax
    import numpy as np
    from etils import epath

    from diffusion_jax import checkpoints, data, trainer

    if args.local_gcs:
        from _local_gcs import install

        install(args.local_gcs)
        checkpoints.check_storage = lambda workdir: None  # the stand-in needs no gcsfs

    if args.num_processes > 1:
        real = data.make_train_iterator
        data.make_train_iterator = lambda cfg, **kw: GlobalBatchSlice(real, cfg, **kw)

    config = importlib.import_module(f"configs.{args.config}").get_config()
    for item in args.set:
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = config
        for name in path:
            node = node[name]
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node[leaf] = tuple(value) if isinstance(value, list) else value

    workdir = epath.Path(args.workdir)  # a folder or a URL such as gs://bucket/run
    hooks = []
    if args.kill_at:

        def kill(step: int) -> None:
            if step == args.kill_at:
                deadline = time.time() + 120
                while not (workdir / "checkpoints" / str(args.after_checkpoint)).exists():
                    if time.time() > deadline:
                        raise TimeoutError(f"checkpoint {args.after_checkpoint} never appeared")
                    time.sleep(0.05)
                print(f"worker: SIGKILL at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.append(kill)
    if args.term_at:

        def term(step: int) -> None:
            if step == args.term_at:
                print(f"worker: SIGTERM at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

        hooks.append(term)

    state = trainer.train_and_evaluate(config, workdir, hooks=hooks)
    leaves = jax.tree_util.tree_flatten_with_path(sharding.to_host(state))[0]
    if args.out:
        arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
        np.savez(args.out, **arrays)
    print(f"worker: done at step {int(arrays['.step']) if args.out else -1}", flush=True)


if __name__ == "__main__":
    main()
