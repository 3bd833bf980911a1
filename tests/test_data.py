"""Input pipelines: built-in data, arrays, image folders, a real tfds dataset; determinism, resumption,
per-process sharding and clear errors on bad data. Offline and small."""

import io
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data
from diffusion_jax.data import sources


def _cfg(**overrides):
    cfg = data.default_data_config()
    cfg.num_threads = 0  # deterministic either way; in-process keeps the tests quick
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _ids_iterator(n=60, **kw):
    """Points whose first coordinate is the example's index, so batches reveal which examples they hold."""
    x = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    kw.setdefault("num_threads", 0)
    return data.make_array_iterator(x, **kw)


def _ids(batch):
    return batch["x"][:, 0].astype(int).tolist()


# ----------------------------------------------------------------------------------------------
# Config.


def test_default_config_has_every_key_and_rejects_unknown_ones():
    cfg = data.default_data_config()
    assert (
        set(cfg.keys())
        == set(data.DATA_CONFIG_HELP)
        == {f for f in data.DataConfig.__dataclass_fields__}
    )
    assert (cfg.source, cfg.image_size, cfg.channels) == ("digits", 16, 1)
    with pytest.raises(AttributeError):
        cfg.imagesize = 32  # locked: a typo raises
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['imagesize'\]"):
        data.dataset_info({"source": "digits", "imagesize": 32})
    with pytest.raises(ValueError, match="data.crop='middle'"):
        data.dataset_info(_cfg(crop="middle"))
    with pytest.raises(ValueError, match="data.channels=2"):
        data.dataset_info(_cfg(channels=2))
    with pytest.raises(ValueError, match="needs data.name"):
        data.dataset_info(_cfg(source="tfds"))


# ----------------------------------------------------------------------------------------------
# Built-in datasets.


def test_digits_splits_shapes_range_and_labels():
    x_all, y_all = data.load_digits("all")
    assert x_all.shape == (1797, 8, 8, 1) and x_all.dtype == np.float32
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    x_tr, y_tr = data.load_digits("train")
    x_te, y_te = data.load_digits("test")
    assert len(x_tr) == 1500 and len(x_te) == 297
    np.testing.assert_array_equal(x_te, x_all[-297:])  # held out: the last 297
    assert data.dataset_info(_cfg(split="all")) == data.DatasetInfo((16, 16, 1), 10, 1797)
    assert data.dataset_info(_cfg()).num_examples == 1500

    batch = next(data.make_train_iterator(_cfg(), batch_size=32, seed=0))
    assert batch["x"].shape == (32, 16, 16, 1) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9
    with pytest.raises(ValueError, match="digits split 'validation' does not exist"):
        data.dataset_info(_cfg(split="validation"))


@pytest.mark.parametrize("method", ["auto", "pad"])
def test_digits_to_16x16_by_upsampling_or_padding(method):
    x8, y = data.load_digits("test")
    ev = data.make_eval_iterator(_cfg(resize_method=method), batch_size=297)
    batch = next(ev)
    if method == "auto":  # integer factor: nearest, each pixel a 2x2 block
        np.testing.assert_array_equal(batch["x"], np.repeat(np.repeat(x8, 2, 1), 2, 2))
    else:
        np.testing.assert_array_equal(batch["x"][:, 4:12, 4:12], x8)
        assert np.all(batch["x"][:, :4] == -1) and np.all(batch["x"][:, 12:] == -1)
    np.testing.assert_array_equal(batch["label"], y)
    rgb = next(data.make_eval_iterator(_cfg(channels=3, image_size=8), batch_size=4))["x"]
    assert rgb.shape == (4, 8, 8, 3) and np.all(rgb[..., 0] == rgb[..., 2])


def test_dino_points_are_standardised_keeping_the_aspect_ratio():
    raw = data.load_dino()
    assert raw.shape == (142, 2)
    np.testing.assert_allclose(raw.mean(0), [54.263, 47.832], atol=1e-3)
    info = data.dataset_info(_cfg(source="dino"))
    assert info == data.DatasetInfo((2,), None, 142)
    ev = list(data.make_eval_iterator(_cfg(source="dino"), batch_size=142))
    assert len(ev) == 1 and set(ev[0]) == {"x"}
    pts = ev[0]["x"]
    assert pts.shape == (142, 2) and pts.dtype == np.float32
    np.testing.assert_allclose(pts.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(pts.var(0).mean(), 1, rtol=1e-5)  # isotropic: mean variance 1
    np.testing.assert_allclose(pts.std(0)[1] / pts.std(0)[0], 26.935 / 16.765, rtol=1e-3)
    per_dim = next(
        data.make_eval_iterator(_cfg(source="dino", standardize="per_dim"), batch_size=142)
    )["x"]
    np.testing.assert_allclose(per_dim.std(0), 1, rtol=1e-5)
    jittered = data.dataset_info(_cfg(source="dino", num_points=1000))
    assert jittered.num_examples == 1000


@pytest.mark.parametrize(
    "name,num_classes",
    [("moons", 2), ("circles", 2), ("swiss_roll", None), ("gaussian_mixture", 8)],
)
def test_2d_toys(name, num_classes):
    cfg = _cfg(source=name, num_points=2000)
    assert data.dataset_info(cfg) == data.DatasetInfo((2,), num_classes, 2000)
    train = next(
        data.make_eval_iterator(
            _cfg(source=name, num_points=2000, eval_split="train"), batch_size=2000
        )
    )
    np.testing.assert_allclose(train["x"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train["x"].var(0).mean(), 1, rtol=1e-4)
    test = next(data.make_eval_iterator(cfg, batch_size=2000))  # a fresh sample, same statistics
    assert not np.allclose(test["x"], train["x"])
    assert abs(test["x"].var(0).mean() - 1) < 0.1
    if num_classes is None:
        assert "label" not in train
    else:
        assert train["label"].dtype == np.int32 and set(np.unique(train["label"])) == set(
            range(num_classes)
        )
    batch = next(data.make_train_iterator(cfg, batch_size=256, seed=1))
    assert batch["x"].shape == (256, 2) and batch["x"].dtype == np.float32


# ----------------------------------------------------------------------------------------------
# In-memory arrays.


def test_arrays_uint8_and_float_images_with_labels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    ev = list(data.make_array_iterator(x, y, batch_size=8, seed=0, train=False, num_threads=0))
    assert [len(b["x"]) for b in ev] == [8, 8, 4]
    got = np.concatenate([b["x"] for b in ev])
    np.testing.assert_allclose(got, x / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in ev]), y)
    f01 = x.astype(np.float32) / 255
    ev01 = next(
        data.make_array_iterator(f01, batch_size=20, seed=0, train=False, value_range=(0, 1))
    )
    np.testing.assert_allclose(ev01["x"], got, atol=1e-5)
    gray = next(data.make_array_iterator(x[..., 0], batch_size=4, seed=0, image_size=12))
    assert gray["x"].shape == (4, 12, 12, 1) and "label" not in gray
    info = data.array_dataset_info(x, y, image_size=12, channels=1)
    assert info == data.DatasetInfo((12, 12, 1), 4, 20)
    listed = [rng.integers(0, 256, (h, 10, 3), dtype=np.uint8) for h in (10, 14, 20, 7)]
    b = next(data.make_array_iterator(listed, batch_size=4, seed=0, image_size=8, crop="random"))
    assert b["x"].shape == (4, 8, 8, 3)


def test_arrays_bad_inputs_name_the_problem():
    x = np.zeros((10, 4, 4, 1), np.uint8)
    kw = dict(batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"label 7 at index 3 is out of range for num_classes=5"):
        data.make_array_iterator(x, np.array([0, 1, 2, 7, 0, 0, 0, 0, 0, 0]), num_classes=5, **kw)
    with pytest.raises(ValueError, match="label -1 at index 2 is negative"):
        data.make_array_iterator(x, np.array([0, 1, -1, 0, 0, 0, 0, 0, 0, 0]), **kw)
    with pytest.raises(ValueError, match=r"labels have shape \(9,\), expected \(10,\)"):
        data.make_array_iterator(x, np.zeros(9, int), **kw)
    with pytest.raises(ValueError, match="labels must be integers"):
        data.make_array_iterator(x, np.full(10, 0.5), **kw)
    with pytest.raises(
        ValueError, match=r"outside value_range=\(-1, 1\); pass value_range=\(0, 1\)"
    ):
        data.make_array_iterator(np.full((10, 4, 4, 1), 3.0, np.float32), **kw)
    mixed = [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"mixed sizes .*set image_size"):
        data.make_array_iterator(mixed, **kw)
    with pytest.raises(ValueError, match=r"mixed channel counts \[1, 3\]; set channels=1 or 3"):
        data.make_array_iterator(
            [np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4, 3), np.uint8)], **kw
        )
    with pytest.raises(
        ValueError, match="batch_size=11 is larger than the 10 examples this process reads"
    ):
        data.make_array_iterator(x, batch_size=11, seed=0)
    with pytest.raises(ValueError, match="batch_size=6 is larger than the 5 examples"):
        data.make_array_iterator(x, batch_size=6, seed=0, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process_index=2 must be in"):
        data.make_array_iterator(x, batch_size=2, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size=300 is larger than the 142 examples"):
        data.make_train_iterator(_cfg(source="dino"), batch_size=300, seed=0)


def test_arrays_from_an_npz_file_through_the_config(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, label=np.arange(12) % 3)
    cfg = _cfg(source="arrays", path=str(tmp_path / "d.npz"), image_size=0, channels=0)
    assert data.dataset_info(cfg) == data.DatasetInfo((8, 8, 3), 3, 12)
    with pytest.raises(ValueError, match="make_array_iterator"):
        data.dataset_info(_cfg(source="arrays"))


# ----------------------------------------------------------------------------------------------
# Image folders.


def _png(path, size=(10, 8), mode="RGB", color=(255, 0, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """cat/ (2 PNG + 1 JPEG), dog/ (1 PNG, 1 WebP in a sub-folder, 1 truncated PNG, 1 text file named
    .png), plus notes.txt, a hidden file and an RGBA image."""
    root = tmp_path / "images"
    _png(root / "cat" / "a.png")
    _png(root / "cat" / "b.png", size=(20, 12), mode="L", color=128)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(root / "cat" / "c.jpg", quality=95)
    _png(root / "dog" / "d.png", mode="RGBA", color=(0, 255, 0, 255))
    os.makedirs(root / "dog" / "puppies")
    Image.new("RGB", (9, 9), (0, 255, 0)).save(root / "dog" / "puppies" / "e.webp")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    (root / "dog" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "fake.png").write_text("not an image")
    (root / "notes.txt").write_text("ignore me")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_folder_with_classes_skips_bad_files_with_a_warning(image_tree):
    cfg = _cfg(source="folder", path=str(image_tree), image_size=8, channels=3)
    with pytest.warns(
        UserWarning, match=r"skipping 2 unreadable image file\(s\) of 7 .*fake\.png.*truncated\.png"
    ):
        info = data.dataset_info(cfg)
    assert info == data.DatasetInfo((8, 8, 3), 2, 5, ("cat", "dog"))
    with pytest.warns(UserWarning):
        ev = list(
            data.make_eval_iterator(
                _cfg(
                    source="folder",
                    path=str(image_tree),
                    image_size=8,
                    channels=3,
                    eval_split="train",
                ),
                batch_size=5,
            )
        )
    (batch,) = ev
    assert batch["x"].shape == (5, 8, 8, 3) and batch["x"].dtype == np.float32
    np.testing.assert_array_equal(
        batch["label"], [0, 0, 0, 1, 1]
    )  # sorted: cat a, b, c; dog d, puppies/e
    np.testing.assert_allclose(batch["x"][0], np.broadcast_to([1, -1, -1], (8, 8, 3)))  # red a.png
    np.testing.assert_allclose(batch["x"][1], 128 / 127.5 - 1, atol=1e-6)  # gray b.png -> RGB
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    with pytest.warns(UserWarning):
        train = next(
            data.make_train_iterator(cfg.copy_and_resolve_references(), batch_size=4, seed=0)
        )
    assert train["x"].shape == (4, 8, 8, 3)
    with pytest.warns(UserWarning):
        gray = data.dataset_info(
            _cfg(source="folder", path=str(image_tree), image_size=8, channels=1, use_labels=False)
        )
    assert gray == data.DatasetInfo((8, 8, 1), None, 5)


def test_folder_bad_files_fail_when_asked(image_tree):
    cfg = _cfg(source="folder", path=str(image_tree), image_size=8, on_bad_file="error")
    with pytest.raises(
        ValueError, match=r"2 of 7 image files .*cannot be read: .*fake\.png .*on_bad_file='warn'"
    ):
        data.dataset_info(cfg)


def test_truncated_file_found_at_read_time_without_verification(tmp_path, image_tree):
    root = tmp_path / "one"
    _png(root / "ok.png")
    shutil.copy(image_tree / "dog" / "truncated.png", root / "truncated.png")
    cfg = _cfg(source="folder", path=str(root), image_size=8, channels=3, verify_images=False)
    assert data.dataset_info(cfg).num_examples == 2  # headers are fine
    with pytest.raises(ValueError, match=r"cannot decode .*truncated\.png"):
        list(data.make_eval_iterator(cfg, batch_size=2))
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable .*truncated\.png"):
        data.dataset_info(_cfg(source="folder", path=str(root), image_size=8, channels=3))


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='.*missing'.* does not exist"):
        data.dataset_info(_cfg(source="folder", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"no png/jpg/jpeg/webp images under .*empty \(it is empty\)"
    ):
        data.dataset_info(_cfg(source="folder", path=str(tmp_path / "empty")))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds 1 other file\(s\), e.g. .*a\.txt"):
        data.dataset_info(_cfg(source="folder", path=str(tmp_path / "text")))
    sizes = tmp_path / "sizes"
    _png(sizes / "a.png", size=(8, 8))
    _png(sizes / "b.png", size=(9, 8))
    with pytest.raises(
        ValueError, match=r"mixed sizes: .*a\.png is 8x8 but .*b\.png is 9x8.*set data.image_size"
    ):
        data.dataset_info(_cfg(source="folder", path=str(sizes), image_size=0, channels=3))
    assert data.dataset_info(
        _cfg(source="folder", path=str(sizes), image_size=4, channels=3)
    ).shape == (4, 4, 3)
    chans = tmp_path / "chans"
    _png(chans / "a.png", mode="L", color=0)
    _png(chans / "b.png")
    with pytest.raises(
        ValueError, match=r"mix grayscale and colour: .*a\.png is mode L .*set data.channels=1 or 3"
    ):
        data.dataset_info(_cfg(source="folder", path=str(chans), image_size=4, channels=0))
    mixed = tmp_path / "mixed"
    _png(mixed / "top.png")
    _png(mixed / "cls" / "a.png")
    with pytest.raises(
        ValueError, match=r"both in class sub-folders and at its top level \(e.g. .*top\.png\)"
    ):
        data.dataset_info(_cfg(source="folder", path=str(mixed), channels=3))
    assert (
        data.dataset_info(
            _cfg(source="folder", path=str(mixed), channels=3, use_labels=False)
        ).num_classes
        is None
    )
    with pytest.raises(ValueError, match=r"out of range for num_classes=1"):
        _png(mixed / "cls2" / "b.png")
        os.remove(mixed / "top.png")
        data.dataset_info(_cfg(source="folder", path=str(mixed), channels=3, num_classes=1))


def test_folder_random_crop_and_flip_are_deterministic(tmp_path):
    root = tmp_path / "grad"
    os.makedirs(root)
    ramp = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))  # left dark, right bright
    for i in range(8):
        Image.fromarray(np.roll(ramp, i, axis=0)).save(root / f"{i}.png")
    cfg = _cfg(
        source="folder", path=str(root), image_size=12, channels=1, crop="random", random_flip=True
    )
    a = _take(data.make_train_iterator(cfg, batch_size=8, seed=3), 3)
    b = _take(data.make_train_iterator(cfg, batch_size=8, seed=3), 3)
    _assert_batches_equal(a, b)
    x = np.concatenate([t["x"] for t in a])
    assert x.shape == (24, 12, 12, 1)
    left_brighter = x[:, :, 0].mean(axis=(1, 2)) > x[:, :, -1].mean(axis=(1, 2))
    assert 0 < left_brighter.sum() < len(left_brighter)  # some images flipped, some not
    ev = next(data.make_eval_iterator(cfg, batch_size=8))["x"]  # eval: centre crop, no flip
    assert np.all(ev[:, :, 0].mean(axis=(1, 2)) < ev[:, :, -1].mean(axis=(1, 2)))


# ----------------------------------------------------------------------------------------------
# A real tensorflow-datasets dataset, built here from PNG digits as array_record.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import sklearn.datasets
    import tensorflow_datasets as tfds

    digits = sklearn.datasets.load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]  # 0..240

    class DiffusionJaxTestDigits(tfds.core.GeneratorBasedBuilder):
        """48 train and 16 test 8x8 digits, stored as PNG."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(0, 48),
                "test": self._generate_examples(48, 64),
            }

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                buf = io.BytesIO()
                Image.fromarray(images[i, ..., 0]).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": int(digits.target[i])}

    root = tmp_path_factory.mktemp("tfds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DiffusionJaxTestDigits(
            data_dir=str(root), file_format="array_record"
        ).download_and_prepare()
    return str(root), images, digits.target.astype(np.int32)


def _tfds_cfg(data_dir, **kw):
    return _cfg(source="tfds", name="diffusion_jax_test_digits", data_dir=data_dir, **kw)


def test_tfds_by_name_and_data_dir(tfds_dir):
    root, images, labels = tfds_dir
    cfg = _tfds_cfg(root, image_size=0, channels=0)
    assert data.dataset_info(cfg) == data.DatasetInfo(
        (8, 8, 1), 10, 48, tuple(str(i) for i in range(10))
    )
    ev = list(data.make_eval_iterator(cfg, batch_size=10))
    assert [len(b["x"]) for b in ev] == [10, 6]
    # tfds stores examples in its own (hashed) order: compare the set of (image, label) pairs.
    got = np.concatenate([b["x"] for b in ev])
    got_pairs = sorted(
        (np.rint((x + 1) * 127.5).astype(np.uint8).tobytes(), int(y))
        for x, y in zip(got, np.concatenate([b["label"] for b in ev]), strict=True)
    )
    want_pairs = sorted((images[i].tobytes(), int(labels[i])) for i in range(48, 64))
    assert got_pairs == want_pairs

    cfg16 = _tfds_cfg(root, image_size=16, channels=3, random_flip=True)
    it = data.make_train_iterator(cfg16, batch_size=16, seed=0)
    seen = np.concatenate([next(it)["label"] for _ in range(3)])  # one epoch of 48
    assert sorted(seen.tolist()) == sorted(labels[:48].tolist())
    batch = next(it)
    assert batch["x"].shape == (16, 16, 16, 3) and batch["x"].dtype == np.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    sliced = data.dataset_info(_tfds_cfg(root, split="train[:25%]"))
    assert sliced.num_examples == 12


def test_tfds_errors_name_the_problem(tfds_dir, tmp_path):
    root = tfds_dir[0]
    with pytest.raises(ValueError, match="does not know a dataset named 'no_such_dataset_xyz'"):
        data.dataset_info(_cfg(source="tfds", name="no_such_dataset_xyz", data_dir=root))
    with pytest.raises(
        ValueError, match=r"split 'validation' does not exist .*\['test', 'train'\]"
    ):
        data.dataset_info(_tfds_cfg(root, split="validation"))
    with pytest.raises(
        FileNotFoundError,
        match=r"not prepared .*tfds build mnist --data_dir=.* --file_format=array_record",
    ):
        data.dataset_info(_cfg(source="tfds", name="mnist", data_dir=str(tmp_path / "nothing")))
    with pytest.raises(
        ValueError, match=r"has no feature 'img'; its features are \['image', 'label'\]"
    ):
        data.dataset_info(_tfds_cfg(root, image_key="img"))
    with pytest.raises(ValueError, match="10 classes in 'label' but data.num_classes=5"):
        data.dataset_info(_tfds_cfg(root, num_classes=5))
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 48 examples"):
        data.make_train_iterator(_tfds_cfg(root), batch_size=64, seed=0)


@pytest.fixture
def tfrecord_only_dir(tfds_dir, tmp_path):
    """A copy of the test dataset whose metadata says TFRecord, as a dataset prepared with tfds.load has."""
    dst = tmp_path / "tfrecord"
    shutil.copytree(tfds_dir[0], dst)
    (info_path,) = dst.glob("diffusion_jax_test_digits/1.0.0/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    return str(dst)


def test_tfds_tfrecord_only_without_tensorflow_says_what_to_do(tfrecord_only_dir, monkeypatch):
    def no_tf():
        raise ImportError("No module named 'tensorflow'")

    monkeypatch.setattr(sources, "_import_tensorflow", no_tf)
    with pytest.raises(
        RuntimeError, match=r"as tfrecord only, .*tfds convert_format .*pip install tensorflow-cpu"
    ):
        data.dataset_info(_tfds_cfg(tfrecord_only_dir))


def test_tfds_tfrecord_fallback_reads_through_tfds_load(tfrecord_only_dir, tfds_dir, monkeypatch):
    import tensorflow_datasets as tfds

    _, images, labels = tfds_dir
    calls = []

    def fake_load(name, *, split, data_dir, shuffle_files, download):
        calls.append((name, split, shuffle_files))
        return [{"image": images[i], "label": labels[i]} for i in range(48)]

    monkeypatch.setattr(sources, "_import_tensorflow", lambda: None)
    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda ds: ds)
    with pytest.warns(UserWarning, match="reading split 'train' into memory with tfds.load"):
        it = data.make_train_iterator(_tfds_cfg(tfrecord_only_dir), batch_size=48, seed=0)
    batch = next(it)
    assert calls == [("diffusion_jax_test_digits", "train", False)]
    assert batch["x"].shape == (48, 16, 16, 1)
    assert sorted(batch["label"].tolist()) == sorted(labels[:48].tolist())


# ----------------------------------------------------------------------------------------------
# Determinism, resumption, sharding, epochs.


def test_same_seed_same_batches_different_seed_different():
    a = _take(data.make_train_iterator(_cfg(random_flip=True), batch_size=16, seed=7), 4)
    b = _take(
        data.make_train_iterator(_cfg(random_flip=True, num_threads=4), batch_size=16, seed=7), 4
    )
    c = _take(data.make_train_iterator(_cfg(random_flip=True), batch_size=16, seed=8), 4)
    _assert_batches_equal(a, b)  # reader threads do not change the batches
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    s0 = _ids(next(_ids_iterator(batch_size=60, seed=0)))
    s1 = _ids(next(_ids_iterator(batch_size=60, seed=1)))
    assert s0 != s1 and sorted(s0) == sorted(s1) == list(range(60))


def test_every_epoch_is_a_fresh_permutation():
    it = _ids_iterator(n=60, batch_size=20, seed=0)
    epochs = [sum((_ids(next(it)) for _ in range(3)), []) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(60))
    assert epochs[0] != epochs[1] != epochs[2]
    it = _ids_iterator(n=50, batch_size=20, seed=0)  # batches run across epoch boundaries
    stream = sum((_ids(next(it)) for _ in range(5)), [])
    assert sorted(stream[:50]) == sorted(stream[50:]) == list(range(50))


def test_resume_with_get_state_set_state():
    cfg = _cfg(source="moons", num_points=500, random_flip=True)
    it = data.make_train_iterator(cfg, batch_size=64, seed=0)
    _take(it, 9)  # past the first epoch (7.8 batches)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = data.make_train_iterator(cfg, batch_size=64, seed=0)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 5), expected)
    img = data.make_train_iterator(_cfg(random_flip=True), batch_size=32, seed=0)
    _take(img, 3)
    state = img.get_state()
    expected = _take(img, 2)
    fresh = data.make_train_iterator(_cfg(random_flip=True), batch_size=32, seed=0)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 2), expected)


def test_resume_through_an_orbax_checkpoint_manager(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = _cfg(random_flip=True)
    it = data.make_train_iterator(cfg, batch_size=32, seed=5)
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = data.make_train_iterator(cfg, batch_size=32, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 4
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 3), expected)


def test_two_processes_read_disjoint_shares_covering_an_epoch():
    def epoch(p):
        it = _ids_iterator(n=60, batch_size=10, seed=0, process_index=p, process_count=2)
        return sum((_ids(next(it)) for _ in range(3)), [])

    p0, p1 = epoch(0), epoch(1)
    assert len(p0) == len(p1) == 30 and len(set(p0)) == len(set(p1)) == 30
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == list(range(60))
    # The eval pass: same batch count and sizes on both, together everything but N % 2.
    ev = [
        list(
            _ids_iterator(n=61, batch_size=8, seed=0, train=False, process_index=p, process_count=2)
        )
        for p in (0, 1)
    ]
    assert [len(b["x"]) for b in ev[0]] == [len(b["x"]) for b in ev[1]] == [8, 8, 8, 6]
    assert sorted(sum((_ids(b) for b in ev[0] + ev[1]), [])) == list(range(60))
    d = [
        data.make_train_iterator(_cfg(), batch_size=8, seed=0, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    assert not np.array_equal(next(d[0])["x"], next(d[1])["x"])


def test_eval_is_one_ordered_pass():
    batches = list(_ids_iterator(n=25, batch_size=10, seed=0, train=False))
    assert [_ids(b) for b in batches] == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert (
        len(list(_ids_iterator(n=25, batch_size=10, seed=0, train=False, drop_remainder=True))) == 2
    )


def test_worker_processes_give_the_same_batches():
    cfg = _cfg(random_flip=True)
    expected = _take(data.make_train_iterator(cfg, batch_size=16, seed=2), 4)
    cfg.num_workers = 2
    it = data.make_train_iterator(cfg, batch_size=16, seed=2)
    try:
        got = _take(it, 4)
    finally:
        it.close()
    _assert_batches_equal(got, expected)
