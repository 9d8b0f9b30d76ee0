"""Background K/V sharing (PoseGen §2): the anchor segment records, every other base segment replays.

Same outputs as the release, held leaner:
- no dense N×N −∞ mask on the source attention: it only touches rows the fusion throws away (spec §2.5);
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

Use: ``cache = KVShareCache(steps, blocks, subject_positions)``; run the anchor with
``kv_share=cache.view(step, "cond" | "uncond")`` (cond first at every step); ``cache.start_replay()``; run the
other base segments with the same views; ``cache.release()`` when done. A process that did not run the anchor
(another worker) rebuilds the cache from the anchor's inputs with :meth:`KVShareCache.rebuild`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from posegen_cli.models.kv_store import Key, KVStore, TieredStore

Branch = Literal["cond", "uncond"]
KVFormat = Literal["kv", "inputs"]
BRANCH_ORDER = ("cond", "uncond")
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

    def add(self, step: int, branch: str, inputs: dict[str, torch.Tensor | None]) -> None:
        hidden = inputs["hidden_states"]
        assert hidden is not None
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
    re-projected on use); ``recompute_model`` (the transformer) stores neither and re-runs the anchor's forward
    before each base forward at a shared step (``kv_format`` is then "inputs" for the transient entries);
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
        recompute_model: Callable[..., object] | None = None,
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
        """The per-forward handle to pass as ``kv_share``; None at steps that do not share.

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
        with torch.no_grad():
            self.recompute_model(**inputs, kv_share=KVShareView(self, step, branch, recording=True, maps=False))
        self.store.sync()

    def rebuild(self, transformer: Callable[..., object], inputs: AnchorInputs, device: torch.device | str | None = None) -> None:
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
        with torch.no_grad():
            for step, branch in order:
                if step in self.steps:
                    transformer(**inputs.call(step, branch, device), kv_share=KVShareView(self, step, branch, recording=True))  # type: ignore[arg-type]
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

    def _store(self, key: Key, kv: tuple[torch.Tensor, torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.store.put(key, kv if self.kv_format == "kv" else inputs)

    def _prefetch_after(self, key: Key | None, device: torch.device) -> None:
        """Start reading the ``lookahead`` entries that replay reads after ``key`` (from the start when None)."""
        if self.recompute_model is not None or not self._order:
            return
        start = 0 if key is None else self._order.index(key) + 1
        for later in self._order[start : start + self.lookahead]:
            self.store.prefetch(later, device)

    def _fetch(self, key: Key, device: torch.device, project: Projector) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.store:
            raise RuntimeError(f"no anchor K/V for step {key[0]}, branch {key[1]!r}, block {key[2]}")
        entry = self.store.get(key, device)
        self._prefetch_after(key, device)
        if self.kv_format == "kv":
            return entry[0], entry[1]
        return project(entry[0], entry[1])


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
        self._grid: tuple[int, int, int] | None = None
        self._device = torch.device("cpu")
        self._maps = _MapSum()
        self._background: torch.Tensor | None = None

    def begin(self, grid: tuple[int, int, int], device: torch.device, inputs: dict[str, torch.Tensor | None] | None = None) -> None:
        """Called by the model before block 0 with the video token grid (f, h, w), its device and its inputs."""
        self._grid = grid
        self._device = device
        self._maps = _MapSum()
        self._background = None
        cache = self.cache
        if self.recording and self.maps and cache.anchor_inputs is not None and inputs is not None:
            cache.anchor_inputs.add(self.step, self.branch, inputs)
        if not self.recording and cache._order and cache._order[0][:2] == (self.step, self.branch):
            cache._prefetch_after(None, device)

    def _wants_map(self, block: int) -> bool:
        return self.maps and self.cache.maps_needed and self.branch == "cond" and block <= self.cache.max_map_block

    def record_kv(self, block: int, kv: tuple[torch.Tensor, torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep block ``block``'s joint K/V (or, in the "inputs" format, its modulated inputs [a], [a_r])."""
        cache = self.cache
        if self.recording and block in cache.blocks and (cache.recompute_model is None or not self.maps):
            cache._store((self.step, self.branch, block), kv, inputs)

    def source_kv(self, block: int, project: Projector) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The anchor's K/V for ``block``; ``project`` turns stored inputs into K/V (the block's own projections)."""
        if self.recording or block not in self.cache.blocks:
            return None
        return self.cache._fetch((self.step, self.branch, block), self._device, project)

    def add_subject_map(self, block: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if self.recording and not self.maps:
            return
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
        cache = self.cache
        if self.recording and self._wants_map(0) and self._maps.total is not None:
            cache._prev_masks[self.step] = self._maps.mask()
        if not self.recording and cache.recompute_model is not None:
            cache.store.clear()
