"""posegen: pose-driven long human video with PoseGen on diffusers."""

__version__ = "0.1.0"
