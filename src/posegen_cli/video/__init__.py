"""Video and image I/O: streaming decode, atomic H.264 encode, audio muxing."""

from posegen_cli.fsutil import available_bytes
from posegen_cli.video.audio import check_audio_file, mux_audio
from posegen_cli.video.decode import VideoInfo, iter_frames, probe_video
from posegen_cli.video.encode import VideoWriter, write_video
from posegen_cli.video.image import LoadedImage, load_image, parse_color, read_image

__all__ = [
    "LoadedImage",
    "VideoInfo",
    "VideoWriter",
    "available_bytes",
    "check_audio_file",
    "iter_frames",
    "load_image",
    "mux_audio",
    "parse_color",
    "probe_video",
    "read_image",
    "write_video",
]
