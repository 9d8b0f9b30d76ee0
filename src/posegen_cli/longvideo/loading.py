"""Loading a ``PoseGenPipeline`` from the model registry: which hub folders hold which component, and how to place them.

The pipeline itself knows no hub names; this is the one place that maps the Wan I2V download and the PoseGen release
folders onto its components.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posegen_cli.choices import OFFLOAD_MODES
from posegen_cli.device import resolve_device, resolve_dtype
from posegen_cli.errors import MissingModelError, OptionError, option, out_of_memory_as
from posegen_cli.hub import model_path
from posegen_cli.models import PoseGenVariants
from posegen_cli.models.acceleration import compile_blocks, quantization_config, resolve_attention, set_attention
from posegen_cli.models.distill import DistillChoice, get_distill_preset, read_distill_lora
from posegen_cli.pipelines.image import load_image_encoder
from posegen_cli.pipelines.pipeline_posegen import PoseGenPipeline, oom_message
from posegen_cli.pipelines.scheduling import make_scheduler
from posegen_cli.pipelines.text import load_text_encoder
from posegen_cli.pipelines.vae import load_vae
from posegen_cli.prompting.umt5 import load_tokenizer
from posegen_cli.report import Reporter

BASE_FOLDER = "720p-81f-base"
TRANSITION_FOLDER = "720p-81f-cond"
"""The release's two DiT checkpoints inside the ``posegen`` download."""


@dataclass(frozen=True)
class DiTWeights:
    """Which weights the DiT is loaded with.

    ``checkpoints="converted"`` (default) converts each release folder once into the posegen cache (merged
    safetensors keyed by the source files, ``models/checkpoint_cache.py``) and loads that straight onto the device;
    "release" (or too little disk for the copies) reads and merges the release shards every time. ``distill`` names
    a :data:`~posegen_cli.models.distill.DISTILL_PRESETS` LoRA (registry model of that preset) and its weight; it is
    loaded as one more peft adapter on top of whichever form loaded, before quantisation and offloading hooks, so the
    converted cache never depends on it and variant switches copy only PoseGen tensors (no CPU merge).
    """

    checkpoints: str = "converted"
    distill: DistillChoice | None = None


def load_pipeline(
    models_dir: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    offload: str = "none",
    load_encoders: bool = True,
    weights: DiTWeights | None = None,
    attention: str = "auto",
    compile: bool = False,
    quantize: str = "none",
    reporter: Reporter | None = None,
) -> PoseGenPipeline:
    """Load every component once from the model registry (a models folder, or the Hugging Face cache when None).

    The DiT is read from the release folders ``posegen/720p-81f-base`` and ``720p-81f-cond`` into one model holding
    both variants (base active). ``load_encoders=False`` skips umT5 and CLIP for workers that are handed embeddings
    (:func:`load_encoder_pipeline` is the opposite: encoders without the DiT, for a driver that only encodes).
    ``offload``: "model" moves whole components to the GPU in turn, "group" streams every resident component from
    pinned host memory (the DiT block by block, the encoders and the VAE layer by layer); both need CUDA.
    ``weights`` (:class:`DiTWeights`; None: its defaults) says how the PoseGen checkpoints are read and which
    distillation LoRA joins them.
    ``attention``, ``compile`` and ``quantize`` are the DiT speed-ups of :mod:`posegen_cli.models.acceleration`,
    checked before anything loads and applied in the order quantize, attention, compile; ``pipe.attention`` tells
    which kernel was set.

    Raises:
        OptionError: an unknown ``offload``, or offloading without CUDA.
        InputError: an attention kernel or quantisation this device cannot run.
        MissingModelError: a component folder (or the distillation LoRA) is missing.
        ResourceError: the GPU ran out of memory while loading.
    """
    return _load_components(
        models_dir, device, dtype, offload, load_encoders=load_encoders, weights=weights or DiTWeights(),
        attention=attention, compile=compile, quantize=quantize, reporter=reporter,
    )  # fmt: skip


def load_encoder_pipeline(
    models_dir: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    offload: str = "none",
    reporter: Reporter | None = None,
) -> PoseGenPipeline:
    """The text and image encoders and the VAE without the DiT: what a Ray driver needs to compute a job's embeddings.

    The pipeline can encode (``encode_prompt``, ``encode_reference``), not generate; ``model_dtype`` is the VAE's.
    Raises what :func:`load_pipeline` raises.
    """
    return _load_components(
        models_dir, device, dtype, offload, load_encoders=True, weights=None,
        attention="auto", compile=False, quantize="none", reporter=reporter,
    )  # fmt: skip


def _load_components(
    models_dir: str | Path | None,
    device: str | torch.device,
    dtype: str | torch.dtype,
    offload: str,
    *,
    load_encoders: bool,
    weights: DiTWeights | None,
    attention: str,
    compile: bool,
    quantize: str,
    reporter: Reporter | None,
) -> PoseGenPipeline:
    """:func:`load_pipeline` with the DiT optional (``weights`` None: no DiT)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if offload not in OFFLOAD_MODES:
        raise OptionError("offload", offload, OFFLOAD_MODES)
    if offload != "none" and dev.type != "cuda":
        raise OptionError(
            "offload", offload, problem=f"{offload} needs a CUDA device (got {dev}); use {option('offload')} none on the CPU"
        )
    wan = model_path("wan-i2v-720p", models_dir)
    posegen = model_path("posegen", models_dir)
    lora = None
    if weights is not None and weights.distill is not None:
        preset = get_distill_preset(weights.distill.name)
        lora = read_distill_lora(model_path(preset.model, models_dir) / preset.weight_name)
    needed = ["vae"] + (["tokenizer", "text_encoder", "image_encoder"] if load_encoders else [])
    for sub in needed:
        if not (wan / sub).is_dir():
            raise MissingModelError(f"{wan / sub} is missing (re-run `posegen download wan-i2v-720p`)")
    for sub in (BASE_FOLDER, TRANSITION_FOLDER) if weights is not None else ():
        if not (posegen / sub).is_dir():
            raise MissingModelError(f"{posegen / sub} is missing (re-run `posegen download posegen`)")
    attention_choice = resolve_attention(attention, dev, dt)
    quantization = quantization_config(quantize, dev)
    place = "cpu" if offload != "none" else dev
    if reporter is not None:
        reporter.info(f"loading models from {wan.parent if models_dir else 'the Hugging Face cache'} ({dt}, {dev})")
    with out_of_memory_as(oom_message("loading the models")):
        variants = None
        if weights is not None:
            variants = _load_variants(posegen, dt, place, weights.checkpoints, reporter)
            if lora is not None and weights.distill is not None:
                # on top of whichever form loaded: the converted cache holds the PoseGen checkpoints alone
                variants.load_distill(lora, weights.distill.weight)
        pipe = PoseGenPipeline(
            tokenizer=load_tokenizer(wan / "tokenizer") if load_encoders else None,
            text_encoder=load_text_encoder(wan / "text_encoder", dt, place) if load_encoders else None,
            image_encoder=load_image_encoder(wan / "image_encoder", dt, place) if load_encoders else None,
            vae=load_vae(wan / "vae", dt, place),
            transformer=variants.model if variants is not None else None,
            scheduler=make_scheduler(),
        )
        pipe.variants = variants
        if quantization is not None and variants is not None:
            variants.quantize(quantization)
        if offload == "model":
            pipe.enable_model_cpu_offload(device=dev)
        elif offload == "group":
            pipe.enable_group_offload_all(dev)
        pipe.attention = None
        if variants is not None:
            set_attention(pipe.transformer, attention_choice)
            pipe.attention = attention_choice
        if compile and variants is not None:
            # group offloading's hooks run eagerly inside each block (graph breaks), so only then allow breaks
            compile_blocks(pipe.transformer, fullgraph=offload == "none")
    return pipe


def _load_variants(
    posegen: Path, dtype: torch.dtype, device: str | torch.device, checkpoints: str, reporter: Reporter | None
) -> PoseGenVariants:
    """Both DiT variants, from the converted cache when asked and when the disk has room for it."""
    from posegen_cli.models.checkpoint_cache import conversion_fits, converted_checkpoint

    folders = (posegen / BASE_FOLDER, posegen / TRANSITION_FOLDER)
    if checkpoints == "converted" and all(conversion_fits(folder) for folder in folders):
        base, cond = (converted_checkpoint(folder, dtype, reporter=reporter) for folder in folders)
        return PoseGenVariants.from_converted(base, cond, dtype=dtype, device=device, reporter=reporter)
    if checkpoints == "converted" and reporter is not None:
        reporter.warn("too little disk in the posegen cache to keep converted checkpoints; merging the release shards in memory")
    return PoseGenVariants.from_release(*folders, dtype=dtype, device=device, reporter=reporter)
