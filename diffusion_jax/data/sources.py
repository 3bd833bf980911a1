"""Random-access data sources: in-memory arrays, folders of images, tensorflow-datasets.

Every source has ``num_examples``, ``shape`` (the element shape it returns: (H, W, C) or (D,)),
``num_classes`` (None without labels) and ``load(indices, rng) -> {"x": float32, "label": int32}``,
where images are already resized/cropped and scaled to [-1, 1]. ``rng=None`` means deterministic
(centre crop); the pipeline passes a generator only when training. Sources are picklable, so grain
worker processes can rebuild them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax.data import transforms
from diffusion_jax.data.config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

log = logging.getLogger(__name__)


def _check_labels(
    labels: Any, n: int, num_classes: int | None, where: str
) -> tuple[np.ndarray, int]:
    """Validates integer labels [n] in [0, num_classes); returns (int32 labels, num_classes)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(
            f"{where}: labels have shape {labels.shape}, expected ({n},) to match the {n} examples"
        )
    if n and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(
                f"{where}: labels must be integers; got dtype {labels.dtype} with non-integer values"
            )
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        i = int(np.argmin(labels))
        raise ValueError(
            f"{where}: label {labels[i]} at index {i} is negative; labels must be class indices 0..K-1"
        )
    inferred = int(labels.max()) + 1 if n else 0
    if num_classes:
        if inferred > num_classes:
            i = int(np.argmax(labels))
            raise ValueError(
                f"{where}: label {labels[i]} at index {i} is out of range for num_classes={num_classes}; "
                f"labels must lie in [0, {num_classes}) (raise num_classes or fix the labels)"
            )
        return labels.astype(np.int32), num_classes
    return labels.astype(np.int32), inferred


class ArraySource:
    """In-memory examples: images [N, H, W(, C)] (uint8 or float) or points [N, D], with optional labels.

    ``x`` may also be a list of HWC images of different sizes when ``image_size > 0``.
    ``value_range``: the range of the stored values, mapped linearly to [-1, 1]; default (0, 255) for
    uint8 and (-1, 1) (used as is) for float images. Points are not rescaled.
    """

    def __init__(
        self,
        x: Any,
        labels: Any = None,
        *,
        num_classes: int | None = None,
        value_range: tuple[float, float] | None = None,
        image_size: int = 0,
        channels: int = 0,
        resize_method: str = "auto",
        crop: str = "center",
        min_crop_fraction: float = 0.8,
        name: str = "arrays",
    ):
        self.name = name
        self.image_size, self.channels = image_size, channels
        self.resize_method, self.crop, self.min_crop_fraction = (
            resize_method,
            crop,
            min_crop_fraction,
        )
        self.class_names = None
        if isinstance(x, np.ndarray) and x.dtype != object:
            self._list = None
            if x.ndim == 2:
                self.kind = "points"
            elif x.ndim in (3, 4):
                self.kind = "images"
                if x.ndim == 3:
                    x = x[..., None]
            else:
                raise ValueError(
                    f"{name}: x has shape {x.shape}; expected images [N, H, W] / [N, H, W, C] or points [N, D]"
                )
            items = [x]
        else:
            items = [np.asarray(im) for im in x]
            if not items:
                raise ValueError(f"{name}: no examples (x is empty)")
            items = [im[..., None] if im.ndim == 2 else im for im in items]
            bad = [i for i, im in enumerate(items) if im.ndim != 3]
            if bad:
                raise ValueError(
                    f"{name}: element {bad[0]} has shape {items[bad[0]].shape}; expected an image [H, W] or [H, W, C]"
                )
            self.kind = "images"
            self._list = items
        n = len(x) if self._list is None else len(self._list)
        if n == 0:
            raise ValueError(f"{name}: no examples (x is empty)")
        self.num_examples = n

        if self.kind == "points":
            if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{name}: points must be numeric, got dtype {x.dtype}")
            self.x = np.asarray(x, np.float32)
            if not np.all(np.isfinite(self.x)):
                i = int(np.argwhere(~np.isfinite(self.x))[0, 0])
                raise ValueError(f"{name}: point {i} is not finite ({self.x[i]})")
            self.shape = (self.x.shape[1],)
            self._lo, self._hi = 0.0, 0.0
        else:
            dtypes = {im.dtype for im in items}
            if len(dtypes) > 1:
                raise ValueError(
                    f"{name}: images mix dtypes {sorted(map(str, dtypes))}; convert them to one dtype"
                )
            dtype = dtypes.pop()
            if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
                raise ValueError(
                    f"{name}: images must be uint8 (0..255) or float, got dtype {dtype}"
                )
            if value_range is None:
                value_range = (0.0, 255.0) if dtype == np.uint8 else (-1.0, 1.0)
            self._lo, self._hi = float(value_range[0]), float(value_range[1])
            if not self._hi > self._lo:
                raise ValueError(
                    f"{name}: value_range={value_range} must be (low, high) with low < high"
                )
            if dtype != np.uint8:
                lo = min(float(np.min(im)) for im in items)
                hi = max(float(np.max(im)) for im in items)
                tol = 1e-5 * (self._hi - self._lo)
                if (
                    not (np.isfinite(lo) and np.isfinite(hi))
                    or lo < self._lo - tol
                    or hi > self._hi + tol
                ):
                    raise ValueError(
                        f"{name}: float images span [{lo:g}, {hi:g}], outside value_range=({self._lo:g}, {self._hi:g}); "
                        "pass value_range=(0, 1) or (0, 255) for such data (float images default to [-1, 1])"
                    )
            shapes = {im.shape[1:] if self._list is None else im.shape for im in items}
            chans = {s[-1] for s in shapes}
            if channels == 0 and len(chans) > 1:
                raise ValueError(
                    f"{name}: images have mixed channel counts {sorted(chans)}; set channels=1 or 3 to convert"
                )
            if channels == 0 and not chans <= {1, 3}:
                raise ValueError(
                    f"{name}: images have {chans.pop()} channels; set channels=1 or 3 to convert"
                )
            sizes = {s[:2] for s in shapes}
            if image_size == 0 and len(sizes) > 1:
                a, b = sorted(sizes)[:2]
                raise ValueError(
                    f"{name}: images have mixed sizes (e.g. {a} and {b}); set image_size to resize them"
                )
            h, w = sizes.pop() if image_size == 0 else (image_size, image_size)
            self.shape = (h, w, channels or chans.pop())
            self.x = x if self._list is None else None
        if labels is None:
            self.labels, self.num_classes = None, None
        else:
            self.labels, self.num_classes = _check_labels(labels, n, num_classes, name)

    def _scale(self, xb: np.ndarray) -> np.ndarray:
        if xb.dtype == np.uint8 and (self._lo, self._hi) == (0.0, 255.0):
            return transforms.uint8_to_float(xb)
        xb = xb.astype(np.float32)
        if (self._lo, self._hi) == (-1.0, 1.0):
            return xb
        return (xb - np.float32(self._lo)) * np.float32(2.0 / (self._hi - self._lo)) - np.float32(
            1.0
        )

    def load(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """Examples at ``indices`` -> {"x": float32 [b, *shape], "label": int32 [b] when labelled}."""
        if self.kind == "points":
            out = {"x": self.x[indices]}
        else:
            fit = dict(
                resize_method=self.resize_method,
                crop=self.crop,
                min_crop_fraction=self.min_crop_fraction,
                rng=rng,
            )
            if self._list is None:
                xb = self._scale(self.x[indices])
                xb = transforms.fit_batch(
                    transforms.convert_channels(xb, self.channels), self.image_size, **fit
                )
            else:
                xb = np.stack(
                    [
                        transforms.fit_image(
                            transforms.convert_channels(self._scale(self._list[i]), self.channels),
                            self.image_size,
                            **fit,
                        )
                        for i in indices
                    ]
                )
            out = {"x": xb.astype(np.float32, copy=False)}
        if self.labels is not None:
            out["label"] = self.labels[indices]
        return out


# ----------------------------------------------------------------------------------------------
# Folders of images.

# (path, size in bytes, mtime_ns, full decode?) -> (width, height, mode) or the error text.
_PROBE_CACHE: dict[tuple[str, int, int, bool], tuple[int, int, str] | str] = {}


def _probe(path: str, verify: bool) -> tuple[int, int, str] | str:
    """(width, height, PIL mode) of an image file, or the reason it cannot be read."""
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, verify)
    except OSError as e:
        return f"cannot stat: {e}"
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    try:
        with Image.open(path) as im:
            result: tuple[int, int, str] | str = (im.size[0], im.size[1], im.mode)
            if verify:
                im.load()  # a full decode: truncated or corrupt data raises here
    except Exception as e:  # noqa: BLE001 - any decoder failure means "bad file"
        result = f"{type(e).__name__}: {e}"
    _PROBE_CACHE[key] = result
    return result


def _channels_of_mode(mode: str) -> int:
    return 1 if mode in _GRAY_MODES else 3


def decode_image(path: str, channels: int) -> np.ndarray:
    """Reads one image file as uint8 [H, W, channels]; alpha is composited onto white.

    16-bit grayscale is reduced to 8 bits; palette images become RGB (or gray for ``channels=1``).
    """
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            arr = np.asarray(im, np.float64)
            peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)[..., None]
        else:
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in mode else ("L" if mode == "1" else "RGB"))
            arr = np.asarray(im)
            if arr.ndim == 2:
                arr = arr[..., None]
    target = channels or (1 if arr.shape[-1] in (1, 2) else 3)
    return transforms.convert_channels(arr, target)


def _fit_config(
    img: np.ndarray, cfg: Any, rng: np.random.Generator | None, shape: tuple, what: str
) -> np.ndarray:
    """``img`` resized / cropped as ``cfg`` says, checked to have ``shape`` (``what`` names it)."""
    img = transforms.fit_image(
        img,
        cfg.image_size,
        resize_method=cfg.resize_method,
        crop=cfg.crop,
        min_crop_fraction=cfg.min_crop_fraction,
        rng=rng,
    )
    if img.shape != shape:
        raise ValueError(
            f"{what} shape {img.shape}, expected {shape}; set data.image_size to resize the images"
        )
    return img


class FolderSource:
    """Every PNG/JPEG/WebP file under ``path`` (recursively, sorted), optionally labelled by sub-folder.

    The first-level sub-folder names, sorted, are the classes (0, 1, ...). Files are checked once up
    front (``verify_images``: a full decode, else the header only); unreadable ones are skipped with
    a warning and a count (``on_bad_file="warn"``) or raise (``"error"``). Other files are ignored.
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        root = os.path.abspath(os.path.expanduser(cfg.path))
        self.name = f"folder {root}"
        if not os.path.exists(root):
            raise FileNotFoundError(f"data.path={cfg.path!r}: the folder {root} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(
                f"data.path={cfg.path!r}: {root} is a file, not a folder of images"
            )
        images, others = [], []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                p = os.path.join(dirpath, f)
                (images if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(p)
        if others:
            log.info("%s: ignored %d non-image file(s), e.g. %s", self.name, len(others), others[0])
        self.ignored_files = others
        if not images:
            extra = (
                f" (it holds {len(others)} other file(s), e.g. {others[0]})"
                if others
                else " (it is empty)"
            )
            raise ValueError(
                f"data.path={cfg.path!r}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images under {root}{extra}"
            )

        workers = min(32, 4 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            probes = list(pool.map(lambda p: _probe(p, cfg.verify_images), images))
        bad = [(p, r) for p, r in zip(images, probes, strict=True) if isinstance(r, str)]
        good = [(p, r) for p, r in zip(images, probes, strict=True) if not isinstance(r, str)]
        if bad:
            listing = "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (" ..." if len(bad) > 5 else "")
            if cfg.on_bad_file == "error" or not good:
                raise ValueError(
                    f"{len(bad)} of {len(images)} image files under {root} cannot be read: {listing}. "
                    + (
                        "Delete or re-encode them, or set data.on_bad_file='warn' to skip them."
                        if good
                        else "No readable image is left."
                    )
                )
            warnings.warn(
                f"skipping {len(bad)} unreadable image file(s) of {len(images)} under {root}: {listing} "
                "(set data.on_bad_file='error' to fail instead)",
                stacklevel=2,
            )
        self.bad_files = [p for p, _ in bad]
        self.files = [p for p, _ in good]
        self.num_examples = len(self.files)

        sizes = {(w, h) for _, (w, h, _) in good}
        if cfg.image_size == 0 and len(sizes) > 1:
            first = good[0]
            other = next(g for g in good if g[1][:2] != first[1][:2])
            raise ValueError(
                f"images under {root} have mixed sizes: {first[0]} is {first[1][0]}x{first[1][1]} but {other[0]} is "
                f"{other[1][0]}x{other[1][1]} (width x height); set data.image_size to resize them"
            )
        chans = {_channels_of_mode(m) for _, (_, _, m) in good}
        if cfg.channels == 0 and len(chans) > 1:
            first = good[0]
            other = next(
                g for g in good if _channels_of_mode(g[1][2]) != _channels_of_mode(first[1][2])
            )
            raise ValueError(
                f"images under {root} mix grayscale and colour: {first[0]} is mode {first[1][2]} but {other[0]} is "
                f"mode {other[1][2]}; set data.channels=1 or 3 to convert them"
            )
        if cfg.image_size:
            h = w = cfg.image_size
        else:
            w, h = sizes.pop()
        self.shape = (h, w, cfg.channels or chans.pop())

        rel = [os.path.relpath(p, root).split(os.sep) for p in self.files]
        nested = [len(r) > 1 for r in rel]
        self.labels, self.num_classes, self.class_names = None, None, None
        if cfg.use_labels and any(nested):
            if not all(nested):
                top = self.files[nested.index(False)]
                raise ValueError(
                    f"{root} holds images both in class sub-folders and at its top level (e.g. {top}); move "
                    "them into a sub-folder, or set data.use_labels=False to ignore the sub-folder labels"
                )
            self.class_names = tuple(sorted({r[0] for r in rel}))
            index = {c: i for i, c in enumerate(self.class_names)}
            labels = np.array([index[r[0]] for r in rel], np.int32)
            self.labels, self.num_classes = _check_labels(
                labels, len(labels), cfg.num_classes or None, self.name
            )

    def load(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """Decodes, converts, resizes and crops the files at ``indices`` -> {"x": [b, H, W, C], "label"}."""
        cfg = self.cfg
        images = []
        for i in indices:
            path = self.files[i]
            try:
                img = decode_image(path, cfg.channels)
            except Exception as e:
                raise ValueError(
                    f"cannot decode {path} ({type(e).__name__}: {e}); it changed after the up-front check "
                    "or data.verify_images=False let it through. Delete or re-encode it."
                ) from e
            images.append(_fit_config(img, cfg, rng, self.shape, f"{path} decodes to"))
        out = {"x": transforms.uint8_to_float(np.stack(images))}
        if self.labels is not None:
            out["label"] = self.labels[indices]
        return out


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets.


def _import_tensorflow():
    """Imports TensorFlow for the TFRecord fallback (a separate function so tests can replace it)."""
    import tensorflow  # noqa: F401  (optional; only for datasets prepared as TFRecord)

    return tensorflow


def _prepare_command(name: str, data_dir: str | None) -> str:
    """The one-time preparation command (the tfds CLI and most image builders need TensorFlow)."""
    dd = f" --data_dir={data_dir}" if data_dir else ""
    return f"pip install tensorflow-cpu && tfds build {name}{dd} --file_format=array_record"


def tfds_builder(cfg: DataConfig):
    """The tfds builder for ``cfg.name`` / ``cfg.data_dir``, prepared (or with a clear error)."""
    import tensorflow_datasets as tfds

    if cfg.data_dir and str(cfg.data_dir).startswith("gs://"):
        log.warning(
            "data_dir=%s is a bucket: array_record cannot open gs:// paths (google/array_record#120); "
            "copy the prepared dataset to local disk or mount the bucket with gcsfuse if reading fails",
            cfg.data_dir,
        )
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.DatasetNotFoundError as e:
        where = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise ValueError(
            f"tensorflow-datasets does not know a dataset named {cfg.name!r} (it is neither registered nor prepared "
            f"under data_dir={where}). Check the name against https://www.tensorflow.org/datasets/catalog "
            "(e.g. 'cifar10', 'mnist', 'celeb_a', 'oxford_flowers102'); for your own builder, import its module "
            "first or point data_dir at where it was prepared."
        ) from e
    if not builder.is_prepared():
        if cfg.download:
            builder.download_and_prepare(file_format="array_record")
        else:
            raise FileNotFoundError(
                f"tfds dataset {cfg.name!r} is not prepared under {builder.data_dir}. Prepare it once (see "
                f"diffusion_jax/data/README.md): `{_prepare_command(cfg.name, cfg.data_dir)}`, or set data.download=True."
            )
    return builder


def _check_split(builder, name: str, split: str):
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
            f"split {split!r} does not exist in tfds dataset {name!r}: it has {sorted(builder.info.splits)} "
            f"(slices such as 'train[:90%]' also work). Original error: {e}"
        ) from e


class TfdsSource:
    """A tfds split read through ``builder.as_data_source`` (array_record, no TensorFlow needed).

    Images come from feature ``cfg.image_key``, labels from ``cfg.label_key`` (a ClassLabel) when
    present and ``cfg.use_labels``. The data source is reopened lazily in each worker process.
    """

    def __init__(self, cfg: DataConfig, split: str):
        from tensorflow_datasets.core import file_adapters

        self.cfg, self.split = cfg, split
        builder = tfds_builder(cfg)
        self.name = f"tfds {cfg.name}:{split}"
        self.num_examples = _check_split(builder, cfg.name, split).num_examples
        features = builder.info.features
        if cfg.image_key not in features:
            raise ValueError(
                f"tfds dataset {cfg.name!r} has no feature {cfg.image_key!r}; its features are "
                f"{sorted(features.keys())}: set data.image_key"
            )
        shape = tuple(features[cfg.image_key].shape)
        if len(shape) != 3:
            raise ValueError(
                f"tfds feature {cfg.name}/{cfg.image_key} has shape {shape}, not an image (H, W, C)"
            )
        h, w, c = shape
        dtype = np.dtype(getattr(features[cfg.image_key], "np_dtype", np.uint8))
        if dtype != np.uint8:
            raise ValueError(
                f"tfds feature {cfg.name}/{cfg.image_key} stores {dtype} images; only uint8 images are supported"
            )
        if cfg.image_size == 0 and (h is None or w is None):
            raise ValueError(
                f"images of tfds dataset {cfg.name!r} vary in size (feature shape {shape}); set data.image_size to resize them"
            )
        if cfg.channels == 0 and c not in (1, 3):
            raise ValueError(
                f"tfds dataset {cfg.name!r} has {c} channels per image; set data.channels=1 or 3"
            )
        size = cfg.image_size
        self.shape = (size or h, size or w, cfg.channels or c)

        self.label_key = None
        self.num_classes, self.class_names = None, None
        if cfg.use_labels and cfg.label_key:
            if cfg.label_key in features:
                feat = features[cfg.label_key]
                k = getattr(feat, "num_classes", None)
                if k is None and not cfg.num_classes:
                    raise ValueError(
                        f"tfds feature {cfg.name}/{cfg.label_key} is not a ClassLabel; set data.num_classes or data.label_key=''"
                    )
                if k and cfg.num_classes and k > cfg.num_classes:
                    raise ValueError(
                        f"tfds dataset {cfg.name!r} has {k} classes in {cfg.label_key!r} but data.num_classes="
                        f"{cfg.num_classes}: labels would be out of range; raise num_classes"
                    )
                self.label_key = cfg.label_key
                self.num_classes = cfg.num_classes or k
                names = getattr(feat, "names", None)
                self.class_names = tuple(names) if names else None
            else:
                log.info("tfds dataset %s has no feature %r: no labels", cfg.name, cfg.label_key)

        formats = builder.info.available_file_formats()
        self.in_memory: ArraySource | None = None
        if file_adapters.FileFormat.ARRAY_RECORD not in formats:
            self.in_memory = self._load_tfrecord_fallback(builder, formats)
        self._ds = None

    def _load_tfrecord_fallback(self, builder, formats) -> ArraySource:
        """TFRecord only: read the split into memory with ``tfds.load`` (needs TensorFlow)."""
        cfg = self.cfg
        fmt = ", ".join(sorted(f.value for f in formats)) or "unknown"
        convert = (
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record` "
            f"(needs TensorFlow once; or rebuild into a fresh data_dir: `{_prepare_command(cfg.name, cfg.data_dir)}`)"
        )
        try:
            _import_tensorflow()
        except ImportError as e:
            raise RuntimeError(
                f"tfds dataset {cfg.name!r} is prepared under {builder.data_dir} as {fmt} only, which needs TensorFlow "
                f"to read. Either convert it once to array_record, which reads without TensorFlow: {convert}; or "
                "`pip install tensorflow-cpu` to read it with tfds.load (the split is then held in memory)."
            ) from e
        import tensorflow_datasets as tfds

        warnings.warn(
            f"tfds dataset {cfg.name!r} has no array_record files; reading split {self.split!r} into memory with "
            f"tfds.load (TensorFlow). For large datasets convert once instead: {convert}",
            stacklevel=3,
        )
        ds = tfds.load(
            cfg.name, split=self.split, data_dir=cfg.data_dir, shuffle_files=False, download=False
        )
        images, labels = [], []
        for ex in tfds.as_numpy(ds):
            images.append(
                self._fit(np.asarray(ex[cfg.image_key]), None, where=f"example {len(images)}")
            )
            if self.label_key:
                labels.append(int(ex[self.label_key]))
        x = np.stack(images)
        return ArraySource(
            x,
            np.asarray(labels) if self.label_key else None,
            num_classes=self.num_classes,
            name=self.name,
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # reopened in each process
        return state

    def _data_source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder(self.cfg.name, data_dir=self.cfg.data_dir)
            try:
                self._ds = builder.as_data_source(split=self.split, file_format="array_record")
            except RuntimeError as e:
                if "gs://" in str(e):
                    raise RuntimeError(
                        f"array_record cannot read {self.cfg.data_dir} (a bucket; google/array_record#120). Copy the "
                        "prepared dataset to local disk (`gcloud storage cp -r`) or mount the bucket with gcsfuse, "
                        "and point data.data_dir there."
                    ) from e
                raise
        return self._ds

    def _fit(self, img: np.ndarray, rng: np.random.Generator | None, where: str) -> np.ndarray:
        cfg = self.cfg
        if img.ndim == 2:
            img = img[..., None]
        img = transforms.convert_channels(img, cfg.channels)
        return _fit_config(img, cfg, rng, self.shape, f"{self.name} {where}: image of")

    def load(
        self, indices: np.ndarray, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """Reads and decodes the records at ``indices`` -> {"x": float32 [b, H, W, C], "label": int32 [b]}."""
        if (
            self.in_memory is not None
        ):  # TFRecord fallback: already fitted (centre crop) when loaded
            return self.in_memory.load(indices)
        records = self._data_source().__getitems__([int(i) for i in indices])
        images = [
            self._fit(np.asarray(r[self.cfg.image_key]), rng, where=f"record {i}")
            for i, r in zip(indices, records, strict=True)
        ]
        out = {"x": transforms.uint8_to_float(np.stack(images))}
        if self.label_key:
            labels = np.array([r[self.label_key] for r in records], np.int64)
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(
                    f"{self.name} record {indices[j]}: label {labels[j]} is out of range [0, {self.num_classes})"
                )
            out["label"] = labels.astype(np.int32)
        return out
