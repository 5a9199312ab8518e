"""The on-disk cache of preprocessed cases: one folder per case, arrays stored uncompressed and read lazily.

An entry is a folder `<kind>/<case>-<key>/` holding one `.npy` file per array and `meta.json`. Arrays are
opened memory-mapped, so a training patch or a validation case reads only what it needs and nothing keeps
every case's voxels in memory. The key hashes the cache version, the preprocessing settings and the source
files (path, size, modification time), so a changed file or setting makes a new entry.

Concurrency and crashes: an entry is built in a private temporary folder beside its final place and moved
there with one atomic rename. Two processes building the same entry at once both succeed; the first rename
wins and the other process discards its copy. A half-written entry therefore never has the final name;
leftover temporary folders of killed builds are removed when they are older than an hour. On opening, each
array's file size is checked against the size that `meta.json` records, so a truncated or damaged entry is
rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CACHE_VERSION = 2  # 1: one .npz per case, read whole; 2: a folder of memory-mapped .npy files
META = "meta.json"
STALE_SECONDS = 3600


def fingerprint(paths: Sequence[Path]) -> list[str]:
    """Path, size and modification time of each source file: a changed file changes the cache key."""
    return [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(paths)]


def entry_folder(
    cache_dir: str | Path, kind: str, case_id: str, params: dict, sources: Sequence[Path]
) -> Path:
    """Where the entry for a case built with `params` from `sources` lives."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, params, fingerprint(sources)]).encode()).hexdigest()
    return Path(cache_dir) / kind / f"{case_id}-{digest[:20]}"


def open_entry(folder: Path) -> dict | None:
    """The metadata of a complete entry, or None when it is missing, of another version or damaged."""
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        for name, size in meta["arrays"].items():
            if (folder / f"{name}.npy").stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


Layout = tuple[int, str, tuple[int, ...]]  # an .npy file's data offset in bytes, dtype and shape


def array_layout(folder: Path, name: str) -> Layout:
    """Where an entry's array starts in its .npy file, its dtype and its shape, read from the header."""
    with open(folder / f"{name}.npy", "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(file)
        if fortran_order:
            raise ValueError(f"{folder / name}.npy is in Fortran order; cache entries are written in C order")
        return file.tell(), dtype.str, tuple(shape)


def read_array(folder: Path, name: str, layout: Layout) -> np.ndarray:
    """One array of an entry, memory-mapped read-only: pages are read from disk only when touched.

    The array's `array_layout`, read once, spares parsing the header again: opening is then a few times
    cheaper, which matters when every training patch opens its case.
    """
    offset, dtype, shape = layout
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(folder / f"{name}.npy", dtype=dtype, mode="r", offset=offset, shape=shape)


def _remove_stale_builds(parent: Path) -> None:
    now = time.time()
    for leftover in parent.glob(".building-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def write_entry(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Store an entry atomically and return its metadata (another process's, if it finished first)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder.parent)
    building = Path(tempfile.mkdtemp(prefix=f".building-{folder.name}-", dir=folder.parent))
    try:
        sizes = {}
        for name, array in arrays.items():
            np.save(building / f"{name}.npy", np.ascontiguousarray(array))
            sizes[name] = (building / f"{name}.npy").stat().st_size
        meta = {**meta, "version": CACHE_VERSION, "arrays": sizes}
        (building / META).write_text(json.dumps(meta))
        if _placed(building, folder):
            return meta
        winner = open_entry(folder)  # another process's entry, renamed in first: it stands
        if winner is not None:
            return winner
        _discard(folder)  # damaged (or of another version): replaced by this build
        if _placed(building, folder):
            return meta
        winner = open_entry(folder)
        if winner is None:
            raise OSError(f"could not store the cache entry {folder}: a damaged entry is in the way")
        return winner
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)


def _placed(building: Path, folder: Path) -> bool:
    """Rename a finished build onto its entry folder; False when a folder is already there."""
    try:
        os.rename(building, folder)
    except OSError:
        return False
    return True


def _discard(folder: Path) -> None:
    """Move a damaged entry out of the way first (atomic), then delete it."""
    trash = folder.with_name(f".building-discarded-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def cached(folder: Path, build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> dict:
    """The metadata of the entry at `folder`, building and storing it first when it is not complete."""
    meta = open_entry(folder)
    if meta is not None:
        return meta
    arrays, meta = build()
    return write_entry(folder, arrays, meta)
