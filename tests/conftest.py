"""Shared pytest setup.

* Forces the Hugging Face hub offline (set before huggingface_hub is imported anywhere).
* Puts the repository root on sys.path so ``import models`` works without installing.
* Every test: quant.allocator's mallopt calls are recorded in ``allocator_settings`` instead of being
  made, so train.py / eval.py run in-process leave the test process's allocator alone.
* quiet_warnings: a fixture that silences warnings (modules that compare against peft use it).
* Session fixtures:
    tiny          tests.tiny.Checkpoints: ``tiny(family, task) -> (folder, hf_model)``; each
                  tiny random checkpoint is written once per session (see tests/tiny.py).
    peft_models_dir  Path of the real checkpoints ($PEFT_MODELS_DIR, default ~/.cache/peft-models).
"""
import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
import torch  # noqa: E402

# 1 thread: the 2 cores are shared with other jobs, and 2 threads under contention are many
# times slower (spin-waiting); PEFT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PEFT_TEST_THREADS", "1")))

PEFT_MODELS_DIR = Path(os.environ.get("PEFT_MODELS_DIR", "~/.cache/peft-models")).expanduser()


@pytest.fixture(autouse=True)
def allocator_settings(monkeypatch):
    """The (option, value) pairs quant.allocator would pass to mallopt during the test."""
    from quant import allocator

    settings = []
    monkeypatch.setattr(allocator, "_mallopt", lambda *pairs: settings.extend(pairs) or True)
    return settings


@pytest.fixture
def torch_threads():
    """torch.set_num_threads for one test, restored after it. The C kernels' OpenMP loops run on torch's threads,
    so this is also their team size."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def quiet_warnings():
    """Silence the references' warnings (peft's fan_in_fan_out notice for Conv1D, bitsandbytes' CPU notices, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tiny import Checkpoints

    return Checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


@pytest.fixture(scope="session")
def peft_models_dir():
    return PEFT_MODELS_DIR


def real_model_dir(name: str) -> Path:
    """Folder of a real checkpoint in $PEFT_MODELS_DIR, or pytest.skip with how to fetch it."""
    folder = PEFT_MODELS_DIR / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"{name} not found in {PEFT_MODELS_DIR}; run python ../shared/tools/fetch_models.py")
    return folder
