"""Each release checkpoint converted once into a merged, memory-mappable diffusers folder, keyed by its source files.

A job used to read both release folders (66 GB of ``.bin`` shards), compare them tensor by tensor, keep a 33 GB host
copy and merge 14 B LoRA parameters on the CPU. Here the first job converts each folder with
:func:`~posegen_cli.models.convert.convert_checkpoint`'s exact merge and keeps the result under the posegen cache:

- ``<cache>/converted/<folder name>-<key>/``: ``config.json`` + sharded safetensors (bf16 by default), loadable by
  ``PoseGenTransformer3DModel.from_pretrained`` straight onto the device through safetensors' memory map;
- ``digests.json`` beside them: a BLAKE2b digest per tensor, so two converted variants are compared by digest
  instead of by reading 66 GB.

The key hashes the resolved source folder, every source file's name, size and modification time, the dtype and
:data:`CONVERTER_VERSION`: a re-downloaded or edited shard gives a new key, and the stale copy is removed when the
new one is written. Hashing names and times rather than 33 GB of contents keeps the check instant; a change that
keeps a file's size and time (rare outside deliberate tampering) is not seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import torch

from posegen_cli.cache import cache_root
from posegen_cli.fsutil import atomic_dir
from posegen_cli.models.convert import CONFIG_NAME, load_release_model
from posegen_cli.report import Reporter

CONVERTER_VERSION = 1
"""Bump when the conversion's output changes, so every cached copy is rebuilt."""
DIGESTS_NAME = "digests.json"


def source_key(folder: str | Path, dtype: torch.dtype) -> str:
    """20 hex digits naming the release ``folder``'s current files (name, size, mtime), ``dtype`` and the converter."""
    folder = Path(folder).resolve()
    h = hashlib.sha256(f"{folder}\n{dtype}\n{CONVERTER_VERSION}\n".encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and (p.name == CONFIG_NAME or p.suffix == ".bin")):
        stat = path.stat()
        h.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE2b of a tensor's dtype, shape and raw bytes (bf16 included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def converted_checkpoint(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, *, root: str | Path | None = None, reporter: Reporter | None = None
) -> Path:
    """The converted copy of release ``folder`` under ``root`` (default ``<posegen cache>/converted``), made if needed.

    Reused as long as the source files are unchanged; otherwise converted again (merge exactly as the release) and
    the older copies of the same folder removed. Raises what :func:`load_release_model` raises for bad checkpoints.
    """
    folder = Path(folder)
    base = Path(root) if root is not None else cache_root() / "converted"
    target = base / f"{folder.name}-{source_key(folder, dtype)}"
    if (target / DIGESTS_NAME).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    # several processes of one machine (Ray workers) may start at once: one converts, the others wait and reuse it
    with open(base / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DIGESTS_NAME).is_file():
            return target
        if reporter is not None:
            reporter.info(f"converting {folder} once into {target} (later jobs load it directly)")
        model = load_release_model(folder, dtype, reporter)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
            digests = {name: tensor_digest(t) for name, t in model.state_dict().items()}
            (tmp / DIGESTS_NAME).write_text(json.dumps(digests, indent=0, sort_keys=True))
    for stale in base.glob(f"{folder.name}-*"):
        if stale != target and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return target


def conversion_fits(folder: str | Path, root: str | Path | None = None) -> bool:
    """Whether the disk under ``root`` has room for a converted copy of ``folder``: at most its shards' size, + 1 GiB."""
    folder = Path(folder)
    base = Path(root) if root is not None else cache_root() / "converted"
    needed = sum(p.stat().st_size for p in folder.glob("*.bin")) + 1024**3
    probe = base
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free >= needed


def read_digests(converted: str | Path) -> dict[str, str]:
    return json.loads((Path(converted) / DIGESTS_NAME).read_text())
