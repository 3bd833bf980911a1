"""Shared test set-up: float32 JAX on the CPU, small and deterministic; the heaviest files first.

The README's command runs the suite on two xdist workers that take whole files
(``--dist loadfile``). xdist would hand out the files with the most tests first, which left the
few-but-long ones (the notebooks) to the end while the other worker sat idle; instead the files
below go first, longest first, and the rest follow in collection order.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Test files by their measured time on 2 cores (seconds summed over their tests, 2026-12-03,
# under load), longest first. Only the order matters; a file not named here runs after these.
HEAVIEST_FIRST = (
    "test_notebooks.py",  # ~530
    "test_benchmarks_smoke.py",  # ~450
    "test_train_distributed.py",  # ~175
    "test_train_resume.py",  # ~155
    "test_aot.py",  # ~150
    "test_sharding.py",  # ~150
    "test_generate.py",  # ~145
    "test_train.py",  # ~130
    "test_evaluation.py",  # ~125
    "test_tpu_gpu_path.py",  # ~125
    "test_classifier.py",  # ~115
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVIEST_FIRST)))  # stable
