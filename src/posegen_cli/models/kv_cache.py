"""Background K/V sharing (PoseGen §2): the anchor segment records, every other base segment replays.

Same outputs as the release, held leaner:
- no dense N×N −∞ mask on the source attention: it only touches rows the fusion throws away (spec §2.5), so
  every attention kernel of diffusers' dispatcher applies (flash, cuDNN, sage need no mask);
- the anchor's subject map is kept as the per-frame Otsu mask of each shared step (one byte per video token)
  instead of the cross-attention Q/K of 40 blocks; this needs every sharing block to come after the map blocks;
- the entries go to a :class:`~posegen_cli.models.kv_store.KVStore` (device, pinned host or disk, read ahead of
  use), never to the release's 100 GB of ``.pt`` files;
- ``kv_format="inputs"`` keeps each sharing block's modulated self-attention input [a; a_r] instead of K and V
  (half the bytes) and re-projects K/V from it with the same weights and shapes: bit-identical (spec §2.6);
- ``recompute_model`` stores no K/V at all: the anchor's transformer inputs at the shared steps are kept
  (:class:`AnchorInputs`, tens of MB) and each base forward at a shared step is preceded by the anchor's forward
  at that step and branch, whose entries live only until the base forward ends. Deterministic kernels make it
  bit-identical to the stored path (the tests check it on the CPU).

It has the shape of diffusers' cache hooks: a stateful :class:`KVShareHook` on the transformer reads
``transformer.cache_context(branch, step_index=step)`` (the guidance branch, "cond" or "uncond", and the step) and
hands each block's attention processors their part for that forward (a :class:`BlockShare` or :class:`ForwardShare`);
the processors only read and write those objects, so a compiled block has no graph break and does not specialise
on its index. Every store read and write happens in the hook, before or after the forward, outside the blocks.
Use::

    cache = KVShareCache(steps, blocks, subject_positions)
    with kv_sharing(transformer, cache):          # anchor: records (cond first at every step)
        ...  with transformer.cache_context("cond", step_index=i): transformer(...)
    cache.start_replay()
    with kv_sharing(transformer, cache):          # other base segments: replay
        ...
    cache.release()

A process that did not run the anchor (another worker) rebuilds the cache from the anchor's inputs with
:meth:`KVShareCache.rebuild`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from posegen_cli.models.kv_store import Key, KVStore, TieredStore

Branch = Literal["cond", "uncond"]
KVFormat = Literal["kv", "inputs"]
BRANCH_ORDER = ("cond", "uncond")
HOOK_NAME = "posegen_kv_share"
FORWARD_ARGUMENTS = (
    "hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image", "control_latents",
    "reference_latents", "hand_latents",
)  # fmt: skip
"""The leading positional parameters of ``PoseGenTransformer3DModel.forward``, in order."""
INPUT_NAMES = ("encoder_hidden_states_image", "control_latents", "reference_latents", "hand_latents")
"""Transformer inputs that are the same at every step of a segment (kept once by :class:`AnchorInputs`)."""
Projector = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(a_video [B, Nv, D], a_ref [B, Nr, D]) -> (K_all, V_all) [B, Nv + Nr, H, D/H]: a block's self-attention K/V."""


def subject_map(
    q: torch.Tensor, k: torch.Tensor, positions: Sequence[int], grid: tuple[int, int, int], chunk_rows: int = 16384
) -> torch.Tensor:
    """Per-frame min-max normalised head-mean logits of video queries against the subject token keys.

    ``q`` [B, S, H, D] are the block's cross-attention queries, ``k`` [B, L, H, D] the text keys. The logits are
    computed against all L keys and then the subject columns taken, as the release does (same GEMM shape);
    query rows are chunked to bound the [B, H, rows, L] temporary.
    """
    b, s, _, d = q.shape
    qh = q.transpose(1, 2)
    kt = k.transpose(1, 2).transpose(-2, -1)
    index = torch.as_tensor(list(positions), device=q.device)
    rows = []
    for start in range(0, s, chunk_rows):
        logits = torch.matmul(qh[:, :, start : start + chunk_rows], kt) / math.sqrt(d)
        rows.append(logits.mean(dim=1).index_select(-1, index).sum(-1))
    maps = torch.cat(rows, dim=1).reshape(b, *grid)
    lo = maps.amin((-2, -1), keepdim=True)
    hi = maps.amax((-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + 1e-6)


def otsu_masks(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu-binarise each 2-D map of ``maps`` [..., h, w] (values in [0, 1]) independently; returns uint8."""
    shape = maps.shape
    images = maps.reshape(-1, shape[-2] * shape[-1]).float()
    hist = torch.stack([torch.histc(img, bins=bins, min=0.0, max=1.0) for img in images])
    p = hist / images.shape[1]
    edges = torch.linspace(0, 1, bins + 1, device=maps.device)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = torch.cumsum(p, dim=1)
    mu = torch.cumsum(p * centers[None], dim=1)
    w1 = 1.0 - w0
    mu0 = torch.where(w0 > 1e-8, mu / (w0 + 1e-8), torch.zeros_like(w0))
    mu1 = torch.where(w1 > 1e-8, (mu[:, -1:] - mu) / (w1 + 1e-8), torch.zeros_like(w1))
    threshold = centers[torch.argmax(w0 * w1 * (mu0 - mu1) ** 2, dim=1)]
    return (images > threshold[:, None]).to(torch.uint8).reshape(shape)


@torch.library.custom_op("posegen::subject_mask", mutates_args=())
def subject_mask(map_sum: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [B, f*h*w]: Otsu of the mean of ``count`` summed maps [B, f, h, w], frame by frame.

    A custom op, so that inside a compiled block it runs eagerly, op for op as here: a histogram threshold must not
    move because a compiler reordered a cumulative sum.
    """
    return otsu_masks(map_sum / count).flatten(1)


@subject_mask.register_fake
def _(map_sum: torch.Tensor, count: int) -> torch.Tensor:
    return map_sum.new_empty((map_sum.shape[0], map_sum[0].numel()), dtype=torch.uint8)


@dataclass(eq=False)
class ForwardShare:
    """What the blocks of one forward share: the running subject-map sum and the masks built from it.

    ``map_count`` is fixed before the forward (the number of map blocks), so no block reads a changing counter.
    """

    positions: tuple[int, ...]
    grid: tuple[int, int, int]
    chunk_rows: int
    map_count: int
    use_mask: bool
    prev_mask: torch.Tensor | None = None
    map_sum: torch.Tensor | None = None
    curr_mask: torch.Tensor | None = None
    background: torch.Tensor | None = None

    def add_map(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Add this block's normalised subject map (cross-attention ``q`` [B, S, H, D], text keys ``k``), in block order."""
        m = subject_map(q, k, self.positions, self.grid, self.chunk_rows)
        self.map_sum = m if self.map_sum is None else self.map_sum + m

    def background_mask(self) -> torch.Tensor | None:
        """bool [B, Nv]: video tokens that take the anchor-attention result (neither subject mask set); None: all do."""
        if not self.use_mask:
            return None
        if self.background is None:
            assert self.map_sum is not None and self.prev_mask is not None
            self.curr_mask = subject_mask(self.map_sum, self.map_count)
            self.background = torch.bitwise_or(self.prev_mask, self.curr_mask) == 0
        return self.background



@dataclass(eq=False)
class BlockShare:
    """One sharing block's part of a forward: record its K/V (anchor), or attend to the anchor's as well (replay).

    ``fmt`` is the cache's storage format: "kv" keeps K and V, "inputs" the block's modulated inputs (a, a_r).
    ``source`` is the stored entry on the block's device, read by the hook before the forward.
    """

    forward: ForwardShare
    record: bool = False
    fmt: KVFormat = "kv"
    source: tuple[torch.Tensor, ...] | None = None
    recorded: tuple[torch.Tensor, ...] | None = None

    def keep(self, kv: tuple[torch.Tensor, torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Record the block's self-attention K/V [B, N, H, D] (after norm and RoPE, [video; reference] order), or in
        the "inputs" format its modulated inputs (a [B, Nv, D], a_r [B, Nr, D])."""
        if self.record:
            self.recorded = kv if self.fmt == "kv" else inputs

    def source_kv(self, project: Projector) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The anchor's K/V for this block; ``project`` turns stored inputs into K/V (the block's own projections)."""
        if self.source is None:
            return None
        first, second = self.source
        return (first, second) if self.fmt == "kv" else project(first, second)

    def fuse(self, plain: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """Per video token, the anchor-K/V result on the background and this segment's own on the subject.

        Selecting the projected outputs before the gated residual gives bit for bit the release's selection of
        ``x_res + gate·out`` rows, as both are elementwise.
        """
        background = self.forward.background_mask()
        return shared if background is None else torch.where(background[..., None], shared, plain)


@dataclass
class AnchorInputs:
    """The anchor's transformer inputs at its shared steps: all it takes to recompute its K/V anywhere.

    ``common``: the step-independent inputs (:data:`INPUT_NAMES`, CLIP tokens, control/reference/hand latents);
    ``calls[(step, branch)]``: ``hidden_states`` (the anchor's noisy latents entering that step, [1, 16, T, h, w]),
    ``timestep`` and ``encoder_hidden_states`` (that branch's text embeddings). Kept on the CPU in the model dtype:
    about 10 MB per call at 720p plus ~35 MB shared. Plain tensors, so a distributed engine can ship it to workers
    and call :meth:`KVShareCache.rebuild` there.
    """

    common: dict[str, torch.Tensor | None] = field(default_factory=dict)
    calls: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the anchor ran; recomputation runs there unless told otherwise."""

    def add(self, step: int, branch: str, inputs: dict[str, Any]) -> None:
        """Keep the keyword arguments of the anchor's forward at (step, branch) (the transformer's input names)."""
        hidden = inputs["hidden_states"]
        self.device = hidden.device
        if not self.common:
            self.common = {name: _to_cpu(inputs.get(name)) for name in INPUT_NAMES}
        self.calls[(step, branch)] = {
            name: _to_cpu(inputs[name]) for name in ("hidden_states", "timestep", "encoder_hidden_states")  # type: ignore[misc]
        }

    def call(self, step: int, branch: str, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of the anchor's forward at (step, branch), on ``device``."""
        if (step, branch) not in self.calls:
            raise RuntimeError(f"the anchor's inputs at step {step}, branch {branch!r} were not kept")
        merged = {**self.common, **self.calls[(step, branch)]}
        return {name: None if t is None else t.to(device) for name, t in merged.items()}

    @property
    def nbytes(self) -> int:
        tensors = [t for t in self.common.values() if t is not None] + [t for c in self.calls.values() for t in c.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _to_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", copy=True)


class KVShareCache:
    """Anchor K/V and subject masks for background sharing; ``mode`` is "record", then "replay".

    ``steps``: denoising step indices that share (the release's ``-s 0 2`` is {0, 1}); ``blocks``: sharing blocks
    ({34..39}); ``subject_positions``: token positions of the subject word in the positive prompt's 512 ids;
    ``max_map_block``: subject maps average blocks 0..max_map_block (the release's 10); ``use_subject_mask``
    False fuses every video token (the release's ``use_attn_mask=False``).

    Storage: ``store`` keeps the entries (default: a :class:`TieredStore` leaving them where they were made, on the
    device); ``kv_format`` "kv" stores K and V, "inputs" the block's modulated input (half the bytes, K/V
    re-projected on use); ``recompute_model`` (the hooked transformer) stores neither and re-runs the anchor's
    forward before each base forward at a shared step (``kv_format`` is then "inputs" for the transient entries);
    ``lookahead`` entries are read ahead from host or disk. The anchor's transformer inputs at the shared steps are
    always kept (:attr:`anchor_inputs`, tens of MB on the CPU) so that another worker can :meth:`rebuild` the cache.
    """

    def __init__(
        self,
        steps: Iterable[int],
        blocks: Iterable[int],
        subject_positions: Sequence[int] | None,
        *,
        max_map_block: int = 10,
        use_subject_mask: bool = True,
        map_chunk_rows: int = 16384,
        store: KVStore | None = None,
        kv_format: KVFormat = "kv",
        recompute_model: torch.nn.Module | None = None,
        lookahead: int = 2,
    ) -> None:
        self.steps = frozenset(int(s) for s in steps)
        self.blocks = frozenset(int(b) for b in blocks)
        if kv_format not in ("kv", "inputs"):
            raise ValueError(f"kv_format must be 'kv' or 'inputs', not {kv_format!r}")
        if use_subject_mask and self.steps and self.blocks:
            if not subject_positions:
                raise ValueError("the subject mask needs the subject token positions (or use_subject_mask=False)")
            if min(self.blocks) <= max_map_block:
                raise ValueError(
                    f"sharing blocks must come after the subject-map blocks 0..{max_map_block} "
                    f"(got block {min(self.blocks)}); the release crashes or mixes windows there"
                )
        self.subject_positions = tuple(subject_positions or ())
        self.max_map_block = max_map_block
        self.use_subject_mask = use_subject_mask
        self.map_chunk_rows = map_chunk_rows
        self.store: KVStore = store if store is not None else TieredStore()
        self.recompute_model = recompute_model
        self.kv_format: KVFormat = "inputs" if recompute_model is not None else kv_format
        self.lookahead = lookahead
        self.anchor_inputs: AnchorInputs | None = AnchorInputs()
        self.mode: Literal["record", "replay", "released"] = "record"
        self._order: list[Key] = []
        self._prev_masks: dict[int, torch.Tensor] = {}
        self._curr_masks: dict[int, torch.Tensor] = {}

    @property
    def maps_needed(self) -> bool:
        return self.use_subject_mask and bool(self.blocks)

    def view(self, step: int, branch: Branch) -> KVShareView | None:
        """The per-forward handle :class:`KVShareHook` works through; None at steps that do not share.

        With ``recompute_model``, a replay view first re-runs the anchor's forward at this (step, branch).
        """
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', not {branch!r}")
        if self.mode == "released":
            raise RuntimeError("this K/V cache was released")
        if step not in self.steps:
            return None
        if self.mode == "replay" and self.recompute_model is not None and self.blocks:
            self._regenerate(step, branch)
        return KVShareView(self, step, branch, recording=self.mode == "record")

    def _regenerate(self, step: int, branch: Branch) -> None:
        """Run the anchor's forward at (step, branch) into the (emptied) store, recording K/V entries only."""
        assert self.anchor_inputs is not None and self.recompute_model is not None
        self.store.clear()
        inputs = self.anchor_inputs.call(step, branch, self.anchor_inputs.device)
        recording_forward(self.recompute_model, KVShareView(self, step, branch, recording=True, maps=False), inputs)
        self.store.sync()

    def rebuild(self, transformer: torch.nn.Module, inputs: AnchorInputs, device: torch.device | str | None = None) -> None:
        """Fill a fresh recording cache from the anchor's kept inputs (another process's anchor), then replay.

        Runs ``transformer`` (the base variant, as the anchor ran) once per kept (step, branch), cond before
        uncond, exactly as the anchor's own run recorded: same entries, same subject masks, bit for bit under
        deterministic kernels. With ``recompute_model`` set, only the masks are made here. ``device``: where
        ``transformer`` computes (default: where the anchor ran).
        """
        if self.mode != "record":
            raise RuntimeError(f"rebuild() needs a fresh recording cache, this one is {self.mode!r}")
        device = torch.device(device) if device is not None else inputs.device
        inputs.device = device
        order = sorted(inputs.calls, key=lambda sb: (sb[0], BRANCH_ORDER.index(sb[1])))
        for step, branch in order:
            if step in self.steps:
                view = KVShareView(self, step, branch, recording=True)  # type: ignore[arg-type]
                recording_forward(transformer, view, inputs.call(step, branch, device))
        self.anchor_inputs = inputs
        self.start_replay()

    def start_replay(self) -> None:
        """Check the anchor recorded everything the replay will read, then switch to "replay"."""
        if self.mode != "record":
            raise RuntimeError(f"start_replay() needs a recording cache, this one is {self.mode!r}")
        if self.recompute_model is not None:
            assert self.anchor_inputs is not None
            recorded = set(self.anchor_inputs.calls)
        else:
            recorded = {(s, br) for (s, br, _) in self.store.keys()}
        branches = {br for (_, br) in recorded} or {"cond"}
        wanted = [(s, br, b) for s in sorted(self.steps) for br in sorted(branches) for b in sorted(self.blocks)]
        if self.recompute_model is not None:
            missing = [key for key in wanted if key[:2] not in recorded]
        else:
            missing = [key for key in wanted if key not in self.store]
        if missing:
            raise RuntimeError(f"the anchor run did not record K/V for (step, branch, block) {missing[:4]}")
        if self.maps_needed and set(self._prev_masks) != set(self.steps):
            lacking = sorted(self.steps - set(self._prev_masks))
            raise RuntimeError(f"the anchor run did not record the subject mask of steps {lacking} (run 'cond' at every shared step)")
        self._order = sorted(wanted, key=lambda k: (k[0], BRANCH_ORDER.index(k[1]), k[2]))
        self.store.sync()
        if self.recompute_model is not None:
            self.store.clear()
        self.mode = "replay"

    @property
    def subject_masks(self) -> dict[int, torch.Tensor]:
        """The anchor's uint8 subject mask [B, f*h*w] per shared step (1 = subject), for inspection."""
        return dict(self._prev_masks)

    @property
    def nbytes(self) -> int:
        """Bytes held now: stored entries plus one uint8 per video token per step mask (kept inputs not counted)."""
        masks = sum(m.numel() * m.element_size() for m in (*self._prev_masks.values(), *self._curr_masks.values()))
        return self.store.nbytes + masks

    def release(self) -> None:
        """Drop everything; the cache cannot be used afterwards."""
        self.store.clear()
        self._prev_masks.clear()
        self._curr_masks.clear()
        self.anchor_inputs = None
        self.mode = "released"

    def _store(self, key: Key, entry: tuple[torch.Tensor, ...]) -> None:
        """Keep one block's recorded entry (K/V, or its inputs in the "inputs" format) in the store."""
        self.store.put(key, entry)

    def _prefetch_after(self, key: Key | None, device: torch.device) -> None:
        """Start reading the ``lookahead`` entries that replay reads after ``key`` (from the start when None)."""
        if self.recompute_model is not None or not self._order:
            return
        start = 0 if key is None else self._order.index(key) + 1
        for later in self._order[start : start + self.lookahead]:
            self.store.prefetch(later, device)

    def _fetch(self, key: Key, device: torch.device) -> tuple[torch.Tensor, ...]:
        """One block's stored entry on ``device``; starts reading the next ``lookahead`` ones."""
        if key not in self.store:
            raise RuntimeError(f"no anchor K/V for step {key[0]}, branch {key[1]!r}, block {key[2]}")
        entry = self.store.get(key, device)
        if self.recompute_model is None:
            self._prefetch_after(key, device)
        return entry


class KVShareView:
    """What one forward (one step, one guidance branch) needs from the cache; made by ``KVShareCache.view``.

    ``recording`` views store entries (the anchor); others read them (base segments). ``maps`` False skips the
    subject map (a recomputed anchor forward: its masks are already known).
    """

    def __init__(self, cache: KVShareCache, step: int, branch: Branch, *, recording: bool, maps: bool = True) -> None:
        self.cache = cache
        self.step = step
        self.branch = branch
        self.recording = recording
        self.maps = maps
        self.forward: ForwardShare | None = None
        self.blocks: dict[int, BlockShare] = {}
        self.map_blocks: frozenset[int] = frozenset()

    def begin(self, grid: tuple[int, int, int], device: torch.device, num_blocks: int, inputs: dict[str, Any]) -> None:
        """Prepare each block's part of the forward over the video token grid (f, h, w) on ``device``.

        ``inputs``: the forward's keyword arguments, kept as the anchor's (:class:`AnchorInputs`) when recording.
        Replay reads every sharing block's entry from the store here, before the blocks run.
        """
        cache = self.cache
        if self.recording and self.maps and cache.anchor_inputs is not None:
            cache.anchor_inputs.add(self.step, self.branch, inputs)
        maps = self.maps and cache.maps_needed and self.branch == "cond"
        self.map_blocks = frozenset(range(min(cache.max_map_block + 1, num_blocks))) if maps else frozenset()
        forward = ForwardShare(
            cache.subject_positions, tuple(grid), cache.map_chunk_rows, len(self.map_blocks), cache.use_subject_mask
        )
        if not self.recording and cache.use_subject_mask and cache.blocks:
            forward.prev_mask = cache._prev_masks[self.step].to(device)
            if self.branch == "uncond":
                if self.step not in cache._curr_masks:
                    raise RuntimeError(f"run the 'cond' branch of step {self.step} before 'uncond': it reuses its subject mask")
                forward.background = torch.bitwise_or(forward.prev_mask, cache._curr_masks[self.step].to(device)) == 0
        self.forward = forward
        record = self.recording and (cache.recompute_model is None or not self.maps)
        if not self.recording and cache._order and cache._order[0][:2] == (self.step, self.branch):
            cache._prefetch_after(None, device)
        self.blocks = {}
        for block in sorted(b for b in cache.blocks if b < num_blocks):
            share = BlockShare(forward, record=record, fmt=cache.kv_format)
            if not self.recording:
                share.source = cache._fetch((self.step, self.branch, block), device)
            self.blocks[block] = share

    def end(self) -> None:
        """After the last block: store recorded entries, the anchor's subject mask (record) or this step's (replay)."""
        cache, forward = self.cache, self.forward
        assert forward is not None, "begin() was not called"
        for block, share in self.blocks.items():
            if share.recorded is not None:
                cache._store((self.step, self.branch, block), share.recorded)
        if self.branch == "cond" and forward.map_sum is not None:
            if self.recording:
                cache._prev_masks[self.step] = subject_mask(forward.map_sum, forward.map_count)
            elif forward.curr_mask is not None:
                cache._curr_masks.clear()
                cache._curr_masks[self.step] = forward.curr_mask
        if not self.recording and cache.recompute_model is not None:
            cache.store.clear()
        self.blocks = {}
        self.forward = None


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class KVShareHook(ModelHook):
    """Stateful diffusers hook on a PoseGen transformer that runs background K/V sharing through its processors.

    The branch and step come from ``transformer.cache_context(branch, step_index=step)``, which the pipeline sets
    around every forward (diffusers' cache hooks read the same context). ``forced`` is a view for the next forward
    instead (a recomputed or rebuilt anchor forward, see :func:`recording_forward`).
    """

    _is_stateful = True

    def __init__(self, cache: KVShareCache) -> None:
        super().__init__()
        self.cache = cache
        self.context = StateManager(_NoState)
        self.view: KVShareView | None = None
        self.forced: KVShareView | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        if self.forced is not None:
            view, self.forced = self.forced, None
        else:
            try:
                context = self.context.context
            except ValueError:
                context = None
            if context is None or context.step_index is None:
                raise RuntimeError("K/V sharing needs the branch and step: call the transformer inside cache_context(branch, step_index=step)")
            view = self.cache.view(context.step_index, context.name)
        if view is not None:
            inputs = {**dict(zip(FORWARD_ARGUMENTS, args)), **kwargs}
            grid = module.token_grid(inputs["hidden_states"])
            view.begin(grid, module.device, len(module.blocks), inputs)
            for index, block in enumerate(module.blocks):
                block.attn1.processor.share = view.blocks.get(index)
                block.attn2.processor.share = view.forward if index in view.map_blocks else None
        self.view = view
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.view is not None:
            self.reset_state(module)
            self.view.end()
            self.view = None
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        for block in getattr(module, "blocks", ()):
            block.attn1.processor.share = None
            block.attn2.processor.share = None
        return module


def apply_kv_share(transformer: torch.nn.Module, cache: KVShareCache) -> KVShareHook:
    """Register a :class:`KVShareHook` for ``cache`` on a PoseGen transformer (one at a time)."""
    hook = KVShareHook(cache)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    return hook


def remove_kv_share(transformer: torch.nn.Module) -> None:
    """Remove the K/V-sharing hook (if any) and detach every block's share."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(HOOK_NAME)
    if hook is not None:
        hook.reset_state(transformer)
        registry.remove_hook(HOOK_NAME, recurse=False)


def recording_forward(transformer: torch.nn.Module, view: KVShareView, inputs: dict[str, Any]) -> None:
    """Run one anchor forward of ``transformer`` (no grad) that records through ``view``.

    Uses the transformer's K/V hook when one is registered (a recomputation inside a replaying forward), or one for
    this call only.
    """
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK_NAME)
    temporary = hook is None
    if temporary:
        hook = apply_kv_share(transformer, view.cache)
    hook.forced = view
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        hook.forced = None
        if temporary:
            remove_kv_share(transformer)


@contextmanager
def kv_sharing(transformer: torch.nn.Module, cache: KVShareCache | None) -> Iterator[None]:
    """Share K/V through ``cache`` for the forwards inside the block (nothing when ``cache`` is None)."""
    if cache is None:
        yield
        return
    apply_kv_share(transformer, cache)
    try:
        yield
    finally:
        remove_kv_share(transformer)
