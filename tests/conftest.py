"""Shared fixtures: the real test data beside the repo, and an environment that never reaches the network."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may download, and every test gets its own posegen cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POSEGEN_CACHE_DIR", str(tmp_path_factory.mktemp("posegen-cache")))
    monkeypatch.delenv("POSEGEN_MODELS_DIR", raising=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (the repo is cloned with ``shared/`` beside it)."""
    assert (SHARED_DATA / "reference_person.png").exists(), f"test data missing: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def reference_image_path(shared_data: Path) -> Path:
    return shared_data / "reference_person.png"
