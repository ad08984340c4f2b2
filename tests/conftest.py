"""Shared fixtures: the default model's files and tokenizer, loaded once per test session."""

from __future__ import annotations

import pytest

from pagedllm.models.loader import ModelSource, resolve_model
from pagedllm.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def default_source() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="session")
def default_tokenizer(default_source: ModelSource) -> Tokenizer:
    return load_tokenizer(default_source)
