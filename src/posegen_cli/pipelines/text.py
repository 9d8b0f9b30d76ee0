"""umT5 prompt embeddings as the release computes them (port.md §4.1, §3.5).

The cleaning, the 512-token length and the tokenizer call live in ``prompting/umt5.py``, shared with the subject
lookup. Two transformers defaults change the numbers and are overridden here: ``_keep_in_fp32_modules = ["wo"]`` would keep the
feed-forward output projection in float32 and silently promote the residual stream, and the SDPA attention rounds
differently from the release's eager einsum/softmax.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from posegen_cli.pipelines.offload import onload
from posegen_cli.prompting.umt5 import tokenize

DEFAULT_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
"""The Wan default negative prompt the release uses, verbatim (not the English translation in diffusers' docs)."""


def load_text_encoder(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> UMT5EncoderModel:
    """umT5 with eager attention and *every* weight in ``dtype``, including the ``wo`` projections transformers keeps in fp32."""
    model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return match_release_dtype(model, dtype).to(device).eval()


def match_release_dtype(model: UMT5EncoderModel, dtype: torch.dtype) -> UMT5EncoderModel:
    """Cast the modules transformers keeps in float32 (``wo``) to ``dtype``; the release's weights are bf16 throughout."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "wo":
            module.to(dtype)
    return model


@torch.no_grad()
def encode_text(tokenizer: PreTrainedTokenizerBase, text_encoder: UMT5EncoderModel, prompt: str) -> torch.Tensor:
    """Prompt embeddings [1, 512, d_model] in the encoder's dtype, with the rows after the last real token set to 0."""
    ids, mask = tokenize(tokenizer, prompt)
    device = onload(text_encoder)
    hidden = text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    seq_len = int(mask.gt(0).sum())
    hidden[:, seq_len:] = 0
    return hidden
