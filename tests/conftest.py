"""Shared fixtures: tiny teachers are built once per session (they take a second or two each)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_teacher_factory(tmp_path_factory):
    """Return ``build(family, prediction_type) -> Path``, caching one folder per combination."""
    from fastlcm.testing import make_tiny_teacher

    cache = {}

    def build(family: str = "sd", prediction_type: str = "epsilon"):
        key = (family, prediction_type)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"teacher-{family}-{prediction_type}")
            cache[key] = make_tiny_teacher(out, family=family, prediction_type=prediction_type)
        return cache[key]

    return build


@pytest.fixture
def tiny_sd_teacher(tiny_teacher_factory):
    return tiny_teacher_factory("sd", "epsilon")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module single-threaded: tiny models on a small shared CPU are far faster without spinning workers."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without Accelerate's process-wide state: its first Accelerator fixes the mixed precision
    for the whole process (a later Accelerator with another precision raises), and tests train in several."""
    import sys

    yield
    if "accelerate" in sys.modules:
        from fastlcm.bench.step_core import reset_accelerate

        reset_accelerate()
