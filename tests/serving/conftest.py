"""Fixtures for the serving tests: one tiny random model directory per test session."""
from __future__ import annotations

import pytest

from tests.serving.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
