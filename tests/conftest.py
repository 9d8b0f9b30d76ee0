"""Shared fixtures: the real test data beside the repo, and an environment that never reaches the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from animate_inputs import DRIVING_FRAMES, make_driving_clip

from posegen_cli.testing import make_tiny_models

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may download, and every test gets its own posegen cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import by is_offline_mode
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete random model set in the real download layout (``make-tiny-models``)."""
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def driving_clip(tmp_path_factory: pytest.TempPathFactory, reference_image_path: Path) -> Path:
    """The reference photo moving, with a tone: a driving video with a person and audio."""
    return make_driving_clip(reference_image_path, tmp_path_factory.mktemp("driving") / "driving.mp4", DRIVING_FRAMES)
