"""Background K/V sharing (PoseGen §2): the anchor segment records, every other base segment replays.

Same outputs as the release, held leaner:
- no dense N×N −∞ mask on the source attention: it only touches rows the fusion throws away (spec §2.5);
- the anchor's subject map is kept as the per-frame Otsu mask of each shared step (one byte per video token)
  instead of the cross-attention Q/K of 40 blocks; this needs every sharing block to come after the map blocks;
- nothing is written to disk. K/V stay on the GPU, or in pinned host memory and are copied back one sharing
  block ahead on a side stream so the copy hides behind the blocks in between.

Use: ``cache = KVShareCache(steps, blocks, subject_positions)``; run the anchor with
``kv_share=cache.view(step, "cond" | "uncond")`` (cond first at every step); ``cache.start_replay()``; run the
other base segments with the same views; ``cache.release()`` when done.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

Branch = Literal["cond", "uncond"]
Placement = Literal["gpu", "cpu", "auto"]
AUTO_HEADROOM_BYTES = 6 * 1024**3
"""GPU memory left free by ``placement="auto"`` for the activations of the replaying forward."""


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


class _MapSum:
    """Sum of normalised maps in block order, in the maps' dtype, as the release accumulates them."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, m: torch.Tensor) -> None:
        self.total = m if self.total is None else self.total + m
        self.count += 1

    def mask(self) -> torch.Tensor:
        """uint8 [B, f*h*w]: Otsu of the mean map, frame by frame."""
        assert self.total is not None
        return otsu_masks(self.total / self.count).flatten(1)


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
        self._copy_stream: torch.cuda.Stream | None = None
        self._inflight: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def maps_needed(self) -> bool:
        return self.use_subject_mask and bool(self.blocks)

    def view(self, step: int, branch: Branch) -> KVShareView | None:
        """The per-forward handle to pass as ``kv_share``; None at steps that do not share."""
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
        self._inflight.clear()
        self._prev_masks.clear()
        self._curr_masks.clear()
        self.mode = "released"

    def _resolve_placement(self, k: torch.Tensor) -> Literal["gpu", "cpu"]:
        if self.resolved_placement is None:
            if self.placement != "auto" or k.device.type != "cuda":
                self.resolved_placement = "cpu" if self.placement == "cpu" else "gpu"
            else:
                total = 4 * len(self.steps) * len(self.blocks) * k.numel() * k.element_size()
                free, _ = torch.cuda.mem_get_info(k.device)
                self.resolved_placement = "gpu" if total + AUTO_HEADROOM_BYTES < free else "cpu"
        return self.resolved_placement

    def _store(self, key: tuple[int, str, int], k: torch.Tensor, v: torch.Tensor) -> None:
        if self._resolve_placement(k) == "gpu":
            self._kv[key] = (k, v)
            return
        pin = k.device.type == "cuda"
        host = []
        for t in (k, v):
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            buf.copy_(t, non_blocking=pin)
            host.append(buf)
        self._kv[key] = (host[0], host[1])

    def _start_copy(self, key: tuple[int, str, int], device: torch.device) -> None:
        if key in self._inflight or key not in self._kv:
            return
        k, v = self._kv[key]
        if device.type != "cuda":
            self._inflight[key] = (k.to(device), v.to(device))
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._copy_stream):
            self._inflight[key] = (k.to(device, non_blocking=True), v.to(device, non_blocking=True))

    def _fetch(self, key: tuple[int, str, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._kv:
            raise RuntimeError(f"no anchor K/V for step {key[0]}, branch {key[1]!r}, block {key[2]}")
        if self.resolved_placement == "gpu":
            return self._kv[key]
        self._start_copy(key, device)
        k, v = self._inflight.pop(key)
        if device.type == "cuda" and self._copy_stream is not None:
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._copy_stream)
            k.record_stream(current)
            v.record_stream(current)
        later = sorted(b for b in self.blocks if b > key[2])
        if later:
            self._start_copy((key[0], key[1], later[0]), device)
        return k, v


class KVShareView:
    """What one forward (one step, one guidance branch) needs from the cache; made by ``KVShareCache.view``."""

    def __init__(self, cache: KVShareCache, step: int, branch: Branch) -> None:
        self.cache = cache
        self.step = step
        self.branch = branch
        self._grid: tuple[int, int, int] | None = None
        self._device = torch.device("cpu")
        self._maps = _MapSum()
        self._background: torch.Tensor | None = None

    def begin(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Called by the model before block 0 with the video token grid (f, h, w) and its device."""
        self._grid = grid
        self._device = device
        self._maps = _MapSum()
        self._background = None
        cache = self.cache
        if cache.mode == "replay" and cache.resolved_placement == "cpu" and cache.blocks:
            cache._start_copy((self.step, self.branch, min(cache.blocks)), device)

    def _wants_map(self, block: int) -> bool:
        return self.cache.maps_needed and self.branch == "cond" and block <= self.cache.max_map_block

    def record_kv(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.cache.mode == "record" and block in self.cache.blocks:
            self.cache._store((self.step, self.branch, block), k, v)

    def source_kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cache.mode != "replay" or block not in self.cache.blocks:
            return None
        return self.cache._fetch((self.step, self.branch, block), self._device)

    def add_subject_map(self, block: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if self._wants_map(block):
            assert self._grid is not None
            self._maps.add(subject_map(q, k, self.cache.subject_positions, self._grid, self.cache.map_chunk_rows))

    def background(self, block: int) -> torch.Tensor | None:
        """bool [B, Nv]: video tokens that take the anchor-attention result (neither subject mask set)."""
        if not self.cache.use_subject_mask:
            return None
        if self._background is None:
            cache = self.cache
            if self.branch == "cond":
                cache._curr_masks.clear()
                cache._curr_masks[self.step] = self._maps.mask()
            elif self.step not in cache._curr_masks:
                raise RuntimeError(f"run the 'cond' branch of step {self.step} before 'uncond': it reuses its subject mask")
            prev = cache._prev_masks[self.step].to(self._device)
            self._background = torch.bitwise_or(prev, cache._curr_masks[self.step].to(self._device)) == 0
        return self._background

    def end(self) -> None:
        """Called by the model after the last block: the anchor's cond branch stores its subject mask."""
        if self.cache.mode == "record" and self._wants_map(0) and self._maps.total is not None:
            self.cache._prev_masks[self.step] = self._maps.mask()
