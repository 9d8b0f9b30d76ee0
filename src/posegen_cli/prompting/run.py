"""``posegen prompt``: caption (or take) the prompt, find the subject's tokens, write prompt.txt and prompt.json."""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posegen_cli.cache import cache_dir, cache_key, file_digest
from posegen_cli.device import resolve_device, resolve_dtype
from posegen_cli.errors import InputError, option, require_file
from posegen_cli.fsutil import atomic_path
from posegen_cli.prompting.caption import Captioner, caption_image, caption_settings, load_captioner
from posegen_cli.prompting.clean import prompt_line
from posegen_cli.prompting.tokens import SubjectTokens, locate_subject, release_choice
from posegen_cli.prompting.umt5 import clean_prompt, load_tokenizer
from posegen_cli.report import Reporter
from posegen_cli.video.image import ReferenceImage

CAPTION_MODEL = "qwen2.5-vl-7b"
TEXT_MODEL = "wan-i2v-720p"
DEFAULT_MAX_NEW_TOKENS = 512

_IDENTITY_SUFFIXES = (".json", ".txt", ".model", ".jinja")
"""Small files that identify a model folder outside the Hugging Face cache (weights are too big to hash each run)."""


@dataclass
class TextTokenizer:
    """The text encoder's tokenizer and what identifies it in prompt.json."""

    tokenizer: PreTrainedTokenizerBase
    name: str
    revision: str


@dataclass(frozen=True)
class PromptOptions:
    """What ``run_prompt`` is asked for: a given ``prompt`` (else a caption is generated), the ``subject`` word (else
    picked from the prompt), the captioner's ``seed``, ``max_new_tokens``, ``device`` and ``dtype`` (names or torch
    objects; ``auto`` is bfloat16 on a GPU, float32 on the CPU), where the models are, and whether to reuse a cached
    caption."""

    prompt: str | None = None
    subject: str | None = None
    seed: int = 42
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    models_dir: str | Path | None = None
    use_cache: bool = True


@dataclass
class PromptResult:
    """``prompt`` is the one-line text to give the text encoder (which cleans it); positions index its 512 tokens."""

    prompt: str
    subject: str
    token_positions: list[int]
    prompt_txt: Path
    prompt_json: Path
    cached: bool
    captioned: bool

    def summary(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "token_positions": self.token_positions,
            "prompt_txt": str(self.prompt_txt),
            "prompt_json": str(self.prompt_json),
            "captioned": self.captioned,
            "cached": self.cached,
        }


def folder_revision(path: str | Path) -> str:
    """The Hub commit of a Hugging Face cache snapshot, else a digest of the folder's small identifying files."""
    path = Path(path).resolve()
    parts = path.parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return "sha256:" + h.hexdigest()[:16]


def load_text_tokenizer(models_dir: str | Path | None = None) -> TextTokenizer:
    """The umT5 tokenizer in the Wan I2V repository's ``tokenizer/`` folder."""
    from posegen_cli.hub import MODELS, model_path

    folder = model_path(TEXT_MODEL, models_dir, parts=("tokenizer/*",)) / "tokenizer"
    return TextTokenizer(load_tokenizer(folder), f"{MODELS[TEXT_MODEL].repo_id}/tokenizer", folder_revision(folder))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _caption(
    image: ReferenceImage, options: PromptOptions, captioner: Captioner | None, reporter: Reporter
) -> tuple[str, bool, dict[str, Any]]:
    """The caption of ``image`` (from the cache when the same image was captioned with the same settings)."""
    seed, max_new_tokens = options.seed, options.max_new_tokens
    if captioner is not None:
        settings = captioner.cache_settings()
        model_dir = None
    else:
        from posegen_cli.hub import model_path

        dev = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, dev)
        model_dir = model_path(CAPTION_MODEL, options.models_dir)
        settings = caption_settings(CAPTION_MODEL, folder_revision(model_dir), dtype, dev)
    settings = {**settings, "seed": seed, "max_new_tokens": max_new_tokens}
    cached_file = cache_dir("caption", cache_key([], {**settings, "image": image.digest})) / "caption.txt"
    if options.use_cache and cached_file.is_file():
        reporter.info(f"caption of {image.path.name} from the cache ({cached_file.parent})")
        return cached_file.read_text(encoding="utf-8"), True, settings

    owned = captioner is None
    if owned:
        reporter.info(f"loading {CAPTION_MODEL} on {dev} ({str(dtype).removeprefix('torch.')})")
        captioner = load_captioner(model_dir, device=dev, dtype=dtype, name=CAPTION_MODEL, revision=settings["revision"])
    try:
        caption = caption_image(captioner, image.pixels, seed=seed, max_new_tokens=max_new_tokens, reporter=reporter)
    finally:
        if owned:
            del captioner
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    _write_text(cached_file, caption)
    return caption, False, settings


def _prompt_record(text: str, located: SubjectTokens, tok: TextTokenizer, caption: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "prompt": text,
        "encoder_text": clean_prompt(text),
        "subject": located.word,
        "subject_span": [located.start, located.end],
        "token_positions": located.positions,
        "input_ids": located.input_ids,
        "tokenizer": {"name": tok.name, "revision": tok.revision},
        "caption": caption,
    }


def run_prompt(
    image: str | Path | ReferenceImage,
    out_dir: str | Path | None = None,
    options: PromptOptions | None = None,
    *,
    reporter: Reporter | None = None,
    tokenizer: TextTokenizer | None = None,
    captioner: Captioner | None = None,
) -> PromptResult:
    """Caption ``image`` (unless ``options.prompt`` is given), locate the subject's tokens and write prompt.txt / prompt.json.

    ``image`` is a path or a :class:`ReferenceImage` the caller already decoded and hashed. ``out_dir`` defaults to
    ``<image stem>_prompt`` beside the image. ``tokenizer`` and ``captioner`` replace the models found through the
    registry (tests, or a caller that already holds them). Raises InputError for a missing or unreadable image, an
    empty prompt or a prompt without a subject word; MissingModelError when a model is not downloaded.
    """
    reporter = reporter or Reporter(quiet=True)
    options = options or PromptOptions()
    prompt, subject = options.prompt, options.subject
    if prompt is not None and not clean_prompt(prompt):
        raise InputError(
            f"{option('prompt')} is empty (pass a caption of the reference, or leave {option('prompt')} out to generate one)"
        )
    path = image.path if isinstance(image, ReferenceImage) else require_file(image, "reference image")
    reference = ReferenceImage.load(image) if prompt is None else None  # a broken image is reported before any model loads
    out = Path(out_dir) if out_dir is not None else path.parent / f"{path.stem}_prompt"
    tok = tokenizer or load_text_tokenizer(options.models_dir)

    caption_meta: dict[str, Any] | None = None
    cached = False
    if prompt is None:
        text, cached, settings = _caption(reference, options, captioner, reporter)
        caption_meta = {**{k: settings[k] for k in ("model", "revision", "dtype", "seed", "max_new_tokens")}, "cached": cached}
    else:
        text = prompt_line(prompt)
        if text != prompt.strip():
            reporter.warn("the prompt has several lines; like the release, only its longest line is used")

    try:
        located = locate_subject(tok.tokenizer, text, subject)
    except InputError as exc:
        if prompt is not None:
            raise
        raise InputError(f"{exc.message} (the caption is cached: running again with {option('subject')} does not caption again)") from None
    reporter.info(f"subject {located.word!r} at token positions {located.positions}")
    release = release_choice(tok.tokenizer, located.input_ids, text)
    if release is not None and (release[0], [release[1]]) != (located.word, located.positions):
        word, position = release
        ours = f"posegen reads {located.positions} for {located.word!r} (the first whole word, any case)"
        if position is None:
            reporter.warn(
                f"the release would stop on this prompt (it looks for {word!r}, a case-sensitive substring, "
                f"and its token is not among the ids); {ours}"
            )
        else:
            reporter.warn(
                f"the release would read token {position} for {word!r} (the first of woman, girl, man, boy "
                f"found as a case-sensitive substring, at its token's first occurrence); {ours}"
            )

    txt_path, json_path = out / "prompt.txt", out / "prompt.json"
    _write_text(txt_path, text + "\n")
    record = _prompt_record(text, located, tok, caption_meta)
    _write_text(json_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return PromptResult(
        prompt=text,
        subject=located.word,
        token_positions=located.positions,
        prompt_txt=txt_path,
        prompt_json=json_path,
        cached=cached,
        captioned=prompt is None,
    )
