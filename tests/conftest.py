"""Shared test set-up: float32 JAX on the CPU, small and deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
