"""Inputs for the ``animate`` tests: a short driving clip with sound, made from the real reference photo."""

from __future__ import annotations

import math
import struct
import subprocess
import wave
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from posegen_cli.video import write_video

CLIP_FPS = 12
CLIP_SIZE = (360, 640)
"""(width, height) of the driving clip: the reference photo at half size, 9:16 like the model."""


def write_tone(path: Path, seconds: float, rate: int = 16000) -> Path:
    """A 440 Hz mono WAV, so the clip has an audio stream to carry over."""
    count = int(seconds * rate)
    samples = (0.3 * 32767 * np.sin(2 * math.pi * 440 * np.arange(count) / rate)).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{count}h", *samples))
    return path


DRIVING_FRAMES = 36
"""Five 13-frame segments: the anchor, two bases, two transitions."""


def make_driving_clip(reference: Path, out: Path, frames: int, *, audio: bool = True) -> Path:
    """The person of ``reference`` sliding and swaying for ``frames`` frames at 12 fps, with a tone if ``audio``."""
    image = cv2.cvtColor(cv2.imread(str(reference)), cv2.COLOR_BGR2RGB)
    small = cv2.resize(image, CLIP_SIZE, interpolation=cv2.INTER_AREA)
    width, height = CLIP_SIZE
    clip = []
    for i in range(frames):
        angle = 4.0 * math.sin(2 * math.pi * i / 12)
        shift = 10.0 * math.sin(2 * math.pi * i / 18)
        matrix = cv2.getRotationMatrix2D((width / 2, height * 0.9), angle, 1.0)
        matrix[0, 2] += shift
        clip.append(cv2.warpAffine(small, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE))
    if not audio:
        return write_video(out, clip, CLIP_FPS, crf=12)
    silent = out.with_name(out.stem + "-silent.mp4")
    write_video(silent, clip, CLIP_FPS, crf=12)
    tone = write_tone(out.with_name(out.stem + ".wav"), frames / CLIP_FPS + 0.5)
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(silent), "-i", str(tone),
         "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", str(out)],
        check=True,
    )  # fmt: skip
    silent.unlink()
    tone.unlink()
    return out


TEST_OPTIONS = {
    "prompt": "a young man standing by the sea",
    "resolution": "64x112",
    "steps": 2,
    "segment_frames": 13,
    "head": 5,
    "tail": 4,
    "device": "cpu",
    "pose_backend": "mediapipe",
}
"""Tiny-run settings: 13-frame segments with head 5 / tail 4 (the 81/21/20 schedule scaled down), 2 steps, 64x112."""


def segment_embeds(pipe, reference: Path, height: int, width: int) -> dict:
    """The per-job embeddings a ``PoseGenPipeline`` call takes, for the reference photo and a fixed prompt."""
    from posegen_cli.video import load_image

    prompt, negative = pipe.encode_prompt("a woman dancing in a red dress")
    image, latents = pipe.encode_reference(load_image(reference), height, width)
    return {"prompt_embeds": prompt, "negative_prompt_embeds": negative, "image_embeds": image, "reference_latents": latents}
