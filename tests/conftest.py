"""Shared fixtures: the real test data committed in ``tests/data``, and an environment that never reaches the network."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from animate_inputs import DRIVING_FRAMES, PIPELINE_SIZE, make_driving_clip

from posegen_cli.testing import make_tiny_models

TEST_DATA = Path(__file__).resolve().parent / "data"


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
    """``tests/data``: the release's example photo (see its README for the source and licence)."""
    return TEST_DATA


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """The one Ray runtime of the test run: 2 CPUs and 2 declared GPUs that do not exist (performance spec §C.4).

    Started on first use only. Its files live in a fresh short /tmp folder (Ray's socket paths must stay under
    107 characters), token auth is off so nothing is written to ``~/.ray``, and all of it is removed at the end.
    """
    import ray

    temp = Path(tempfile.mkdtemp(prefix="pgray-"))
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(temp))
    ray.init(
        num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, _temp_dir=str(temp),
        log_to_driver=False, logging_level=logging.ERROR,
    )  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def pipe(tiny_models: Path):
    """A ``PoseGenPipeline`` on the tiny models, float32 on the CPU."""
    from posegen_cli.longvideo.loading import load_pipeline

    return load_pipeline(tiny_models, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def embeds(pipe, shared_data: Path) -> dict:
    """Prompt, negative prompt and reference embeddings for ``pipe`` at ``PIPELINE_SIZE``."""
    from posegen_cli.video import load_image

    prompt, negative = pipe.encode_prompt("a woman dancing in a red dress")
    image, reference = pipe.encode_reference(load_image(shared_data / "reference_person.png"), *PIPELINE_SIZE)
    return {"prompt_embeds": prompt, "negative_prompt_embeds": negative, "image_embeds": image, "reference_latents": reference}
