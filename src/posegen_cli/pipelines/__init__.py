"""One PoseGen segment on diffusers: ``PoseGenPipeline`` and the release-faithful text, image, VAE and scheduler paths."""

from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, check_model_size
from posegen_cli.pipelines.text import DEFAULT_NEGATIVE

__all__ = ["DEFAULT_NEGATIVE", "PoseGenPipeline", "check_model_size"]
