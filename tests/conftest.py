"""Shared fixtures: one tiny synthetic meme set and its demo feature store per test session, and one small demo
run of the numbered notebooks."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` download weights or take minutes: run them only with MAMIKIT_SLOW=1."""
    if os.environ.get("MAMIKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set MAMIKIT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def local_disk(tmp_path_factory):
    """The runs' local checkpoint folders ($MAMIKIT_LOCAL, read by utils.local_root) live in this session's
    temporary folder, notebook kernels and subprocesses included, and go with it: a test that stops a run
    before its end leaves no `mamikit-<hash>` folder in the machine's temp folder."""
    import shutil

    local = tmp_path_factory.mktemp("local-disk")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMIKIT_LOCAL", str(local))
        yield local
    shutil.rmtree(local, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def quiet_messages():
    """mamikit's info messages stay out of the test output; warnings still show (and can be asserted)."""
    from mamikit.utils import set_verbosity

    set_verbosity("WARNING")


@pytest.fixture(scope="module")
def demo():
    """The demo profile (tiny random CLIP/DETR, MiniLM text)."""
    from mamikit.profiles import get_profile

    return get_profile("demo")


@pytest.fixture(scope="module")
def backbones(demo):
    """The demo profile's three frozen backbones on the CPU."""
    from mamikit.backbones import load_backbones

    return load_backbones(demo, device="cpu")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic MAMI + FBHM set (seed 3)."""
    from mamikit.synthetic import generate

    root = tmp_path_factory.mktemp("tiny-data")
    generate(root, seed=3, n_mami=96, n_mami_test=48, n_fbhm=72, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_store(tiny_data, tmp_path_factory):
    """The demo-profile feature store of `tiny_data`."""
    from mamikit.extraction import extract

    store = tmp_path_factory.mktemp("tiny-store")
    extract(tiny_data, store, "demo", batch_size=32, device="cpu", progress=False)
    return store


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tiny_store, tmp_path_factory):
    """One epoch of experiment 10 (decoder, CLIP + DETR) on the tiny set, at `<runs>/round4/10-seed0`."""
    from mamikit.train import TrainConfig, train

    run = tmp_path_factory.mktemp("tiny-runs") / "round4" / "10-seed0"
    cfg = TrainConfig(epochs=1, evals_per_epoch=1, batch_size=8, accumulation=1, device="cpu", seed=0)
    train("10", tiny_data, tiny_store, run, profile="demo", train_cfg=cfg, progress=False)
    return run


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """Every numbered notebook executed once on the small demo (minutes): (run root, executed notebooks).

    Shared by the notebook tests so that the suite runs the notebooks once.
    """
    from mamikit.notebooks import SMALL_PARAMETERS, SMALL_SETTINGS, run_notebooks

    root = tmp_path_factory.mktemp("small-demo") / "demo"
    return root, run_notebooks(root, SMALL_SETTINGS, SMALL_PARAMETERS)
