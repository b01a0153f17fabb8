"""Shared fixtures: the pinned real model and the sentencepiece test tokenizer.

Both are fetched by `make model` (`python -m llamacpu.fetch`); a test run started
without them fetches them here, so no real-model test is ever skipped.
"""

from pathlib import Path

import pytest

from llamacpu.fetch import MISTRAL_SPM, SMOLLM2, fetch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "models"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return fetch(SMOLLM2, MODELS)


@pytest.fixture(scope="session")
def spm_model_path() -> Path:
    return fetch(MISTRAL_SPM, MODELS)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_path) -> dict:
    from llamacpu.loaders.gguf import read_metadata
    return read_metadata(smollm2_path)
