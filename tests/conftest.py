"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin
import pytest


@pytest.fixture
def clean_gin():
    """An empty gin config before and after the test (tests that parse or bind gin)."""
    gin.clear_config()
    yield
    gin.clear_config()
