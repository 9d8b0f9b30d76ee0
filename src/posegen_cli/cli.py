"""The `posegen` command line: parse options, call the stage, report. No stage logic lives here."""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from posegen_cli import __version__, choices
from posegen_cli.errors import MissingModelsError, PosegenError, ResourceError, Spelling, command_line_spelling
from posegen_cli.report import Reporter

app = typer.Typer(
    name="posegen",
    help="Animate one photo of a person with the motion of a driving video (PoseGen on diffusers).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A Typer choice type whose members are the library's own choice tuple (member names are Python-safe)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


Backend = _choice_enum("Backend", choices.BACKENDS)
HandNormals = _choice_enum("HandNormals", choices.HAND_NORMAL_SOURCES)
AlignMode = _choice_enum("AlignMode", choices.ALIGN_MODES)
Offload = _choice_enum("Offload", choices.OFFLOAD_MODES)
KeypointFormat = _choice_enum("KeypointFormat", choices.OUTPUT_FORMATS)
ShotType = _choice_enum("ShotType", ("auto", *choices.SHOT_TYPES))
CameraMove = _choice_enum("CameraMove", choices.CAMERA_MOTIONS)
KVPlacement = _choice_enum("KVPlacement", choices.KV_PLACEMENTS)
VaeTiling = _choice_enum("VaeTiling", choices.VAE_TILINGS)
AttentionKernel = _choice_enum("AttentionKernel", choices.ATTENTION_CHOICES)
Quantize = _choice_enum("Quantize", choices.QUANTIZE_CHOICES)

Speed = _choice_enum("Speed", choices.SPEEDS)
Distill = _choice_enum("Distill", choices.DISTILLS)
CacheMode = _choice_enum("CacheMode", choices.CACHES)


SPEED_HELP = "Speed preset; explicit flags override its parts. " + " ".join(
    f"[bold]{p.name}[/bold]: {p.speedup}; risk: {p.quality_risk}." for p in choices.SPEED_PRESETS.values()
)


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


def flag(*names: str, help: str) -> Any:
    """A boolean switch, shown in ``--help`` as a bare flag (no ``<bool>`` value placeholder)."""
    return typer.Option(*names, metavar="", help=help)


Quiet = Annotated[bool, flag("--quiet", "-q", help="Print nothing but warnings and errors.")]
Json = Annotated[bool, flag("--json", help="Print a machine-readable summary on stdout (human output goes to stderr).")]
Debug = Annotated[bool, flag("--debug", help="Show Python tracebacks for errors.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32.")]
Background = Annotated[str, typer.Option("--background", help="Colour under a transparent reference: a name (white, black, grey...), #RRGGBB or R,G,B.")]
Person = Annotated[
    str | None,
    typer.Option("--person", help="Driving person to follow: N (1 = leftmost in the first frame with anyone) or a pixel position X,Y. Default: the largest."),
]
NoPersonCheck = Annotated[bool, flag("--no-person-check", help="Go on when no person is found in the reference (centre crop, no alignment).")]
ModelsDir = Annotated[
    Path | None,
    typer.Option("--models-dir", envvar="POSEGEN_MODELS_DIR", help="Folder with local model copies (<dir>/<model name>/) instead of the Hugging Face cache."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"posegen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Show the version and exit.")] = False,
) -> None:
    """Animate one photo of a person with the motion of a driving video (PoseGen on diffusers)."""


def download_command(names: list[str], models_dir: Path | None) -> str:
    """The one ``posegen download`` command line that fetches ``names`` (into ``models_dir`` when given)."""
    return " ".join(["posegen download", *names, *(["--models-dir", str(models_dir)] if models_dir is not None else [])])


def _phrase(exc: PosegenError, spell: Spelling) -> str:
    """An error's message in the command's words, with the command that fixes it where the error carries the facts for one."""
    if isinstance(exc, MissingModelsError):
        fetch = download_command(exc.names, exc.models_dir)
        return f"{exc.phrase(spell)} (fetch them all with `{fetch}`{' after unsetting HF_HUB_OFFLINE' if exc.offline else ''})"
    return exc.phrase(spell)


INTERRUPTED = "interrupted (nothing was written; run the same command again to start over)"


@contextlib.contextmanager
def _errors(reporter: Reporter, debug: bool, interrupted: str) -> Iterator[None]:
    """Expected failures become one line and an exit code; tracebacks only with --debug.

    The library's messages name settings, not flags; they are spelled here with the command's own flag names.
    """
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except PosegenError as exc:
        if debug:
            raise
        reporter.console.print(f"[red]error:[/red] {escape(_phrase(exc, reporter.spell))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        reporter.console.print(f"[red]interrupted[/red]{escape(interrupted.removeprefix('interrupted'))}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":
            message = str(ResourceError("the GPU ran out of memory (try --offload model, or --offload group on GPUs under 40 GB; --preview for a quick check)"))
            reporter.console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(ResourceError.exit_code) from None
        reporter.console.print(
            f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')} (run again with --debug for the traceback)", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def _flags(table: dict[str, str]) -> Spelling:
    """How one command spells the library's settings: ``table`` for the flags named otherwise than the setting."""
    return lambda name: command_line_spelling(name, table)


ANIMATE_FLAGS = {"backend": "--pose-backend", "audio_file": "--audio"}
"""``animate`` flags whose names differ from the library setting they carry."""


def _run(
    quiet: bool, json_output: bool, debug: bool, work: Callable[[Reporter], Any], flags: dict[str, str] | None = None,
    interrupted: str = INTERRUPTED,
) -> Any:
    reporter = Reporter(quiet=quiet, json_output=json_output, spell=_flags(flags or {}))
    with _errors(reporter, debug, interrupted):
        return work(reporter)


@app.command()
def animate(
    reference: Annotated[Path, typer.Argument(help="Photo of the person to animate (PNG/JPEG).", show_default=False)],
    driving: Annotated[Path | None, typer.Argument(help="Video whose motion the person performs (leave out with --pose-video).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output video (H.264 at the driving video's fps, with its audio).")] = Path("posegen.mp4"),
    pose_video: Annotated[Path | None, typer.Option("--pose-video", help="Your own pose condition video (any skeleton, any tool), used as is: no extraction, no alignment; sets length, fps and audio.", show_default=False)] = None,
    hand_video: Annotated[Path | None, typer.Option("--hand-video", help="Hand condition video matching --pose-video (same length, size, fps); default: black hands.", show_default=False)] = None,
    audio_file: Annotated[Path | None, typer.Option("--audio", help="Take the output's audio from this file instead of the driving/pose video.", show_default=False)] = None,
    camera: Annotated[CameraMove | None, typer.Option("--camera", help="EXPERIMENTAL camera motion through the negative guidance branch (PoseAnything, CVPR 2026); unverified with the real weights; turns K/V sharing off; writes <output>.camera.mp4.", show_default=False)] = None,
    camera_speed: Annotated[float, typer.Option("--camera-speed", help="Pixels per frame at 720x1280 for pans, percent per second for zooms.")] = 4.0,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Caption of the reference; skips automatic captioning.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Subject word of the caption (woman, man, ...) used for background K/V sharing.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed, the same for every segment as in the release.")] = 42,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps per segment (default: 25, the release's; 4 with --distill).", show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Classifier-free guidance scale (default: 5, the release's; 1 with --distill: one pass per step).", show_default=False)] = None,
    speed: Annotated[Speed, typer.Option("--speed", help=SPEED_HELP)] = Speed.exact,
    distill: Annotated[Distill | None, typer.Option("--distill", help="Step-distillation LoRA beside PoseGen's: lightx2v = LightX2V's 4-step Wan2.1-I2V LoRA (its schedule, guidance 1); none turns turbo's off.", show_default=False)] = None,
    distill_weight: Annotated[float, typer.Option("--distill-weight", min=0.0, help="Strength of the distillation LoRA (1 is the authors').")] = 1.0,
    cache: Annotated[CacheMode | None, typer.Option("--cache", help="Reuse DiT block residuals between steps: fbc (First Block Cache) or magcache (published Wan2.1-I2V-720P ratios); first, last and K/V-sharing steps always run.", show_default=False)] = None,
    cache_threshold: Annotated[float | None, typer.Option("--cache-threshold", min=0.0, help="Cache threshold: higher skips more (default: fbc 0.05, magcache 0.12; 0 never skips).", show_default=False)] = None,
    resolution: Annotated[str, typer.Option("--resolution", help="Output size WxH, multiples of 16 (the model was trained at 720x1280).")] = "720x1280",
    shot: Annotated[ShotType, typer.Option("--shot", help="K/V-sharing preset; auto picks it from the subject's size in the reference.")] = ShotType.auto,
    kv_steps: Annotated[str | None, typer.Option("--kv-steps", help="Override the preset's shared steps, e.g. '0-2' (start-end, end exclusive).")] = None,
    kv_blocks: Annotated[str | None, typer.Option("--kv-blocks", help="Override the preset's shared blocks, e.g. '34-40'.")] = None,
    align: Annotated[AlignMode, typer.Option("--align", help="Move the driving skeleton onto the reference person: scale+offset (auto), also limb lengths (limbs), or not at all.")] = AlignMode.auto,
    pose_backend: Annotated[Backend, typer.Option("--pose-backend", help="Pose extractor: sapiens (the paper's, GPU), mediapipe (CPU, offline), auto.")] = Backend.auto,
    vae_tiling: Annotated[VaeTiling, typer.Option("--vae-tiling", help="VAE tiles: the release's (exact parity) or untiled (whole frames: more GPU memory, no seams, slightly different pixels).")] = VaeTiling.release,
    kv_placement: Annotated[KVPlacement, typer.Option("--kv-placement", help="Where the anchor's background K/V live: auto picks from free GPU, host and disk; gpu, host, disk, or recompute (nothing stored, one extra forward per shared step).")] = KVPlacement.auto,
    person: Person = None,
    background: Background = "white",
    no_person_check: NoPersonCheck = False,
    offload: Annotated[Offload, typer.Option("--offload", help="Keep models on the CPU until needed (model) or stream blocks (group) to fit smaller GPUs.")] = Offload.none,
    preview: Annotated[bool, flag("--preview", help="Low resolution and few steps, to check a job fast.")] = False,
    no_audio: Annotated[bool, flag("--no-audio", help="Do not copy the driving video's audio.")] = False,
    crf: Annotated[int, typer.Option("--crf", min=0, max=51, help="H.264 quality (lower is better; 5 is the release's quality 9, 18 is visually lossless).")] = 5,
    compat_mp4: Annotated[bool, flag("--compat-mp4", help="Pass every segment through the release's CRF-5 mp4 round trip before transitions and the merge use it (closest to the release's output).")] = False,
    anchor: Annotated[int, typer.Option("--anchor", min=0, help="Segment whose background the other base segments copy (even: 0, 2, 4, ...); pick another if it has camera motion.")] = 0,
    attention: Annotated[AttentionKernel | None, typer.Option("--attention", help="Attention kernel (default: the --speed preset's, else auto): auto (fastest exact one present), native (PyTorch SDPA), cudnn, flash (FlashAttention-2), flash3 (FlashAttention-3, Hopper), sage (SageAttention: approximate, faster).", show_default=False)] = None,
    compile_blocks: Annotated[bool, flag("--compile", help="Compile the transformer blocks with torch.compile (a one-off compile per job, then faster passes).")] = False,
    quantize: Annotated[Quantize | None, typer.Option("--quantize", help="torchao weights for the transformer's linear layers (default: the --speed preset's, else none): fp8 (FP8 GPUs: Ada, Hopper; faster, half the memory), int8 (weight-only: half the memory), none.", show_default=False)] = None,
    dry_run: Annotated[bool, flag("--dry-run", help="Load no model: print the segment plan, transformer passes, FLOPs, estimated GPU memory and time.")] = False,
    gpu: Annotated[str | None, typer.Option("--gpu", help="With --dry-run: estimate for this GPU (H200, H100, A100-80GB, L40S, 'RTX 4090') instead of the one present.")] = None,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Where finished segments are kept for resuming (default: the posegen cache).")] = None,
    keep_intermediates: Annotated[bool, flag("--keep-intermediates", help="Keep the segment files and conditioning videos after success.")] = False,
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="Generate segments in parallel on this many GPUs (a local Ray runtime; with --device cpu, that many one-thread CPU workers). With --ray-address: at most this many of the cluster's GPUs.")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Run the segments on a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (needs posegen[ray]; --work-dir on storage every node sees).")] = None,
    models_dir: ModelsDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Generate the whole video: pose, caption, anchor → base → transition segments, cross-fade merge, audio.

    Instead of a driving video, --pose-video (and --hand-video) gives your own condition videos, used as they are.
    Running the same command again after a crash or Ctrl-C continues from the finished segments.

    --camera is EXPERIMENTAL and unverified with the real weights: PoseAnything's decoupled guidance (CVPR 2026),
    ε = ε(∅s, zc) + s·(ε(zs, ∅c) − ε(∅s, zc)): the subject's pose in the positive branch, a moving camera pattern
    with no pose in the negative one (docs/conditioning.md).
    """

    def work(reporter: Reporter) -> None:
        from posegen_cli.cache import cache_root
        from posegen_cli.preflight import check_animate_files

        if (driving is None) != (pose_video is None):  # neither or both: the library says which to give
            motion, what = (driving, "driving video") if driving is not None else (pose_video, "pose video")
            check_animate_files(reference, motion, output, work_dir if work_dir is not None else cache_root(), what)
        _quiet_libraries()
        from posegen_cli.longvideo import AnimateOptions
        from posegen_cli.longvideo import animate as run_animate

        options = AnimateOptions(
            prompt=prompt, subject=subject, seed=seed, steps=steps, guidance=guidance, resolution=resolution,
            speed=speed.value, distill=_value(distill), distill_weight=distill_weight, cache=_value(cache),
            cache_threshold=cache_threshold, attention=_value(attention), quantize=_value(quantize),
            shot=shot.value, kv_steps=kv_steps, kv_blocks=kv_blocks, align=align.value, pose_backend=pose_backend.value,
            offload=offload.value, kv_placement=kv_placement.value, vae_tiling=vae_tiling.value, preview=preview,
            audio=not no_audio, crf=crf, compat_mp4=compat_mp4, anchor=anchor,
            work_dir=work_dir, pose_video=pose_video, hand_video=hand_video, audio_file=audio_file,
            camera=None if camera is None else camera.value, camera_speed=camera_speed,
            person=person, background=background, person_check=not no_person_check,
            compile=compile_blocks, gpu=gpu, gpus=gpus, ray_address=ray_address,
            keep_intermediates=keep_intermediates, models_dir=models_dir, device=device, dtype=dtype,
        )
        if dry_run:
            from posegen_cli.longvideo import plan_animate

            plan = plan_animate(driving, options=options, reporter=reporter)
            reporter.summary(plan.as_dict() if json_output else plan_summary(plan), title="Plan (nothing was loaded or run)")
            return
        result = run_animate(reference, driving, output, options=options, reporter=reporter)
        reporter.summary(result.summary(), title="Done")

    _run(quiet, json_output, debug, work, ANIMATE_FLAGS, interrupted="interrupted (finished segments are kept; run the same command again to continue from them)")


def plan_summary(plan: Any) -> dict[str, Any]:
    """A ``JobPlan`` for people: one line per segment, rounded units."""

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "n/a"
        return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"

    segments = [
        f"{seg.index} {seg.kind} {seg.start}-{seg.stop - 1}: {seg.passes} passes, {seg.flops / 1e15:.0f} PF, "
        f"~{duration(seg.seconds)}, ~{seg.peak_gib:.0f} GiB"
        for seg in plan.segments
    ]
    kv = plan.kv
    return {
        "gpu": f"{plan.gpu} ({plan.gpu_source})" if plan.gpu else "none",
        "settings": plan.settings,
        "segments": segments,
        "transformer passes": plan.passes,
        "per pass": f"{plan.flops_per_pass / 1e15:.2f} PFLOP, ~{duration(plan.seconds_per_pass)}",
        "job": f"{plan.flops / 1e15:.1f} PFLOP, ~{duration(plan.seconds)}",
        "K/V cache": kv_summary(kv),
        "memory (GiB)": plan.memory_gib,
        "peak GPU memory": f"~{plan.peak_gib:.1f} GiB",
        "notes": plan.notes,
    }


def kv_summary(kv: dict[str, Any]) -> str:
    """The planned K/V placement in one line: where it goes and what it costs, or why the run would refuse."""
    ranges = f"steps {kv['steps'][0]}-{kv['steps'][1]}, blocks {kv['blocks'][0]}-{kv['blocks'][1]}"
    if kv["placement"] == "refused":
        return f"fits nowhere: {kv['refused']}"
    if kv["placement"] == "none":
        return "none (no base segment besides the anchor)"
    return f"{ranges}, {kv['gib']} GiB: {kv['describe']}"


@app.command("extract-pose")
def extract_pose(
    video: Annotated[Path, typer.Argument(help="Driving video.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: <video name>_pose next to the video).")] = None,
    backend: Annotated[Backend, typer.Option("--backend", help="sapiens (the paper's extractor, GPU), mediapipe (CPU, offline), auto.")] = Backend.auto,
    hand_normals: Annotated[HandNormals, typer.Option("--hand-normals", help="Hand-normal video from Sapiens normals, or none: a black video (in distribution: the model saw 10% black hands). auto: sapiens with the sapiens backend.")] = HandNormals.auto,
    track: Annotated[bool, flag("--track/--no-track", help="Follow one person across frames (box overlap); --no-track takes the top-scoring person in each frame, as the release does.")] = True,
    person: Person = None,
    lossless: Annotated[bool, flag("--lossless", help="Write pose.mp4/hand.mp4 losslessly (bit-exact colours).")] = False,
    fmt: Annotated[KeypointFormat, typer.Option("--format", help="Keypoints as keypoints.npz only, or also one OpenPose JSON per frame in openpose/.")] = KeypointFormat.npz,
    body_threshold: Annotated[float, typer.Option("--body-threshold", help="Body keypoint score needed to draw it (the release: 0.3, calibrated for Sapiens).")] = 0.3,
    hand_threshold: Annotated[float, typer.Option("--hand-threshold", help="Hand keypoint score needed to draw it (the release: 0.7).")] = 0.7,
    model_size: Annotated[str, typer.Option("--model-size", help="Sapiens pose model: 0.3b, 0.6b, 1b or 2b (the release's).")] = "2b",
    seg_size: Annotated[str, typer.Option("--seg-size", help="Sapiens segmentation model: 0.6b or 1b (the release's).")] = "1b",
    normal_size: Annotated[str, typer.Option("--normal-size", help="Sapiens normal model: 0.3b, 0.6b, 1b or 2b (the release's).")] = "2b",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Frames per Sapiens batch on the GPU.")] = 8,
    from_keypoints: Annotated[Path | None, typer.Option("--from-keypoints", help="Render from a keypoints.npz or OpenPose JSON folder instead of detecting.")] = None,
    align_to: Annotated[Path | None, typer.Option("--align-to", help="Reference photo: retarget the skeleton onto this person and frame it at 720x1280.")] = None,
    align: Annotated[AlignMode, typer.Option("--align", help="With --align-to: scale+offset (auto), also limb lengths (limbs), or none.")] = AlignMode.auto,
    background: Background = "white",
    no_person_check: NoPersonCheck = False,
    no_cache: Annotated[bool, flag("--no-cache", help="Extract again even if this video was extracted with the same settings.")] = False,
    models_dir: ModelsDir = None,
    device: Device = "auto",
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Skeleton video, hand-normal video, keypoints file and an overlay preview of a driving video."""

    def work(reporter: Reporter) -> None:
        from posegen_cli.preflight import check_extract_pose_files

        check_extract_pose_files(video, out_dir, align_to)
        from posegen_cli.pose.extract import extract_pose as run_extract
        from posegen_cli.pose.settings import PoseOptions
        from posegen_cli.video import parse_color

        options = PoseOptions(
            backend=backend.value, hand_normals=hand_normals.value, track=track, person=person, lossless=lossless, output_format=fmt.value,
            align=align.value, body_threshold=body_threshold, hand_threshold=hand_threshold, model_size=model_size,
            seg_size=seg_size, normal_size=normal_size, batch_size=batch_size, device=device, models_dir=models_dir,
            use_cache=not no_cache, background=parse_color(background), person_check=not no_person_check,
        )
        result = run_extract(video, out_dir, options, from_keypoints=from_keypoints, align_to=align_to, reporter=reporter)
        reporter.summary(result.summary(), title="Pose extracted")

    _run(quiet, json_output, debug, work, interrupted="interrupted (nothing was written and nothing is kept; run the same command again to extract from the start)")


@app.command()
def prompt(
    image: Annotated[Path, typer.Argument(help="Reference photo.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for prompt.txt and prompt.json (default: next to the image).")] = None,
    text: Annotated[str | None, typer.Option("--prompt", help="Use this caption instead of generating one (still finds the subject tokens).")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Subject word to locate (default: picked from the caption).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed for the captioner.")] = 42,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=16, help="Longest caption, in captioner tokens (the release: 512).")] = 512,
    no_cache: Annotated[bool, flag("--no-cache", help="Caption again even if this image was captioned with the same settings.")] = False,
    models_dir: ModelsDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Wan-style caption of the reference (Qwen2.5-VL) and the subject word's text-encoder token positions."""

    def work(reporter: Reporter) -> None:
        from posegen_cli.preflight import check_image

        check_image(image, "reference image")
        _quiet_libraries()
        from posegen_cli.prompting import PromptOptions, run_prompt

        options = PromptOptions(
            prompt=text, subject=subject, seed=seed, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
            models_dir=models_dir, use_cache=not no_cache,
        )
        result = run_prompt(image, out_dir, options, reporter=reporter)
        reporter.summary(result.summary(), title="Prompt")

    _run(quiet, json_output, debug, work)


@app.command()
def download(
    names: Annotated[list[str] | None, typer.Argument(help="Models to fetch (default: everything `animate` needs). See `posegen doctor` for names.", show_default=False)] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option("--models-dir", envvar="POSEGEN_MODELS_DIR", help="Fetch into this folder (<dir>/<model name>/, what --models-dir reads) instead of the Hugging Face cache."),
    ] = None,
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Fetch model weights (only the files posegen uses) into the Hugging Face cache or a models folder."""

    def work(reporter: Reporter) -> None:
        from posegen_cli import hub

        wanted = names or list(hub.DEFAULT_DOWNLOADS)
        for name in wanted:
            hub.get_spec(name)
        paths = {}
        for name in wanted:
            spec = hub.MODELS[name]
            reporter.info(f"{name}: {spec.repo_id} (~{spec.size_gb:g} GB, {spec.licence})")
            paths[name] = str(hub.download(name, models_dir))
        reporter.summary(paths, title="Downloaded")

    _run(quiet, json_output, debug, work, interrupted="interrupted (files fetched so far are kept; run the same command again to fetch the rest)")


@app.command("convert-checkpoint")
def convert_checkpoint(
    src: Annotated[Path, typer.Argument(help="A PoseGen release folder (model_config.json + .bin shards), e.g. 720p-81f-base.", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output folder in diffusers layout (config.json + safetensors shards).", show_default=False)],
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Merge a release checkpoint's LoRA and write it as a diffusers PoseGenTransformer3DModel."""

    def work(reporter: Reporter) -> None:
        _quiet_libraries()
        from posegen_cli.models import convert_checkpoint as run_convert

        out = run_convert(src, dst, reporter=reporter)
        reporter.summary({"output": str(out)}, title="Converted")

    _run(quiet, json_output, debug, work)


@app.command()
def doctor(
    models_dir: ModelsDir = None,
    quiet: Quiet = False,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """Check the installation: versions, GPUs, ffmpeg, disk space and which models are present."""

    def work(reporter: Reporter) -> None:
        report = _doctor_report(models_dir)
        reporter.summary(report, title="posegen doctor")
        if report["problems"]:
            raise typer.Exit(1)

    _run(quiet, json_output, debug, work)


def _doctor_report(models_dir: Path | None) -> dict[str, Any]:
    """Versions, GPUs, ffmpeg, pose backends, disk and models, without importing torch or OpenCV (well under a second)."""
    import importlib.metadata
    import subprocess

    import imageio_ffmpeg

    from posegen_cli import hub
    from posegen_cli.cache import cache_root
    from posegen_cli.fsutil import available_bytes

    problems: list[str] = []
    torch_version, torch_cuda = _torch_build()
    gpus = _nvidia_gpus()
    if not gpus:
        problems.append("no CUDA GPU: animate needs one for real models (extract-pose --backend mediapipe works on CPU)")
    elif torch_cuda is None:
        problems.append(f"torch {torch_version} is a CPU build but this machine has a GPU: install the CUDA build of torch")
    try:
        ffmpeg = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        ffmpeg = f"missing ({exc})"
        problems.append("ffmpeg from imageio-ffmpeg does not run: reinstall imageio-ffmpeg")
    try:
        mediapipe = f"{importlib.metadata.version('mediapipe')} (CPU pose backend)"
    except importlib.metadata.PackageNotFoundError:
        mediapipe = "not installed (the CPU pose backend: pip install 'posegen[mediapipe]')"
        if not gpus:
            problems.append("no pose backend can run here: no GPU for Sapiens and no mediapipe (pip install 'posegen[mediapipe]')")
    root = hub.models_dir_from_env(models_dir)
    if root is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        store = Path(HF_HUB_CACHE)
    else:
        store = root
    present = {name: hub.find_local(name, root) is not None for name in hub.MODELS}
    missing = [name for name in hub.DEFAULT_DOWNLOADS if not present[name]]
    if missing:
        problems.append(f"models not downloaded: {', '.join(missing)} (run `{download_command(missing, root)}`)")
    free_gb = available_bytes(store) / 2**30
    needed_gb = sum(hub.MODELS[name].size_gb for name in missing)
    if free_gb < needed_gb:
        problems.append(f"{free_gb:.0f} GB free in {store}, the missing models need ~{needed_gb:.0f} GB")
    return {
        "posegen": __version__,
        "python": platform.python_version(),
        "torch": torch_version,
        "cuda": torch_cuda or "none (CPU build)",
        "gpus": gpus or "none",
        "mediapipe": mediapipe,
        "ffmpeg": ffmpeg,
        "models_dir" if root is not None else "hf_cache": f"{store} ({free_gb:.0f} GB free)",
        "posegen_cache": str(cache_root()),
        "models": {name: "present" if ok else "missing" for name, ok in present.items()},
        "problems": problems,
    }


def _torch_build() -> tuple[str, str | None]:
    """torch's version and CUDA version from its ``torch/version.py``, read without importing torch (seconds of CPU)."""
    import importlib.metadata
    import importlib.util
    import runpy

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "not installed", None
    build = runpy.run_path(str(Path(next(iter(spec.submodule_search_locations))) / "version.py"))
    return str(build.get("__version__", importlib.metadata.version("torch"))), build.get("cuda")


def _nvidia_gpus() -> list[str]:
    """Name and memory of each NVIDIA GPU as the driver reports it (``nvidia-smi``); empty without a driver."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip():
            gpus.append(f"{name.strip()} ({float(mib) / 1024:.0f} GiB)")
    return gpus


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' tqdm bars and load-time chatter.

    Called by the commands that load diffusers/transformers models, after their inputs are checked, so that
    ``--help``, input errors, ``doctor`` and the MediaPipe pose stage never pay for importing them. torchao
    (optional, for ``--quantize``), imported by diffusers when installed, logs the optional C++ kernels it cannot
    load and a torch deprecation note; both are set quiet before anything imports them.
    """
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(run())
