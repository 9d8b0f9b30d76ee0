"""Captioning with a tiny random Qwen2.5-VL built from a config: the real generation and file-writing path."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from posegen_cli.errors import InputError
from posegen_cli import prompting
from posegen_cli.prompting import PromptOptions, TextTokenizer, clean_prompt
from posegen_cli.prompting.caption import CAPTION_INSTRUCTION, CAPTION_REQUEST, Captioner, caption_image
from posegen_cli.testing.tokenizer import make_tiny_tokenizer
from posegen_cli.video import load_image


def run_prompt(image, out_dir=None, **kwargs):
    """``prompting.run_prompt`` with the :class:`PromptOptions` fields given as keywords beside its own."""
    fields = {f.name for f in dataclasses.fields(PromptOptions)}
    options = PromptOptions(**{k: v for k, v in kwargs.items() if k in fields})
    return prompting.run_prompt(image, out_dir, options, **{k: v for k, v in kwargs.items() if k not in fields})

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 48 * 28 * 28
NEW_TOKENS = 24


def byte_level_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE over printable ASCII and newline (GPT-2's byte alphabet: space is "Ġ", newline "Ċ")."""
    symbols = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    tokenizer = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tokenizer


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
            "fullatt_block_indexes": [1], "window_size": 56,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return Captioner(
        model=model, tokenizer=tokenizer, image_processor=Qwen2VLImageProcessorPil(), name="tiny-qwen2.5-vl",
        revision="random", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    )


def reference_generation(captioner: Captioner, image: np.ndarray, max_new_tokens: int) -> list[int]:
    """Greedy ids from inputs assembled by hand: ChatML pieces, one <|image_pad|> id per merged 28-pixel patch."""
    tok = captioner.tokenizer
    pixels = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=[Image.fromarray(image)], return_tensors="pt")
    grid = pixels["image_grid_thw"][0].tolist()
    h, w = image.shape[:2]
    assert grid[0] == 1 and grid[1] * 14 * grid[2] * 14 <= MAX_PIXELS
    assert abs(grid[1] / grid[2] - h / w) < 0.1  # aspect kept
    n_image = grid[0] * grid[1] * grid[2] // 4

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    special = tok.convert_tokens_to_ids
    ids = (
        [special("<|im_start|>")] + enc("system\n" + CAPTION_INSTRUCTION) + [special("<|im_end|>")] + enc("\n")
        + [special("<|im_start|>")] + enc("user\n") + [special("<|vision_start|>")] + [special("<|image_pad|>")] * n_image
        + [special("<|vision_end|>")] + enc(CAPTION_REQUEST) + [special("<|im_end|>")] + enc("\n")
        + [special("<|im_start|>")] + enc("assistant\n")
    )
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = captioner.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"], max_new_tokens=max_new_tokens, do_sample=False,
        )
    return out[0, len(ids):].tolist()


def test_caption_equals_hand_built_generation(captioner: Captioner, reference_image_path: Path) -> None:
    image = load_image(reference_image_path)
    expected_ids = reference_generation(captioner, image, NEW_TOKENS)
    assert 0 < len(expected_ids) <= NEW_TOKENS
    expected = " ".join(captioner.tokenizer.decode(expected_ids, skip_special_tokens=True).splitlines()).strip()
    caption = caption_image(captioner, image, seed=1, max_new_tokens=NEW_TOKENS)
    assert caption == expected
    assert "\n" not in caption and caption


def test_seed_makes_sampling_reproducible(captioner: Captioner, reference_image_path: Path) -> None:
    image = load_image(reference_image_path)
    config = captioner.model.generation_config
    saved = (config.do_sample, config.temperature, config.top_k, config.top_p)
    config.do_sample, config.temperature, config.top_k, config.top_p = True, 1.5, 0, 1.0
    try:
        torch.manual_seed(123)
        first = caption_image(captioner, image, seed=7, max_new_tokens=NEW_TOKENS)
        state = torch.get_rng_state()
        again = caption_image(captioner, image, seed=7, max_new_tokens=NEW_TOKENS)
        other = caption_image(captioner, image, seed=8, max_new_tokens=NEW_TOKENS)
        assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is left alone
    finally:
        config.do_sample, config.temperature, config.top_k, config.top_p = saved
    assert first == again
    assert first != other


def test_run_prompt_captions_once_then_uses_the_cache(
    captioner: Captioner, reference_image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = load_image(reference_image_path)
    caption = caption_image(captioner, image, seed=42, max_new_tokens=NEW_TOKENS)
    cleaned = clean_prompt(caption)
    word = regex.search(r"(?<![\w-])[^\W\d_]+(?![\w-])", cleaned)
    assert word is not None, cleaned
    tok = TextTokenizer(make_tiny_tokenizer(), "tiny-umt5", "rev0")

    result = run_prompt(
        reference_image_path, tmp_path / "a", subject=word.group(), seed=42, max_new_tokens=NEW_TOKENS,
        tokenizer=tok, captioner=captioner,
    )
    assert (result.prompt, result.cached, result.captioned) == (caption, False, True)
    record = json.loads(result.prompt_json.read_text(encoding="utf-8"))
    assert record["prompt"] == caption and record["encoder_text"] == cleaned
    assert record["encoder_text"][slice(*record["subject_span"])].lower() == word.group().lower()
    assert record["token_positions"] == result.token_positions and result.token_positions
    assert record["caption"] == {
        "model": "tiny-qwen2.5-vl", "revision": "random", "dtype": "torch.float32", "seed": 42,
        "max_new_tokens": NEW_TOKENS, "cached": False,
    }
    assert result.prompt_txt.read_text(encoding="utf-8") == caption + "\n"

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("captioned twice")

    monkeypatch.setattr(captioner.model, "generate", no_generation)
    again = run_prompt(
        reference_image_path, tmp_path / "b", subject=word.group(), seed=42, max_new_tokens=NEW_TOKENS,
        tokenizer=tok, captioner=captioner,
    )
    assert again.cached and again.prompt == caption and again.token_positions == result.token_positions
    assert json.loads(again.prompt_json.read_text(encoding="utf-8"))["caption"]["cached"] is True
    with pytest.raises(InputError, match=r"--subject 'zzqq' is not a whole word .*running again with --subject does not caption again"):
        run_prompt(
            reference_image_path, tmp_path / "d", subject="zzqq", seed=42, max_new_tokens=NEW_TOKENS, tokenizer=tok, captioner=captioner
        )
    assert not (tmp_path / "d").exists()
    with pytest.raises(AssertionError, match="captioned twice"):  # another seed, or no cache, runs the model
        run_prompt(
            reference_image_path, tmp_path / "c", subject="x", seed=43, max_new_tokens=NEW_TOKENS, tokenizer=tok, captioner=captioner
        )
    with pytest.raises(AssertionError, match="captioned twice"):
        run_prompt(
            reference_image_path, tmp_path / "c", subject="x", seed=42, max_new_tokens=NEW_TOKENS, use_cache=False,
            tokenizer=tok, captioner=captioner,
        )


def test_run_prompt_loads_both_models_from_a_models_dir(
    captioner: Captioner, reference_image_path: Path, tmp_path: Path
) -> None:
    """The registry path: <models-dir>/qwen2.5-vl-7b and <models-dir>/wan-i2v-720p/tokenizer, saved with save_pretrained."""
    models = tmp_path / "models"
    qwen = models / "qwen2.5-vl-7b"
    captioner.model.save_pretrained(str(qwen))
    captioner.tokenizer.save_pretrained(str(qwen))
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(str(qwen))
    wan = models / "wan-i2v-720p"
    make_tiny_tokenizer().save_pretrained(str(wan / "tokenizer"))
    (wan / "model_index.json").write_text("{}", encoding="utf-8")

    from posegen_cli.prompting.caption import load_captioner

    loaded = load_captioner(qwen, device=torch.device("cpu"), dtype=torch.float32, name="q", revision="r")
    image = load_image(reference_image_path)
    expected = caption_image(captioner, image, seed=3, max_new_tokens=NEW_TOKENS)
    loaded.min_pixels, loaded.max_pixels = MIN_PIXELS, MAX_PIXELS
    assert caption_image(loaded, image, seed=3, max_new_tokens=NEW_TOKENS) == expected

    # run_prompt loads with the release's image bounds (up to 1280 merged patches): the same path as the real model
    full = Captioner(
        model=captioner.model, tokenizer=captioner.tokenizer, image_processor=Qwen2VLImageProcessorPil(), name="q", revision="r"
    )
    expected_full = caption_image(full, image, seed=3, max_new_tokens=NEW_TOKENS)
    subject = regex.search(r"(?<![\w-])[^\W\d_]+(?![\w-])", clean_prompt(expected_full))
    assert subject is not None
    result = run_prompt(
        reference_image_path, tmp_path / "out", subject=subject.group(), seed=3, max_new_tokens=NEW_TOKENS,
        device="cpu", models_dir=models,
    )
    assert result.captioned and not result.cached and result.prompt == expected_full
    record = json.loads(result.prompt_json.read_text(encoding="utf-8"))
    assert record["caption"]["model"] == "qwen2.5-vl-7b" and record["caption"]["revision"].startswith("sha256:")
