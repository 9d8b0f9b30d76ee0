"""Carry the driving video's sound over to the generated one."""

from __future__ import annotations

from pathlib import Path

from posegen_cli.errors import InputError, ResourceError, option
from posegen_cli.video._ffmpeg import has_audio_stream, run_ffmpeg, stream_header
from posegen_cli.video.decode import probe_video


def mux_audio(video: str | Path, audio_source: str | Path, out: str | Path, *, duration: float | None = None) -> Path:
    """Write ``out`` = ``video``'s picture (copied, not re-encoded) + ``audio_source``'s first audio stream as AAC.

    The audio is cut at the video's end (``duration`` seconds when the caller knows it, which saves decoding
    the video to count its frames), and a shorter audio track never shortens the picture.
    A source without audio gives the video unchanged.
    """
    video, audio_source, out = Path(video), Path(audio_source), Path(out)
    has_audio = has_audio_stream(stream_header(audio_source))
    if duration is None:
        duration = probe_video(video).duration
    # -t, not -shortest: with a copied video stream -shortest cuts the picture when the audio ends first.
    maps = ["-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "192k", "-t", f"{duration:.6f}"] if has_audio else ["-map", "0:v:0"]
    result = run_ffmpeg(
        ["-loglevel", "error", "-y", "-i", str(video), "-i", str(audio_source), *maps, "-c:v", "copy",
         "-movflags", "+faststart", "-f", "mp4", str(out)]
    )
    if result.returncode != 0:
        err = result.stderr.strip().splitlines()
        if any("No space left" in line for line in err):
            raise ResourceError(f"disk full while writing {out} (free some space and run again)")
        raise InputError(f"cannot take the audio of {audio_source}: {err[-1] if err else 'ffmpeg failed'} (use {option('no_audio')})")
    return out
