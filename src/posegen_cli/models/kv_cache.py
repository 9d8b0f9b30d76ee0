"""Background K/V sharing (PoseGen §2): the anchor segment records, every other base segment replays.

Same outputs as the release, held leaner:
- no dense N×N −∞ mask on the source attention: it only touches rows the fusion throws away (spec §2.5), so
  every attention kernel of diffusers' dispatcher applies (flash, cuDNN, sage need no mask);
- the anchor's subject map is kept as the per-frame Otsu mask of each shared step (one byte per video token)
  instead of the cross-attention Q/K of 40 blocks; this needs every sharing block to come after the map blocks;
- nothing is written to disk. K/V stay on the GPU, or in pinned host memory, copied to the GPU in the sharing
  block that reads them (about 1.6 GB per block at 720p: 32-65 ms at 25-50 GB/s, against about 250 ms of compute).

It has the shape of diffusers' cache hooks: a stateful :class:`KVShareHook` on the transformer reads
``transformer.cache_context(branch, step_index=step)`` (the guidance branch, "cond" or "uncond", and the step) and
hands each block's attention processors their part for that forward (a :class:`BlockShare` or :class:`ForwardShare`);
the processors only read and write those objects, so a compiled block has no graph break and does not specialise
on its index. Use::

    cache = KVShareCache(steps, blocks, subject_positions)
    with kv_sharing(transformer, cache):          # anchor: records (cond first at every step)
        ...  with transformer.cache_context("cond", step_index=i): transformer(...)
    cache.start_replay()
    with kv_sharing(transformer, cache):          # other base segments: replay
        ...
    cache.release()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

Branch = Literal["cond", "uncond"]
Placement = Literal["gpu", "cpu", "auto"]
AUTO_HEADROOM_BYTES = 6 * 1024**3
"""GPU memory left free by ``placement="auto"`` for the activations of the replaying forward."""
HOOK_NAME = "posegen_kv_share"


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


@torch.library.custom_op("posegen::to_host", mutates_args=())
def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` (pinned, filled asynchronously, when it lives on a GPU); opaque to torch.compile."""
    pin = tensor.device.type == "cuda"
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    out.copy_(tensor, non_blocking=pin)
    return out


@to_host.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")


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
    """One sharing block's part of a forward: record its K/V (anchor), or attend to the anchor's as well (replay)."""

    forward: ForwardShare
    record: bool = False
    to_host: bool = False
    source: tuple[torch.Tensor, torch.Tensor] | None = None
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Record the block's self-attention K/V [B, N, H, D] (after norm and RoPE, [video; reference] order)."""
        if self.record:
            self.recorded = (to_host(k), to_host(v)) if self.to_host else (k, v)

    def source_kv(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.source is None:
            return None
        k, v = self.source
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    def fuse(self, plain: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """Per video token, the anchor-K/V result on the background and this segment's own on the subject.

        Selecting the projected outputs before the gated residual gives bit for bit the release's selection of
        ``x_res + gate·out`` rows, as both are elementwise.
        """
        background = self.forward.background_mask()
        return shared if background is None else torch.where(background[..., None], shared, plain)


class KVShareCache:
    """Anchor K/V and subject masks for background sharing; ``mode`` is "record", then "replay".

    ``steps``: denoising step indices that share (the release's ``-s 0 2`` is {0, 1}); ``blocks``: sharing blocks
    ({34..39}); ``subject_positions``: token positions of the subject word in the positive prompt's 512 ids;
    ``max_map_block``: subject maps average blocks 0..max_map_block (the release's 10); ``use_subject_mask``
    False fuses every video token (the release's ``use_attn_mask=False``).
    """

    def __init__(
        self,
        steps: Iterable[int],
        blocks: Iterable[int],
        subject_positions: Sequence[int] | None,
        *,
        max_map_block: int = 10,
        placement: Placement = "auto",
        use_subject_mask: bool = True,
        map_chunk_rows: int = 16384,
    ) -> None:
        self.steps = frozenset(int(s) for s in steps)
        self.blocks = frozenset(int(b) for b in blocks)
        if placement not in ("gpu", "cpu", "auto"):
            raise ValueError(f"placement must be gpu, cpu or auto, not {placement!r}")
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
        self.placement: Placement = placement
        self.use_subject_mask = use_subject_mask
        self.map_chunk_rows = map_chunk_rows
        self.mode: Literal["record", "replay", "released"] = "record"
        self.resolved_placement: Literal["gpu", "cpu"] | None = None
        self._kv: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._prev_masks: dict[int, torch.Tensor] = {}
        self._curr_masks: dict[int, torch.Tensor] = {}

    @property
    def maps_needed(self) -> bool:
        return self.use_subject_mask and bool(self.blocks)

    def view(self, step: int, branch: Branch) -> KVShareView | None:
        """The per-forward handle :class:`KVShareHook` works through; None at steps that do not share."""
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', not {branch!r}")
        if self.mode == "released":
            raise RuntimeError("this K/V cache was released")
        if step not in self.steps:
            return None
        return KVShareView(self, step, branch)

    def start_replay(self) -> None:
        """Check the anchor recorded everything the replay will read, then switch to "replay"."""
        if self.mode != "record":
            raise RuntimeError(f"start_replay() needs a recording cache, this one is {self.mode!r}")
        branches = {branch for (_, branch, _) in self._kv}
        missing = [
            (s, br, b) for s in sorted(self.steps) for br in sorted(branches) for b in sorted(self.blocks) if (s, br, b) not in self._kv
        ]
        if self.blocks and not branches:
            missing = [(s, "cond", b) for s in sorted(self.steps) for b in sorted(self.blocks)]
        if missing:
            raise RuntimeError(f"the anchor run did not record K/V for (step, branch, block) {missing[:4]}")
        if self.maps_needed and set(self._prev_masks) != set(self.steps):
            lacking = sorted(self.steps - set(self._prev_masks))
            raise RuntimeError(f"the anchor run did not record the subject mask of steps {lacking} (run 'cond' at every shared step)")
        if torch.cuda.is_available() and self.resolved_placement == "cpu":
            torch.cuda.synchronize()
        self.mode = "replay"

    @property
    def subject_masks(self) -> dict[int, torch.Tensor]:
        """The anchor's uint8 subject mask [B, f*h*w] per shared step (1 = subject), for inspection."""
        return dict(self._prev_masks)

    @property
    def nbytes(self) -> int:
        """Bytes held now: K/V of every (step, branch, block) plus one uint8 per video token per step mask."""
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv.values())
        masks = sum(m.numel() * m.element_size() for m in (*self._prev_masks.values(), *self._curr_masks.values()))
        return kv + masks

    def release(self) -> None:
        """Drop everything; the cache cannot be used afterwards."""
        self._kv.clear()
        self._prev_masks.clear()
        self._curr_masks.clear()
        self.mode = "released"

    def _resolve_placement(self, tensor_bytes: int, device: torch.device) -> Literal["gpu", "cpu"]:
        """Where recorded K/V live; ``tensor_bytes`` is one K (or V) tensor of one block and branch."""
        if self.resolved_placement is None:
            if self.placement != "auto" or device.type != "cuda":
                self.resolved_placement = "cpu" if self.placement == "cpu" else "gpu"
            else:
                total = 4 * len(self.steps) * len(self.blocks) * tensor_bytes
                free, _ = torch.cuda.mem_get_info(device)
                self.resolved_placement = "gpu" if total + AUTO_HEADROOM_BYTES < free else "cpu"
        return self.resolved_placement

    def _store(self, key: tuple[int, str, int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep one block's recorded K/V (already where the placement wants them)."""
        self._kv[key] = (k, v)

    def _fetch(self, key: tuple[int, str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's recorded K/V, where they are stored (the reading block copies them to its device)."""
        if key not in self._kv:
            raise RuntimeError(f"no anchor K/V for step {key[0]}, branch {key[1]!r}, block {key[2]}")
        return self._kv[key]


class KVShareView:
    """What one forward (one step, one guidance branch) needs from the cache; made by ``KVShareCache.view``."""

    def __init__(self, cache: KVShareCache, step: int, branch: Branch) -> None:
        self.cache = cache
        self.step = step
        self.branch = branch
        self.forward: ForwardShare | None = None
        self.blocks: dict[int, BlockShare] = {}
        self.map_blocks: frozenset[int] = frozenset()

    def begin(self, grid: tuple[int, int, int], device: torch.device, num_blocks: int, tensor_bytes: int) -> None:
        """Prepare each block's part of the forward over the video token grid (f, h, w) on ``device``.

        ``tensor_bytes``: size of one block's self-attention K (all tokens), for the "auto" placement.
        """
        cache = self.cache
        maps = cache.maps_needed and self.branch == "cond"
        self.map_blocks = frozenset(range(min(cache.max_map_block + 1, num_blocks))) if maps else frozenset()
        forward = ForwardShare(
            cache.subject_positions, tuple(grid), cache.map_chunk_rows, len(self.map_blocks), cache.use_subject_mask
        )
        if cache.mode == "replay" and cache.use_subject_mask and cache.blocks:
            forward.prev_mask = cache._prev_masks[self.step].to(device)
            if self.branch == "uncond":
                if self.step not in cache._curr_masks:
                    raise RuntimeError(f"run the 'cond' branch of step {self.step} before 'uncond': it reuses its subject mask")
                forward.background = torch.bitwise_or(forward.prev_mask, cache._curr_masks[self.step].to(device)) == 0
        self.forward = forward
        host = cache._resolve_placement(tensor_bytes, device) == "cpu" if cache.mode == "record" else False
        self.blocks = {}
        for block in sorted(b for b in cache.blocks if b < num_blocks):
            share = BlockShare(forward, record=cache.mode == "record", to_host=host)
            if cache.mode == "replay":
                share.source = cache._fetch((self.step, self.branch, block))
            self.blocks[block] = share

    def end(self) -> None:
        """After the last block: store recorded K/V, the anchor's subject mask (record) or this step's (replay)."""
        cache, forward = self.cache, self.forward
        assert forward is not None, "begin() was not called"
        for block, share in self.blocks.items():
            if share.recorded is not None:
                cache._store((self.step, self.branch, block), *share.recorded)
        if self.branch == "cond" and forward.map_sum is not None:
            if cache.mode == "record":
                cache._prev_masks[self.step] = subject_mask(forward.map_sum, forward.map_count)
            elif forward.curr_mask is not None:
                cache._curr_masks.clear()
                cache._curr_masks[self.step] = forward.curr_mask
        self.blocks = {}
        self.forward = None


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class KVShareHook(ModelHook):
    """Stateful diffusers hook on a PoseGen transformer that runs background K/V sharing through its processors.

    The branch and step come from ``transformer.cache_context(branch, step_index=step)``, which the pipeline sets
    around every forward (diffusers' cache hooks read the same context).
    """

    _is_stateful = True

    def __init__(self, cache: KVShareCache) -> None:
        super().__init__()
        self.cache = cache
        self.context = StateManager(_NoState)
        self.view: KVShareView | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        try:
            context = self.context.context
        except ValueError:
            context = None
        if context is None or context.step_index is None:
            raise RuntimeError("K/V sharing needs the branch and step: call the transformer inside cache_context(branch, step_index=step)")
        self.view = self.cache.view(context.step_index, context.name)
        if self.view is not None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            reference = kwargs["reference_latents"] if "reference_latents" in kwargs else args[5]
            grid, tokens = module.token_grid(hidden), module.token_grid(reference)
            n_tokens = math.prod(grid) + math.prod(tokens)
            inner = module.config.num_attention_heads * module.config.attention_head_dim
            tensor_bytes = hidden.shape[0] * n_tokens * inner * module.dtype.itemsize
            self.view.begin(grid, module.device, len(module.blocks), tensor_bytes)
            for index, block in enumerate(module.blocks):
                block.attn1.processor.share = self.view.blocks.get(index)
                block.attn2.processor.share = self.view.forward if index in self.view.map_blocks else None
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
