"""Video and image I/O: streaming decode, atomic H.264 encode, audio muxing."""

from posegen_cli.video.audio import check_audio_file, mux_audio
from posegen_cli.video.decode import VideoInfo, iter_frames, probe_video
from posegen_cli.video.encode import VideoWriter, available_bytes, write_video
from posegen_cli.video.image import load_image

__all__ = [
    "VideoInfo",
    "VideoWriter",
    "available_bytes",
    "check_audio_file",
    "iter_frames",
    "load_image",
    "mux_audio",
    "probe_video",
    "write_video",
]
