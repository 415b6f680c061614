"""Test-wide setup: Triton kernels run in the interpreter on CPU-only machines, and tests
marked `gpu` are skipped unless a CUDA device is present (the device machine runs them with
`pytest -m gpu`)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is defined (at family import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with
    TEST_SEED=<seed> (pytest shows captured output of failing tests)."""
    seed = int(os.environ.get("TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"TEST_SEED={seed}")
    return seed


from run_configs import CONFIG_DIR, SMALL_RUN  # noqa: E402


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the train config as `python train.py overrides` would build it,
    with the data cache in the test's temporary folder."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def make(*overrides, small=True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            base = SMALL_RUN if small else []
            if any(o.startswith("data=") and o != "data=builtin" for o in overrides):
                base = [o for o in base if not o.startswith("data.max_bytes")]  # builtin-only key
            return hydra_compose("train", overrides=base + [f"data.cache_dir={tmp_path / 'cache'}"]
                                 + list(overrides))
    return make
