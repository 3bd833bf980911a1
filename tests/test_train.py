"""End to end: the tiny config through trainer.train_and_evaluate on one CPU device, and the ways
a run fails (non-finite loss, damaged checkpoints, incompatible workdirs, bad configs)."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import ROOT, cache_dir, compilation_cache, tiny_config, worker_env
from PIL import Image

from diffusion_jax import checkpoints, config_utils, data, trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compilation_cache(cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory):
    """20 steps of the tiny config: checkpoints at 10 and 20, samples at the end."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    state = trainer.train_and_evaluate(tiny_config(), workdir)
    return workdir, jax.device_get(state)


class MappedIterator:
    """A data iterator whose batches pass through ``fn(batch, index)``; resumable like grain's."""

    def __init__(self, it, fn):
        self.it, self.fn, self.index = it, fn, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.fn(next(self.it), self.index)
        self.index += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"inner": self.it.get_state(), "index": self.index}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        self.it.set_state(state["inner"])
        self.index = state["index"]

    def start_prefetch(self) -> None:
        pass


def poison_batch(monkeypatch, step: int) -> None:
    """Makes the batch of training step ``step`` (1-based) all NaN."""
    real = data.make_train_iterator

    def poison(batch, index):
        if index == step - 1:
            batch = dict(batch, x=np.full_like(batch["x"], np.nan))
        return batch

    monkeypatch.setattr(
        data, "make_train_iterator", lambda cfg, **kw: MappedIterator(real(cfg, **kw), poison)
    )


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_run_writes_checkpoints_logs_samples_and_config(tiny_run):
    workdir, state = tiny_run
    assert int(state.step) == 20
    assert checkpoint_steps(workdir) == [10, 20]
    png = Image.open(workdir / "samples" / "step_00000020.png")
    assert png.mode == "L" and png.size[0] > 8 * 2  # a grid of 8x8 images, enlarged
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    content = events[0].read_bytes()
    for tag in (
        b"train/loss",
        b"train/grad_norm",
        b"train/learning_rate",
        b"train/steps_per_sec",
        b"samples",
    ):
        assert tag in content, tag
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["ch"] == 32 and saved["train"]["num_steps"] == 20
    assert config_utils.parse_config(saved) == config_utils.parse_config(tiny_config())


def read_scalars(event_file) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars {tag: [(step, value), ...]} of an events file (TFRecord of Event protos)."""
    from tensorboardX.proto import event_pb2

    raw, pos, out = event_file.read_bytes(), 0, {}
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4  # length, its CRC, the record, its CRC
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_scalars_show_the_loss_going_down(tiny_run):
    workdir, _ = tiny_run
    (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    scalars = read_scalars(events)
    loss = scalars["train/loss"]
    assert [step for step, _ in loss] == [5, 10, 15, 20]
    assert loss[-1][1] < 0.7 * loss[0][1], loss
    assert all(v == pytest.approx(2e-3) for _, v in scalars["train/learning_rate"])
    assert all(v > 0 for _, v in scalars["train/steps_per_sec"] + scalars["train/images_per_sec"])
    assert all(v == 0 for _, v in scalars["train/nonfinite_steps"])


def test_load_ema_params_and_sampler(tiny_run):
    workdir, state = tiny_run
    params, cfg = checkpoints.load_ema_params(workdir)
    chex.assert_trees_all_equal(params, state.ema_params)
    assert isinstance(cfg, config_utils.Config) and cfg.model.kwargs["ch"] == 32
    older, _ = checkpoints.load_ema_params(workdir, step=10)
    assert not np.array_equal(older["conv_in"]["kernel"], params["conv_in"]["kernel"])
    loaded = checkpoints.load_sampler(workdir, sampler="ddim", num_steps=3)
    assert loaded.data_shape == (8, 8, 1)
    assert (loaded.config.sample.sampler, loaded.config.sample.num_steps) == ("ddim", 3)
    x = loaded.sample(loaded.params, jax.random.key(0), (2, *loaded.data_shape))
    chex.assert_shape(x, (2, 8, 8, 1))
    assert bool(jnp.all(jnp.abs(x) <= 1.0))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 15"):
        checkpoints.load_ema_params(workdir, step=15)


def test_rerun_of_a_finished_run_does_nothing(tiny_run, tmp_path):
    workdir, state = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    again = trainer.train_and_evaluate(tiny_config(), copy)
    chex.assert_trees_all_equal(jax.device_get(again.params), state.params)
    assert checkpoint_steps(copy) == [10, 20]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, caplog):
    """The newest checkpoint unreadable, a half-written one beside it: resume from step 10, warn,
    and reach bit-for-bit the same step-20 state as the uninterrupted run."""
    workdir, state = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    for f in (copy / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage")
    half = copy / "checkpoints" / "30.orbax-checkpoint-tmp-1234"  # an interrupted save
    shutil.copytree(copy / "checkpoints" / "10", half)
    shutil.rmtree(half / "state")

    with caplog.at_level(logging.WARNING):
        resumed = trainer.train_and_evaluate(tiny_config(), copy)
    assert "checkpoint 20 in" in caplog.text and "is damaged" in caplog.text
    chex.assert_trees_all_equal(jax.device_get(resumed.params), state.params)
    chex.assert_trees_all_equal(jax.device_get(resumed.opt_state), state.opt_state)
    assert checkpoint_steps(copy) == [10, 20]
    assert len(list((copy / "checkpoints.unreadable").iterdir())) == 1
    chex.assert_trees_all_equal(checkpoints.load_ema_params(copy)[0], state.ema_params)


def largest_array_file(step_dir):
    """The largest file under a checkpoint's state/ (an OCDBT data file of the arrays)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_loaders_fall_back_past_a_truncated_newest_checkpoint(tiny_run, tmp_path, caplog):
    """Issue 21 item 1: the newest checkpoint's largest array file cut to 100 bytes. Without a step
    the loaders (load_ema_params, load_sampler, checkpoints.resolve_step) use step 10, warning about
    step 20; asked for step 20 they stop with an error naming it and --checkpoint_step."""

    workdir, _ = tiny_run
    copy = copy_of(workdir, tmp_path)
    with open(largest_array_file(copy / "checkpoints" / "20"), "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        params, _ = checkpoints.load_ema_params(copy)
    assert "checkpoint 20 in" in caplog.text and "is damaged" in caplog.text
    chex.assert_trees_all_equal(params, checkpoints.load_ema_params(workdir, step=10)[0])
    assert checkpoints.load_sampler(copy).step == 10
    assert checkpoints.resolve_step(str(copy)) == 10
    for load in (checkpoints.load_ema_params, checkpoints.load_sampler, checkpoints.resolve_step):
        with pytest.raises(
            checkpoints.CorruptCheckpointError,
            match=r"checkpoint 20 in .*--checkpoint_step.*\[10\]",
        ):
            load(copy, step=20)
    assert checkpoint_steps(copy) == [10, 20]  # readers move nothing


def test_loaders_fall_back_past_an_unloadable_checkpoint_saved_without_checksums(
    tiny_run, tmp_path, caplog
):
    """A checkpoint from before checksums (none recorded) whose arrays fail to load: the same
    fallback, from the load error rather than a checksum."""
    copy = copy_of(tiny_run[0], tmp_path)
    step_dir = copy / "checkpoints" / "20"
    for path in [
        step_dir / "checksums.json",
        *(copy / "checkpoints" / "10").glob("checksums.json"),
    ]:
        path.unlink()
    for path in (step_dir / "state").rglob("ocdbt.process_*/d/*"):
        path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        loaded = checkpoints.load_sampler(copy)
    assert loaded.step == 10 and "checkpoint 20 in" in caplog.text
    assert "saved without checksums" in caplog.text


def test_sample_py_names_a_damaged_checkpoint_step(tiny_run, tmp_path):
    copy = copy_of(tiny_run[0], tmp_path)
    with open(largest_array_file(copy / "checkpoints" / "20"), "r+b") as f:
        f.truncate(100)
    out = subprocess.run(
        [sys.executable, "sample.py", "--workdir", str(copy), "--checkpoint_step", "20"],
        cwd=ROOT, env=worker_env(tmp_path / "cache"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "sample.py: checkpoint 20 in" in out.stderr and "--checkpoint_step" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_flipped_byte_is_caught_on_resume_and_by_the_loaders(tiny_run, tmp_path, caplog):
    """Issue 21 item 7: one byte flipped in the middle of the newest checkpoint's largest array
    file used to load silently. The checksums saved with each checkpoint catch it: the loaders use
    step 10 and the trainer resumes from step 10 (setting 20 aside), each naming step 20, and the
    rerun reaches the uninterrupted run's step-20 state bit for bit."""
    workdir, state = tiny_run
    copy = copy_of(workdir, tmp_path)
    bad = largest_array_file(copy / "checkpoints" / "20")
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        params, _ = checkpoints.load_ema_params(copy)
    chex.assert_trees_all_equal(params, checkpoints.load_ema_params(workdir, step=10)[0])
    assert "checkpoint 20 in" in caplog.text and "SHA-256 mismatch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = trainer.train_and_evaluate(tiny_config(), copy)
    assert "checkpoint 20 in" in caplog.text and "SHA-256 mismatch" in caplog.text
    assert len(list((copy / "checkpoints.unreadable").iterdir())) == 1
    chex.assert_trees_all_equal(jax.device_get(resumed.params), state.params)
    assert checkpoint_steps(copy) == [10, 20]
    assert checkpoints.verify_checksums(copy / "checkpoints" / "20", 20)  # saved again, sealed


def test_resume_with_another_num_workers(tiny_run, tmp_path):
    """Issue 21 item 3: data.num_workers may change between runs. The data position is saved as the
    next batch index, so a run saved without worker processes resumes with one (its checkpoints
    were once reported unreadable: KeyError 'exhausted'), at the batch where it stopped (the
    batches do not depend on the worker count: test_data.py)."""
    copy = copy_of(tiny_run[0], tmp_path)
    config = tiny_config()
    config.train.num_steps = 22
    config.data.num_workers = 1
    assert int(trainer.train_and_evaluate(config, copy).step) == 22
    assert not (copy / "checkpoints.unreadable").exists()
    saved = json.loads((copy / "checkpoints" / "22" / "data" / "process_0-of-1.json").read_text())
    assert saved == {"next_index": 22}


def test_grain_worker_states_restore_into_any_worker_count():
    """Data states saved by grain's own worker pipelines (before the iterator counted batches
    itself) restore too: the workers' positions add up to the next batch index."""
    cfg = tiny_config().data
    expected = data.make_train_iterator(cfg, batch_size=4, seed=0)
    for _ in range(5):
        next(expected)
    two_workers = {  # grain's mp_prefetch state after 5 batches from 2 workers (3 + 2)
        "next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
        "iterators_in_use_states": [{"next_index": 3}, {"next_index": 2}], "exhausted": [0, 0],
        "future_states": {},
    }  # fmt: skip
    it = data.make_train_iterator(cfg, batch_size=4, seed=0)
    it.set_state(two_workers)
    assert it.get_state() == {"next_index": 5}
    chex.assert_trees_all_equal(next(it), next(expected))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    cache, tmp_path, monkeypatch
):
    poison_batch(monkeypatch, step=13)
    with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite .* at step 13.*step 10"):
        trainer.train_and_evaluate(tiny_config(), tmp_path)
    assert checkpoint_steps(tmp_path) == [10]
    params, _ = checkpoints.load_ema_params(tmp_path)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_nonfinite_steps_can_be_skipped_and_counted(cache, tmp_path, monkeypatch):
    poison_batch(monkeypatch, step=13)
    config = tiny_config()
    config.train.on_nonfinite = "skip"
    state = jax.device_get(trainer.train_and_evaluate(config, tmp_path))
    assert int(state.step) == 20
    assert int(state.nonfinite_steps) == 1 and int(state.first_nonfinite_step) == 13
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves((state.params, state.opt_state)))


def test_incompatible_workdir_is_refused(tiny_run):
    workdir, _ = tiny_run
    config = tiny_config()
    config.model.ch = 64
    config.train.num_steps = 40  # allowed to change; the model is not
    with pytest.raises(ValueError, match=r"incompatible config(.|\n)*model.ch: 32 -> 64"):
        trainer.train_and_evaluate(config, workdir)
    assert json.loads((workdir / "config.json").read_text())["model"]["ch"] == 32


def copy_of(workdir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy


def assert_untouched(workdir, saved_config: str) -> None:
    """A refused start left the workdir as it was: config.json, checkpoints 10 and 20, nothing set aside."""
    assert (workdir / "config.json").read_text() == saved_config
    assert checkpoint_steps(workdir) == [10, 20]
    assert not (workdir / "checkpoints.unreadable").exists()


@pytest.mark.parametrize(
    "path, value, change",
    [
        ("seed", 1, "seed: 0 -> 1"),
        ("data.random_flip", True, "data.random_flip: False -> True"),
        ("optim.grad_clip_norm", 0.0, "optim.grad_clip_norm: 1.0 -> 0.0"),
    ],
)
def test_resume_refuses_a_change_of_what_the_run_computes(tiny_run, tmp_path, path, value, change):
    """The seed, the data and the optimiser state's structure define the run: a resume that changes
    them is refused (naming the keys and how to start afresh) before anything is written."""
    copy = copy_of(tiny_run[0], tmp_path)
    saved = (copy / "config.json").read_text()
    config = tiny_config()
    config.train.num_steps = 25
    section, _, key = path.rpartition(".")
    setattr(config[section] if section else config, key, value)
    with pytest.raises(ValueError, match=r"incompatible config(.|\n)*") as e:
        trainer.train_and_evaluate(config, copy)
    assert change in str(e.value) and "Use a new --workdir" in str(e.value)
    assert_untouched(copy, saved)


def test_resume_checks_the_config_saved_in_the_checkpoint(tiny_run, tmp_path):
    """config.json deleted: the config saved with the checkpoint being restored still refuses a
    T=1000 resume of the T=100 run, and the run's own config resumes (and writes config.json)."""
    copy = copy_of(tiny_run[0], tmp_path)
    saved = (copy / "config.json").read_text()
    (copy / "config.json").unlink()
    config = tiny_config()
    config.train.num_steps = 25
    config.diffusion.num_timesteps = 1000
    with pytest.raises(ValueError, match=r"checkpoint 20 (.|\n)*incompatible config") as e:
        trainer.train_and_evaluate(config, copy)
    assert "diffusion.num_timesteps: 100 -> 1000" in str(e.value)
    assert checkpoint_steps(copy) == [10, 20] and not (copy / "config.json").exists()
    assert not (copy / "checkpoints.unreadable").exists()
    config.diffusion.num_timesteps = 100
    assert int(trainer.train_and_evaluate(config, copy).step) == 25
    assert json.loads((copy / "config.json").read_text()) == dict(
        json.loads(saved), train={**json.loads(saved)["train"], "num_steps": 25}
    )


def test_a_start_that_fails_writes_no_config_json(cache, tmp_path):
    """A wrong config tried first on a new workdir fails at start and leaves no config.json behind,
    so the run's own command is not refused afterwards."""
    workdir = tmp_path / "w"
    wrong = tiny_config()
    wrong.data.source, wrong.data.path = "arrays", str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        trainer.train_and_evaluate(wrong, workdir)
    assert not (workdir / "config.json").exists()
    config = tiny_config()
    config.train.num_steps = 0
    assert int(trainer.train_and_evaluate(config, workdir).step) == 0


def test_labels_outside_model_num_classes_fail_before_the_first_step(cache, tmp_path, monkeypatch):
    """model.num_classes=5 on the 10 digit classes, and a batch of label 12 (past the null class
    10): both stop before any step, naming the labels and model.num_classes, not with a NaN."""
    config = tiny_config()
    config.model.num_classes = 5
    with pytest.raises(ValueError, match=r"labels in \[0, 9\].*model.num_classes=5"):
        trainer.train_and_evaluate(config, tmp_path / "fewer_classes")
    real = data.make_train_iterator

    def label_12(batch, index):
        return dict(batch, label=np.full_like(batch["label"], 12))

    monkeypatch.setattr(
        data, "make_train_iterator", lambda cfg, **kw: MappedIterator(real(cfg, **kw), label_12)
    )
    with pytest.raises(ValueError, match=r"step 1 has labels in \[12, 12\].*model.num_classes=10"):
        trainer.train_and_evaluate(tiny_config(), tmp_path / "shifted")


NEW_IN_ISSUE_24 = {
    "diffusion": ("process", "discrete", "sigma_min", "sigma_max", "rho", "sigma_data",
                  "time_sampling", "time_loc", "time_scale"),
    "sample": ("spacing", "rho", "s_churn", "s_tmin", "s_tmax", "s_noise"),
}  # fmt: skip


def test_a_run_saved_before_the_noise_process_keys_samples_and_resumes(tiny_run, tmp_path):
    """A workdir whose config.json and checkpoint configs lack the process keys (written before
    they existed) loads as the discrete VP run it was, samples identically, and resumes."""
    workdir, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    stripped = 0
    for path in [old / "config.json", *(old / "checkpoints").glob("*/config/metadata")]:
        saved = json.loads(path.read_text())
        config = saved.get("config", saved)
        for section, keys in NEW_IN_ISSUE_24.items():
            for key in keys:
                stripped += key in config[section]
                config[section].pop(key, None)
        path.write_text(json.dumps(saved))
    for path in (old / "checkpoints").glob("*/checksums.json"):
        path.unlink()  # such runs predate checksums too (edited records would not match them)
    assert stripped >= 3 * 15  # config.json and both checkpoints lost every new key
    new_run = checkpoints.load_sampler(workdir, sampler="ddim", num_steps=4)
    old_run = checkpoints.load_sampler(old, sampler="ddim", num_steps=4)
    assert old_run.config == new_run.config
    shape = (3, *old_run.data_shape)
    chex.assert_trees_all_equal(
        old_run.sample(old_run.params, jax.random.key(2), shape),
        new_run.sample(new_run.params, jax.random.key(2), shape),
    )
    config = tiny_config()
    config.train.num_steps = 25
    state = trainer.train_and_evaluate(config, old)
    assert int(state.step) == 25


@pytest.mark.parametrize(
    "section, key, message",
    [
        ("optim", "lerning_rate", "'optim.lerning_rate'.*Did you mean 'learning_rate'"),
        ("model", "chmult", "'model.chmult' for model 'unet'.*Did you mean 'ch_mult'"),
        ("train", "num_step", "'train.num_step'.*Did you mean 'num_steps'"),
        ("data", "imagesize", "imagesize"),
        (None, "sampel", "'sampel'.*Did you mean 'sample'"),
    ],
)
def test_unknown_config_keys_fail_naming_the_key(section, key, message):
    values = tiny_config().to_dict()
    (values[section] if section else values)[key] = 1
    with pytest.raises(ValueError, match=message):
        config_utils.parse_config(values)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("train.batch_size", 0, "train.batch_size=0 must be >= 1"),
        ("optim.optimizer", "sgd", "optim.optimizer='sgd' is not one of"),
        ("optim.learning_rate", "fast", "optim.learning_rate='fast' has type str; expected float"),
        ("ema.decay", 1.0, r"ema.decay=1.0 must be in \[0, 1\)"),
        ("model.name", "transformer", "model.name='transformer' is not one of"),
        ("diffusion.loss", "hybrid", "needs model.learn_sigma=True"),
        ("optim.weight_decay", 0.1, "needs optim.optimizer='adamw'"),
        ("diffusion.process", "ve", "diffusion.process='ve' is not one of"),
        ("diffusion.time_sampling", "beta", "diffusion.time_sampling='beta' is not one of"),
    ],
)
def test_invalid_config_values_fail_naming_the_key(path, value, message):
    values = tiny_config().to_dict()
    section, key = path.split(".")
    values[section][key] = value
    with pytest.raises(ValueError, match=message):
        config_utils.parse_config(values)


def test_every_config_file_parses():
    """Each configs/*.py parses, documents its command and survives a JSON round trip; a config
    with a ``classifier`` section is a train_classifier.py config, one with an ``autoencoder``
    section an autoencoder config (train.py)."""
    import importlib

    from diffusion_jax import autoencoder_trainer, classifier_trainer

    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"configs.{path.stem}")
        config = module.get_config()
        kind = config_utils.run_kind(config)
        if kind == "classifier":
            parse, command = classifier_trainer.parse_classifier_config, "train_classifier.py"
        elif kind == "autoencoder":
            parse, command = autoencoder_trainer.parse_autoencoder_config, "train.py"
        else:
            parse, command = config_utils.parse_config, "train.py"
        parsed = parse(config)
        assert path.read_text().lstrip().startswith(('r"""', '"""')), (
            f"{path.name} needs a docstring"
        )
        assert f"python {command} --config configs/{path.name}" in module.__doc__, path.name
        assert parse(parsed.to_dict()) == parsed, path.name


def test_cifar10_config_is_the_ddpm_paper_setting():
    from configs import cifar10

    cfg = config_utils.parse_config(cifar10.get_config())
    model = config_utils.build_model(cfg)
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t)["params"])
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes)) == 35_746_307
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.grad_clip_norm) == (
        2e-4,
        5000,
        1.0,
    )
    assert (cfg.train.batch_size, cfg.train.num_steps, cfg.ema.decay) == (128, 800_000, 0.9999)
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.data.random_flip) == (
        "linear",
        1000,
        True,
    )
    assert cfg.model.kwargs["dropout"] == 0.1 and cfg.optim.lr_schedule == "constant"


def run_cli(args, tmp_path, num_devices=None):
    env = worker_env(tmp_path / "cache", num_devices)
    return subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_rejects_an_unknown_override(tmp_path):
    out = run_cli(["--config.train.num_stepz=3"], tmp_path)
    assert out.returncode != 0
    assert "num_stepz" in out.stderr


def test_cli_names_an_unknown_config_section_and_the_nearest(tmp_path):
    out = run_cli(["--config.optimizer.learning_rate=1e-3"], tmp_path)
    assert out.returncode != 0
    assert "unknown config section 'optimizer' in --config.optimizer.learning_rate" in out.stderr
    assert "Did you mean 'optim'?" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.optimizer.learning_rate=1e-3"], "section 'optimizer'.*Did you mean 'optim'"),
        (["--config", "X", "--config.modle.ch", "64"], "section 'modle'.*Did you mean 'model'"),
        (["--noconfig.train.num_stepz"], "key 'train.num_stepz'.*Did you mean 'num_steps'"),
        (["--config.seed.value=1"], "'seed' is a value, not a section"),
    ],
)
def test_config_overrides_are_checked_against_the_config(argv, message):
    with pytest.raises(config_utils.ConfigError, match=message):
        config_utils.check_overrides(tiny_config(), argv)


def test_config_overrides_that_exist_pass():
    from configs import digits_classifier

    argv = ["--config=c.py", "--config.train.num_steps=3", "--noconfig.data.random_flip"]
    config_utils.check_overrides(tiny_config(), [*argv, "--config.model.ch_mult[0]=2"])
    config_utils.check_overrides(digits_classifier.get_config(), ["--config.classifier.ch=8"])
    with pytest.raises(config_utils.ConfigError, match="section 'clasifier'.*'classifier'"):
        config_utils.check_overrides(digits_classifier.get_config(), ["--config.clasifier.ch=8"])


def test_cli_rejects_a_batch_that_does_not_split_over_the_devices(tmp_path):
    out = run_cli(["--config.train.batch_size=7"], tmp_path, num_devices=2)
    assert out.returncode != 0
    assert "train.batch_size=7 must be divisible by the number of devices (2" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
