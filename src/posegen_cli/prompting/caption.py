"""Caption the reference photo with Qwen2.5-VL in the structure Wan's captions have.

The release ran Wan's prompt extender (Qwen2.5-VL-7B-Instruct, an empty user prompt, 256..1280 merged 28-pixel
patches of image). Its system prompt contradicts itself (it asks for Chinese and for English); ours asks directly
for what Wan was trained on: image style, then the subject and clothing, then the background, then the camera shot,
in one English paragraph.

The chat text is written here in Qwen's ChatML layout instead of through ``Qwen2_5_VLProcessor``: in transformers 5
that processor cannot be built without torchvision (for its video half), which posegen does not otherwise need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

from posegen_cli.errors import InputError, option, out_of_memory_as
from posegen_cli.prompting.clean import prompt_line
from posegen_cli.prompting.umt5 import clean_prompt
from posegen_cli.report import Reporter

CAPTION_INSTRUCTION = (
    "You write the text prompt for an image-to-video model from a photo of a person. Describe the photo in one English "
    "paragraph of 80 to 120 words, in this order. First the style of the image, for example a realistic photo, a film "
    "photograph, a 3D render or an anime illustration. Then the person: name them with one plain noun such as woman, "
    "man, girl or boy, and describe their age, hair, face, expression and posture, and every piece of clothing with "
    "its colour and material, shoes and accessories included. Then the background, the setting and the light. Last, "
    "the camera shot and angle, for example a full-body shot at eye level. Describe only what is visible. Write plain "
    "sentences without lists, headings, line breaks or quotation marks, and nothing before or after the paragraph."
)
"""Our own system prompt (the release's is Wan's prompt-extender text)."""

CAPTION_REQUEST = "Write the prompt for this photo."

MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28
"""Image size bounds the release gave Qwen2.5-VL (a 720x1280 photo becomes 728x1288, 1196 image tokens)."""


@dataclass
class Captioner:
    """A loaded Qwen2.5-VL with its tokenizer and image processor, and what identifies the weights in cache keys."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    name: str
    revision: str
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def cache_settings(self) -> dict[str, Any]:
        return caption_settings(
            self.name, self.revision, self.model.dtype, self.model.device, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )


def caption_settings(
    name: str,
    revision: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Everything besides the image, seed and length that changes the caption, known before the model is loaded."""
    return {
        "model": name,
        "revision": revision,
        "dtype": str(dtype),
        "device_type": device.type,
        "pixels": [min_pixels, max_pixels],
        "instruction": CAPTION_INSTRUCTION,
        "request": CAPTION_REQUEST,
    }


def load_captioner(path: str | Path, *, device: torch.device, dtype: torch.dtype, name: str, revision: str) -> Captioner:
    """Load Qwen2.5-VL from a local folder onto ``device`` in ``dtype``."""
    path = Path(path)
    with out_of_memory_as(
        f"GPU out of memory loading {name} (about 17 GB in bf16); free the GPU, use {option('device')} cpu, "
        f"or pass {option('prompt')} TEXT to skip captioning"
    ):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype, device_map=str(device))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = AutoImageProcessor.from_pretrained(str(path))
    return Captioner(model=model.eval(), tokenizer=tokenizer, image_processor=image_processor, name=name, revision=revision)


def chat_text(captioner: Captioner, image_tokens: int) -> str:
    """The ChatML text Qwen2.5-VL-Instruct expects: system instruction, then the image and the request as the user."""
    config = captioner.model.config
    start, pad, end = captioner.tokenizer.convert_ids_to_tokens(
        [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
    )
    return (
        f"<|im_start|>system\n{CAPTION_INSTRUCTION}<|im_end|>\n"
        f"<|im_start|>user\n{start}{pad * image_tokens}{end}{CAPTION_REQUEST}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


class _TokenProgress(BaseStreamer):
    """Advances a progress task by one per generated token (the first ``put`` is the prompt)."""

    def __init__(self, advance: Any) -> None:
        self._advance = advance
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._advance(int(value.numel()))

    def end(self) -> None:
        return None


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


@torch.no_grad()
def caption_image(
    captioner: Captioner,
    image: np.ndarray,
    *,
    seed: int,
    max_new_tokens: int,
    reporter: Reporter | None = None,
) -> str:
    """Caption an RGB uint8 image; the same seed gives the same caption even when the generation config samples."""
    model = captioner.model
    pixels = captioner.image_processor(
        images=[Image.fromarray(image)],
        size={"shortest_edge": captioner.min_pixels, "longest_edge": captioner.max_pixels},
        return_tensors="pt",
    )
    merge = int(captioner.image_processor.merge_size) ** 2
    image_tokens = int(pixels["image_grid_thw"][0].prod()) // merge
    text = captioner.tokenizer([chat_text(captioner, image_tokens)], return_tensors="pt")
    inputs = {
        "input_ids": text["input_ids"].to(model.device),
        "attention_mask": text["attention_mask"].to(model.device),
        "pixel_values": pixels["pixel_values"].to(model.device, model.dtype),
        "image_grid_thw": pixels["image_grid_thw"].to(model.device),
    }
    reporter = reporter or Reporter(quiet=True)
    with reporter.progress() as progress, torch.random.fork_rng(devices=_rng_devices(model.device)):
        task = progress.add_task("captioning", total=max_new_tokens, unit="tokens")
        torch.manual_seed(seed)
        with out_of_memory_as(
            f"GPU out of memory while captioning with {captioner.name}; free the GPU, use {option('device')} cpu, or pass {option('prompt')} TEXT"
        ):
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                streamer=_TokenProgress(lambda n: progress.advance(task, n)),
            )
        generated = out[0, inputs["input_ids"].shape[1] :]
        progress.update(task, total=len(generated), completed=len(generated))
    caption = prompt_line(captioner.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    if not clean_prompt(caption):
        raise InputError(f"{captioner.name} returned an empty caption (pass a caption with {option('prompt')} TEXT, or try another {option('seed')})")
    return caption
