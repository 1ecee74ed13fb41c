"""Fixtures shared by several test modules (plain helper functions are in helpers.py)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained dual encoder (seed 0) saved as a checkpoint folder, built once per test run.
    Read-only: a test that writes into it copies it into its tmp_path first."""
    import torch

    from vlpretrain.models import build_model

    from helpers import tiny_model_config

    path = tmp_path_factory.mktemp("ckpt") / "model"
    with torch.random.fork_rng(devices=[]):  # seeded without moving the random state of the test that asked first
        torch.manual_seed(0)
        build_model(tiny_model_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    """The session checkpoint, loaded once per test module, in eval mode."""
    from vlpretrain.models import load_model

    return load_model(checkpoint).eval()


@pytest.fixture
def reset_accelerate():
    """A command run in this process makes an Accelerator; forget its global state afterwards."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture
def one_faiss_thread():
    """One faiss thread while a test runs: faiss's and torch's OpenMP runtimes spin against each other on a
    few cores, and one faiss thread is many times faster at test sizes."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
