"""The grain pipeline: sharded, shuffled index batches -> loaded batches, as a resumable grain iterator.

Design. Batch ``i`` of a process is a pure function of (seed, process layout, i): the process's share
of the examples (``examples[process_index::process_count]``, after dropping the last
``num_examples % process_count`` so every process has the same count) is read as one endless stream
of epochs, each epoch a fresh permutation drawn from ``np.random.default_rng([seed, process_index,
epoch])``, cut into consecutive batches. Random augmentation for batch ``i`` uses
``default_rng([seed, process_index, i, 1])``. A grain ``MapDataset`` over these batch plans does the
loading (in ``num_threads`` threads and ``num_workers`` processes), and the batches do not depend on
the number of threads or workers. The iterator's state is just the next batch index
(``position.BatchIndexIterator``), so ``get_state()/set_state()`` and grain's Orbax handlers resume
exactly, also with another ``num_workers``. Shuffling whole batches of indices with
numpy, instead of grain's per-element ``shuffle``, costs microseconds per batch rather than ~20 us per
example, which matters for the 2-D toys.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

import numpy as np

from diffusion_jax.data import builtin
from diffusion_jax.data.config import POINT_SOURCES, DataConfig, to_data_config
from diffusion_jax.data.sources import ArraySource, FolderSource, TfdsSource


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset (its training split).

    shape: one example as the pipeline emits it, (H, W, C) for images or (D,) for points.
    num_classes: number of class labels, or None when batches carry no "label".
    num_examples: examples in the split (all processes together).
    class_names: label names where the source has them (folder names, tfds ClassLabel names).
    """

    shape: tuple[int, ...]
    num_classes: int | None
    num_examples: int
    class_names: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Sources from a config.


def _load_arrays_file(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """x (and labels) from a .npy file or an .npz with keys x|image|images (and label|labels)."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"data.path={path!r} does not exist (source='arrays' reads a .npz or .npy file)"
        )
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        xk = next((k for k in ("x", "image", "images") if k in f), None)
        if xk is None:
            raise ValueError(f"{path}: no array named 'x', 'image' or 'images' (it has {keys})")
        lk = next((k for k in ("label", "labels") if k in f), None)
        return f[xk], (f[lk] if lk else None)


def open_source(cfg: DataConfig, split: str):
    """The data source for ``split`` of the configured dataset (see ``sources.py``)."""
    labels_or_none = lambda y: y if cfg.use_labels else None
    num_classes = cfg.num_classes or None
    if cfg.source == "digits":
        x, y = builtin.load_digits(split)
        return ArraySource(
            x,
            labels_or_none(y),
            num_classes=num_classes or 10,
            image_size=cfg.image_size,
            channels=cfg.channels,
            resize_method=cfg.resize_method,
            crop=cfg.crop,
            min_crop_fraction=cfg.min_crop_fraction,
            name="digits",
        )
    if cfg.source in POINT_SOURCES:
        x, y = builtin.load_points(
            cfg.source,
            split,
            num_points=cfg.num_points,
            noise=cfg.noise,
            seed=cfg.data_seed,
            num_components=cfg.num_components,
            standardize=cfg.standardize,
        )
        if y is not None and num_classes is None:
            num_classes = builtin.TOY_NUM_CLASSES.get(cfg.source, cfg.num_components)
        return ArraySource(x, labels_or_none(y), num_classes=num_classes, name=cfg.source)
    if cfg.source == "folder":
        return FolderSource(cfg)
    if cfg.source == "tfds":
        return TfdsSource(cfg, split)
    if cfg.source == "arrays":
        if not cfg.path:
            raise ValueError(
                "source='arrays' from a config needs data.path to a .npz/.npy file; for arrays you hold in "
                "memory call diffusion_jax.data.make_array_iterator(x, labels, batch_size=..., seed=...)"
            )
        x, y = _load_arrays_file(cfg.path)
        if x.ndim == 2 and cfg.standardize != "none":
            x = builtin.standardize_points(x, builtin.point_stats(x, cfg.standardize))
        return ArraySource(
            x,
            labels_or_none(y),
            num_classes=num_classes,
            image_size=cfg.image_size,
            channels=cfg.channels,
            resize_method=cfg.resize_method,
            crop=cfg.crop,
            min_crop_fraction=cfg.min_crop_fraction,
            name=f"arrays {cfg.path}",
        )
    raise ValueError(f"unknown data.source {cfg.source!r}")


def _info(source) -> DatasetInfo:
    return DatasetInfo(
        shape=tuple(int(s) for s in source.shape),
        num_classes=source.num_classes,
        num_examples=int(source.num_examples),
        class_names=source.class_names,
    )


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Shape, number of classes and size of the configured training split (``data_cfg.split``)."""
    cfg = to_data_config(data_cfg)
    return _info(open_source(cfg, cfg.split))


# ----------------------------------------------------------------------------------------------
# Batch plans and loading.


def _seed_word(seed: int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF  # SeedSequence takes non-negative ints


class _BatchPlans:
    """Random-access sequence of batch plans: item i = {"indices": int64 [b], "batch": i}.

    Training (``shuffle``): endless, epochs of fresh permutations of this process's share.
    Evaluation: one pass in order, the last batch smaller unless ``drop_remainder``.
    """

    def __init__(
        self,
        num_examples,
        batch_size,
        *,
        seed,
        process_index,
        process_count,
        shuffle,
        drop_remainder,
    ):
        per_process = num_examples // process_count
        self.share = np.arange(
            process_index, per_process * process_count, process_count, dtype=np.int64
        )
        self.batch_size, self.shuffle = batch_size, shuffle
        self.seed, self.process_index = _seed_word(seed), process_index
        n = len(self.share)
        if shuffle:
            self.length = sys.maxsize
        else:
            self.length = n // batch_size if drop_remainder else -(-n // batch_size)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, self.process_index, epoch])
                perm = rng.permutation(len(self.share))
                if len(self._cache) >= 4:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(i)
        b, n = self.batch_size, len(self.share)
        if not self.shuffle:
            return {"indices": self.share[i * b : (i + 1) * b], "batch": i}
        pos = np.arange(i * b, (i + 1) * b, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty(b, np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.share[self._permutation(int(e))[offsets[m]]]
        return {"indices": out, "batch": i}


class _LoadBatch:
    """Batch plan -> {"x": float32, "label": int32}: the source's loading plus random flips."""

    def __init__(self, source, *, train: bool, random_flip: bool, seed: int, process_index: int):
        self.source, self.train, self.random_flip = source, train, random_flip
        self.seed, self.process_index = _seed_word(seed), process_index

    def __call__(self, plan: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = None
        if self.train:
            rng = np.random.default_rng([self.seed, self.process_index, plan["batch"], 1])
        batch = self.source.load(plan["indices"], rng)
        if self.random_flip and rng is not None and batch["x"].ndim == 4:
            from diffusion_jax.data.transforms import random_flip_batch

            batch["x"] = random_flip_batch(batch["x"], rng)
        return batch


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app mark them parsed (defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_layout(batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(
            f"batch_size={batch_size!r} must be a positive int (the per-process batch)"
        )
    if not (isinstance(process_count, int | np.integer) and process_count >= 1):
        raise ValueError(f"process_count={process_count!r} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r} must be in [0, process_count={process_count})"
        )


def _iterate(
    source,
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    train: bool,
    drop_remainder: bool,
    random_flip: bool,
    num_threads: int,
    prefetch_batches: int,
    num_workers: int,
):
    import grain

    _check_layout(batch_size, process_index, process_count)
    n = source.num_examples
    per_process = n // process_count
    if (train or drop_remainder) and batch_size > per_process:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {per_process} examples this process reads "
            f"({source.name} has {n}, split over {process_count} process(es)); lower the batch size"
            + (" or use more data (e.g. data.num_points)" if source.name in POINT_SOURCES else "")
        )
    if per_process == 0:
        raise ValueError(
            f"{source.name} has {n} examples, fewer than the {process_count} processes"
        )
    plans = _BatchPlans(
        n,
        batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=train,
        drop_remainder=drop_remainder,
    )
    loader = _LoadBatch(
        source, train=train, random_flip=random_flip, seed=seed, process_index=process_index
    )
    from diffusion_jax.data.position import BatchIndexIterator

    ds = grain.MapDataset.source(plans).map(loader)
    read = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_batches if num_threads else 0
    )
    if num_workers > 0:
        _mark_absl_flags_parsed()

    def batches_from(start: int):
        it_ds = ds[start:].to_iter_dataset(read)
        if num_workers > 0:
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        return iter(it_ds)

    return BatchIndexIterator(batches_from)


def make_train_iterator(
    data_cfg: Any, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
):
    """Endless, shuffled (per epoch), augmented training batches of this process's share.

    Returns a grain ``DatasetIterator``: ``next(it)`` is {"x": float32 [batch_size, H, W, C] in [-1, 1]
    (or [batch_size, D] points), "label": int32 [batch_size] when the data have labels};
    ``it.get_state()`` / ``it.set_state(state)`` (or ``grain.checkpoint.CheckpointSave/Restore``)
    resume exactly (with any ``num_workers``). ``batch_size`` is the per-process batch. The same
    seed and process layout give the same batches.
    """
    cfg = to_data_config(data_cfg)
    return _iterate_split(
        cfg, cfg.split, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, train=True, drop_remainder=True, random_flip=cfg.random_flip,
    )  # fmt: skip


def _iterate_split(cfg: DataConfig, split: str, **kwargs: Any):
    """:func:`_iterate` over ``split`` of the configured source with the config's reader settings."""
    return _iterate(
        open_source(cfg, split),
        num_threads=cfg.num_threads,
        prefetch_batches=cfg.prefetch_batches,
        num_workers=cfg.num_workers,
        **kwargs,
    )


def make_eval_iterator(
    data_cfg: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
):
    """One pass over ``data_cfg.eval_split`` in order: no shuffling, no flips, centre crops.

    Same batch dicts as training; the last batch is smaller unless ``drop_remainder``. With several
    processes each reads ``examples[process_index::process_count]`` of the first
    ``N - N % process_count`` examples, so all processes yield the same number and sizes of batches.
    Digits: the held-out split is the last 297 images ("test"); training uses the first 1500.
    """
    cfg = to_data_config(data_cfg)
    return _iterate_split(
        cfg, cfg.eval_split, batch_size=batch_size, seed=0, process_index=process_index,
        process_count=process_count, train=False, drop_remainder=drop_remainder, random_flip=False,
    )  # fmt: skip


def make_array_iterator(
    x: Any,
    labels: Any = None,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
    drop_remainder: bool = False,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    image_size: int = 0,
    channels: int = 0,
    resize_method: str = "auto",
    crop: str = "center",
    min_crop_fraction: float = 0.8,
    random_flip: bool = False,
    standardize: str = "none",
    num_threads: int = 4,
    prefetch_batches: int = 8,
    num_workers: int = 0,
):
    """The pipeline over arrays you hold: images [N, H, W(, C)] (uint8, or float in ``value_range``,
    default [-1, 1]; or a list of differently sized HWC images with ``image_size``) or points [N, D].

    ``labels``: optional ints [N] in [0, num_classes). ``train=True``: endless, shuffled, augmented
    (as :func:`make_train_iterator`); ``train=False``: one ordered pass (as :func:`make_eval_iterator`).
    Points are standardised only if ``standardize`` is "isotropic" or "per_dim".
    """
    if isinstance(x, np.ndarray) and x.ndim == 2 and standardize != "none":
        x = builtin.standardize_points(x, builtin.point_stats(x, standardize))
    cfg = to_data_config(
        dict(
            source="arrays",
            image_size=image_size,
            channels=channels,
            resize_method=resize_method,
            crop=crop,
            min_crop_fraction=min_crop_fraction,
            standardize=standardize,
        )
    )
    source = ArraySource(
        x,
        labels,
        num_classes=num_classes,
        value_range=value_range,
        image_size=cfg.image_size,
        channels=cfg.channels,
        resize_method=cfg.resize_method,
        crop=cfg.crop if train else "center",
        min_crop_fraction=cfg.min_crop_fraction,
    )
    return _iterate(
        source,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        train=train,
        drop_remainder=drop_remainder or train,
        random_flip=random_flip and train,
        num_threads=num_threads,
        prefetch_batches=prefetch_batches,
        num_workers=num_workers,
    )


def array_dataset_info(x: Any, labels: Any = None, **kwargs: Any) -> DatasetInfo:
    """:class:`DatasetInfo` of in-memory arrays (``kwargs`` as for ArraySource: image_size, channels, ...)."""
    return _info(ArraySource(x, labels, **kwargs))
