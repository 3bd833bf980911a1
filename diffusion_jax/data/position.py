"""A data iterator whose saved state is the next batch index alone, whatever the worker count.

grain's own state after ``mp_prefetch`` records each worker process's position in its slice of the
batches, so it restores only into the same ``num_workers`` (another count fails with
``KeyError: 'exhausted'`` or similar). Batch ``i`` of this pipeline depends only on ``i`` (see
``pipeline.py``), so the position is one number: :class:`BatchIndexIterator` counts the batches it
hands out and, on ``set_state``, rebuilds the grain iterator from that batch on. Its state
``{"next_index": i}`` is also grain's state without workers, so checkpoints saved before it existed
restore too, as do those of grain's worker pipelines (their workers' positions add up to ``i``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain


def next_batch_index(state: dict[str, Any]) -> int:
    """The index of the next batch recorded in a saved iterator ``state``: this module's (and
    grain's without workers) ``{"next_index": i}``, or grain's ``mp_prefetch`` state, where worker
    ``w`` of ``W`` reads batches ``w, w + W, ...`` in turn and records how many of them it gave."""
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state:
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"] if s)
    raise ValueError(
        f"unrecognised data-iterator state {str(state)[:200]}: expected {{'next_index': i}} "
        "(diffusion_jax's) or grain's worker state"
    )


class BatchIndexIterator(grain.DatasetIterator):
    """Batches ``start, start + 1, ...`` from ``make(start)``, a grain iterator over the batches
    from ``start`` on; ``get_state()`` is ``{"next_index": i}`` and ``set_state`` accepts any state
    that :func:`next_batch_index` reads, so a run may resume with another ``num_workers``."""

    def __init__(self, make: Callable[[int], Iterator[Any]], start: int = 0):
        super().__init__()
        self._make = make
        self._next = start
        self._it = make(start)

    def __next__(self) -> Any:
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        index = next_batch_index(state)
        if index != self._next:
            self._close_inner()
            self._it = self._make(index)
            self._next = index

    def start_prefetch(self) -> None:
        start = getattr(self._it, "start_prefetch", None)
        if start is not None:
            start()

    def _close_inner(self) -> None:
        close = getattr(getattr(self, "_it", None), "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        """Stops the reader threads and worker processes (idempotent)."""
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"BatchIndexIterator(next_index={self._next})"
