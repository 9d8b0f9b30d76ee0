"""Where the anchor's background K/V entries live between the anchor and the base segments: device, host, disk.

:class:`KVShareCache` hands every (step, branch, block) entry, a tuple of tensors, to a :class:`KVStore` and asks
for it back on the device when a base segment reaches that block. :class:`TieredStore` fills the device first,
then (pinned) host memory, then raw files on a local disk, up to a byte budget per tier, and reads ahead of use:

- host entries are copied to the device on a side CUDA stream ``lookahead`` entries before they are needed;
- disk entries are read by a background thread into host buffers ``lookahead`` entries ahead, then copied.

Bytes are moved verbatim (a bf16 tensor is written and read as its raw bytes), so every tier returns exactly the
tensor that was stored. Nothing here knows the model; sizes and budgets come from the caller's plan
(``posegen_cli.longvideo.memory.plan_kv``).
"""

from __future__ import annotations

import concurrent.futures
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

Key = tuple[int, str, int]
"""(step, branch, block) of one entry."""
Tier = Literal["gpu", "host", "disk"]
TIERS: tuple[Tier, ...] = ("gpu", "host", "disk")


class KVStore(Protocol):
    """What :class:`KVShareCache` needs from a storage backend."""

    def put(self, key: Key, tensors: tuple[torch.Tensor, ...]) -> None:
        """Keep ``tensors`` (read-only afterwards) under ``key``."""
        ...

    def prefetch(self, key: Key, device: torch.device) -> None:
        """Start moving ``key`` towards ``device`` (no-op when absent, already there or in flight)."""
        ...

    def get(self, key: Key, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The entry on ``device``, bit-identical to what was put; raises KeyError when absent."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def keys(self) -> Iterable[Key]: ...

    @property
    def nbytes(self) -> int: ...

    def tier_bytes(self) -> dict[str, int]:
        """Bytes held per tier."""
        ...

    def sync(self) -> None:
        """Wait until every write of :meth:`put` has landed (before the first read)."""
        ...

    def clear(self) -> None: ...


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Entry:
    tier: Tier
    tensors: tuple[torch.Tensor, ...] | None
    """The tensors (device or host tier), or None for disk entries."""
    meta: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    path: Path | None = None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bf16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class TieredStore:
    """Entries on the device up to ``gpu_bytes``, then host memory up to ``host_bytes``, then files in ``disk_dir``.

    ``gpu_bytes``/``host_bytes`` None means unlimited, 0 skips the tier; ``disk_dir`` None means no disk tier (an
    entry that fits nowhere raises MemoryError). "gpu" is wherever the recorded tensors already are (the CPU in CPU
    runs, so it is the tests' stand-in for the GPU). Host memory is pinned when the tensors come from CUDA. Disk
    files go into a fresh subfolder of ``disk_dir`` that :meth:`clear` removes. ``lookahead`` is honoured by the
    caller's prefetch order; the store keeps every started read until :meth:`get` takes it.
    """

    def __init__(
        self, gpu_bytes: int | None = None, host_bytes: int | None = 0, disk_dir: str | Path | None = None
    ) -> None:
        self.capacity: dict[Tier, int | None] = {"gpu": gpu_bytes, "host": host_bytes, "disk": None if disk_dir else 0}
        self.used: dict[Tier, int] = {tier: 0 for tier in TIERS}
        self._disk_root = Path(disk_dir) if disk_dir is not None else None
        self._disk_dir: Path | None = None
        self._entries: dict[Key, _Entry] = {}
        self._inflight: dict[Key, tuple[torch.Tensor, ...]] = {}
        self._reads: dict[Key, concurrent.futures.Future[tuple[torch.Tensor, ...]]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> Iterable[Key]:
        return self._entries.keys()

    @property
    def nbytes(self) -> int:
        return sum(self.used.values())

    def tier_bytes(self) -> dict[str, int]:
        return dict(self.used)

    def tier_of(self, key: Key) -> Tier:
        return self._entries[key].tier

    def _pick_tier(self, size: int) -> Tier:
        for tier in TIERS:
            cap = self.capacity[tier]
            if cap is None or self.used[tier] + size <= cap:
                return tier
        raise MemoryError(f"a {size / 1024**2:.1f} MiB K/V entry fits in no tier (used {self.used}, capacity {self.capacity})")

    def put(self, key: Key, tensors: tuple[torch.Tensor, ...]) -> None:
        size = _nbytes(tensors)
        tier = self._pick_tier(size)
        meta = tuple((tuple(t.shape), t.dtype) for t in tensors)
        cuda = any(t.device.type == "cuda" for t in tensors)
        if tier == "gpu":
            entry = _Entry("gpu", tensors, meta)
        elif tier == "host":
            host = []
            for t in tensors:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
                buf.copy_(t, non_blocking=cuda)
                host.append(buf)
            entry = _Entry("host", tuple(host), meta)
        else:
            path = self._disk_folder() / f"s{key[0]}_{key[1]}_b{key[2]}.bin"
            with open(path, "wb") as f:
                for t in tensors:
                    f.write(memoryview(_as_bytes(t.detach().cpu()).numpy()))
            entry = _Entry("disk", None, meta, path)
        self._entries[key] = entry
        self.used[tier] += size

    def _disk_folder(self) -> Path:
        if self._disk_dir is None:
            assert self._disk_root is not None
            self._disk_root.mkdir(parents=True, exist_ok=True)
            self._disk_dir = Path(tempfile.mkdtemp(prefix="kv-", dir=self._disk_root))
        return self._disk_dir

    def sync(self) -> None:
        if torch.cuda.is_available() and (self.used["host"] or self._stream is not None):
            torch.cuda.synchronize()

    def _read_file(self, entry: _Entry, pin: bool) -> tuple[torch.Tensor, ...]:
        assert entry.path is not None
        out = []
        with open(entry.path, "rb") as f:
            for shape, dtype in entry.meta:
                buf = torch.empty(shape, dtype=dtype, pin_memory=pin)
                view = memoryview(_as_bytes(buf).numpy())
                if f.readinto(view) != len(view):
                    raise OSError(f"{entry.path}: K/V file is shorter than written (disk full or removed?)")
                out.append(buf)
        return tuple(out)

    def _to_device(self, key: Key, host: tuple[torch.Tensor, ...], device: torch.device) -> None:
        if device.type != "cuda":
            self._inflight[key] = tuple(t.to(device) for t in host)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            self._inflight[key] = tuple(t.to(device, non_blocking=True) for t in host)

    def prefetch(self, key: Key, device: torch.device) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.tier == "gpu" or key in self._inflight or key in self._reads:
            return
        if entry.tier == "host":
            assert entry.tensors is not None
            self._to_device(key, entry.tensors, device)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-read")
        self._reads[key] = self._pool.submit(self._read_file, entry, device.type == "cuda")

    def get(self, key: Key, device: torch.device) -> tuple[torch.Tensor, ...]:
        entry = self._entries[key]
        if entry.tier == "gpu":
            assert entry.tensors is not None
            return entry.tensors
        if key in self._reads:
            self._to_device(key, self._reads.pop(key).result(), device)
        elif key not in self._inflight:
            self.prefetch(key, device)
            if key in self._reads:
                self._to_device(key, self._reads.pop(key).result(), device)
        tensors = self._inflight.pop(key)
        if device.type == "cuda" and self._stream is not None:
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._stream)
            for t in tensors:
                t.record_stream(current)
        return tensors

    def clear(self) -> None:
        for future in self._reads.values():
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._reads.clear()
        self._inflight.clear()
        self._entries.clear()
        self.used = {tier: 0 for tier in TIERS}
        if self._disk_dir is not None:
            shutil.rmtree(self._disk_dir, ignore_errors=True)
            self._disk_dir = None
