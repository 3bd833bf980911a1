"""Input-pipeline throughput (images/s) for image folders, tensorflow-datasets and the built-ins.

    python -m benchmarks.input_pipeline [--num-images 512] [--batches 40]

Writes ``--num-images`` random-texture 32x32 RGB PNGs to a temporary folder and builds the same
images as an array_record tfds dataset there (plus as many smooth 128x128 JPEGs, resized to 64x64,
for a photo-like decode cost), then times ``make_train_iterator`` at batch 128
(after one warm-up batch) for each source and a few thread/worker settings. The digits and 2-D
toys are in memory. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

from diffusion_jax import data


def _write_pngs(root: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        cls = os.path.join(root, f"class_{i % 10}")
        os.makedirs(cls, exist_ok=True)
        Image.fromarray(im).save(os.path.join(cls, f"{i:05d}.png"))
    return images


def _write_jpegs(root: str, n: int) -> None:
    """Smooth 128x128 RGB JPEGs (photo-like decode cost) in one folder."""
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((128, 128), Image.Resampling.BICUBIC).save(
            os.path.join(root, f"{i:05d}.jpg"), quality=90
        )


def _build_tfds(data_dir: str, images: np.ndarray) -> None:
    import tensorflow_datasets as tfds

    class BenchImages32(tfds.core.GeneratorBasedBuilder):
        """Random 32x32 RGB PNGs with 10 labels, for the benchmark."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(32, 32, 3)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, im in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 10}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BenchImages32(data_dir=data_dir, file_format="array_record").download_and_prepare()


def _time(cfg, batch_size: int, batches: int) -> tuple[float, float]:
    """(examples per second, milliseconds per batch) over ``batches`` after one warm-up batch."""
    it = data.make_train_iterator(cfg, batch_size=batch_size, seed=0)
    try:
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        it.close()
    return batches * batch_size / dt, 1e3 * dt / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    b = args.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, tfds_dir = os.path.join(tmp, "pngs"), os.path.join(tmp, "tfds")
        images = _write_pngs(folder, args.num_images)
        jpegs = os.path.join(tmp, "jpegs")
        _write_jpegs(jpegs, args.num_images)
        _build_tfds(tfds_dir, images)

        def cfg(**kw):
            c = data.default_data_config()
            for k, v in kw.items():
                setattr(c, k, v)
            return c

        folder_cfg = dict(source="folder", path=folder, image_size=32, channels=3, random_flip=True)
        tfds_cfg = dict(
            source="tfds",
            name="bench_images32",
            data_dir=tfds_dir,
            image_size=32,
            channels=3,
            random_flip=True,
        )
        settings = [
            ("folder 32x32 PNG", folder_cfg, dict(num_threads=0)),
            ("folder 32x32 PNG", folder_cfg, dict(num_threads=4)),
            ("folder 32x32 PNG", folder_cfg, dict(num_threads=0, num_workers=2)),
            ("folder 32x32 PNG -> 16x16", {**folder_cfg, "image_size": 16}, dict(num_threads=0)),
            (
                "folder 128x128 JPEG -> 64x64",
                {**folder_cfg, "path": jpegs, "image_size": 64},
                dict(num_threads=0),
            ),
            (
                "folder 128x128 JPEG -> 64x64",
                {**folder_cfg, "path": jpegs, "image_size": 64},
                dict(num_threads=4),
            ),
            ("tfds 32x32 PNG array_record", tfds_cfg, dict(num_threads=0)),
            ("tfds 32x32 PNG array_record", tfds_cfg, dict(num_threads=4)),
            ("tfds 32x32 PNG array_record", tfds_cfg, dict(num_threads=0, num_workers=2)),
            ("digits 8x8 -> 16x16", dict(source="digits"), dict(num_threads=0)),
            ("digits 8x8 -> 16x16", dict(source="digits"), dict(num_threads=4)),
            ("moons 2-D points", dict(source="moons"), dict(num_threads=0)),
        ]
        for name, base, run in settings:
            batches = args.batches * (10 if base["source"] in ("digits", "moons") else 1)
            batches *= 2 if run.get("num_workers") else 1  # amortise the workers' start-up
            ex_s, ms = _time(cfg(**base, **run), b, batches)
            rows.append((name, run.get("num_threads", 4), run.get("num_workers", 0), ex_s, ms))

    print(f"batch {b}, {args.num_images} images on disk, {os.cpu_count()} CPU cores")
    print(f"{'source':<30} {'threads':>7} {'workers':>7} {'images/s':>10} {'ms/batch':>9}")
    for name, threads, workers, ex_s, ms in rows:
        print(f"{name:<30} {threads:>7} {workers:>7} {ex_s:>10,.0f} {ms:>9.2f}")


if __name__ == "__main__":
    main()
