"""Tests never reach the network and never compete for more than the 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from lookalikes import PAPER, checkpoint_dir  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", params=PAPER)
def checkpoint(request):
    """(name, directory) of each look-alike of a paper checkpoint (tests/lookalikes/).

    Session-scoped and cached on disk, so every test that takes it runs once
    per checkpoint and the directories are built at most once per source.
    """
    return request.param, checkpoint_dir(request.param)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The end-to-end tests' data sets (tests/e2e.py), built once per session."""
    from e2e import e2e_data

    return e2e_data(tmp_path_factory.mktemp("real-data"))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through playwright, once per module (skipped where either is missing)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install playwright (in the test extras)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()
