"""The on-disk caches of the data files: token streams (pretraining) and line indexes (chat data).

Caches live in `<dir of the data file>/.cache/` (`~/.cache/minimind-lab/` when that folder is read-only), keyed by
the source file (path, size, mtime), the tokenizer and the format version, written atomically and built by one
process while the others (DDP ranks) wait on a file lock.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from dataset.files import nonblank_lines

USER_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minimind-lab"
# Bump a kind's version when its cache files would hold something else for the same source and key (another
# layout, other rows or tokens): older caches then stop matching, are rebuilt, and clean_cache.py lists them.
CACHE_VERSIONS = {"tokens": 1, "lines": 3}
INDEX_FLUSH_ROWS = 1 << 16  # line offsets the indexer holds in RAM before writing them out
NOTED_EXAMPLES = 3  # rows the indexer keeps as examples of those it remarks on


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides token ids (tokenizer.json minus padding/truncation state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # transformers flips these when a caller asks for padding/truncation: they do not change the ids
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def default_cache_dir(source: Path) -> Path:
    """``<data dir>/.cache``, or a folder in the user's cache when the data sits where nobody may write."""
    beside = source.parent / ".cache"
    if os.access(beside if beside.is_dir() else source.parent, os.W_OK):
        return beside
    return USER_CACHE_DIR


def cached(source: Path, cache_dir: str | os.PathLike | None, kind: str, key: dict, parts: list[str],
           build: Callable[[dict[str, Path]], dict]) -> tuple[dict[str, Path], dict, bool]:
    """Return ({part: file}, meta, built_now) for a cache of `source`, building it once if needed.

    `build(tmp_files)` writes every part and returns the metadata. Parts are moved into place with os.replace and
    the meta file goes last, so it marks a complete cache: a crash never leaves one that looks valid. A file lock
    (rather than a torch.distributed barrier, whose NCCL timeout a long build could exceed) makes one process
    build while the other ranks wait, then they all map the same files.
    """
    stat = source.stat()
    key = {**key, "source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "kind": kind, "version": CACHE_VERSIONS[kind]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{source.name}.{kind}.{digest}"
    files = {part: stem.with_name(f"{stem.name}.{part}") for part in parts}
    meta_file = stem.with_name(stem.name + ".meta.json")
    built = False
    with FileLock(str(stem) + ".lock"):
        if not meta_file.is_file():
            tmp = {part: f.with_name(f"{f.name}.tmp{os.getpid()}") for part, f in files.items()}
            try:
                meta = {**build(tmp), "key": key}
                for part, f in files.items():
                    os.replace(tmp[part], f)
                tmp_meta = meta_file.with_name(f"{meta_file.name}.tmp{os.getpid()}")
                tmp_meta.write_text(json.dumps(meta, indent=1))
                os.replace(tmp_meta, meta_file)
                built = True
            finally:
                for f in tmp.values():
                    f.unlink(missing_ok=True)
    return files, json.loads(meta_file.read_text()), built


def stale_caches(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """The caches in ``folder`` that can never be used again, with why: their source file is gone or has changed
    since (size or mtime), or another cache version built them. Another tokenizer's cache of a file is not stale."""
    stale = []
    for meta_file in sorted(Path(folder).glob("*.meta.json")):
        try:
            key = json.loads(meta_file.read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue  # not one of ours
        source = Path(key["source"])
        stat = source.stat() if source.is_file() else None
        current = CACHE_VERSIONS.get(key.get("kind"))
        if key.get("version") != current:
            stale.append((meta_file, f"cache version {key.get('version')} (now {current})"))
        elif stat is None:
            stale.append((meta_file, f"{source} is gone"))
        elif (stat.st_size, stat.st_mtime_ns) != (key["size"], key["mtime_ns"]):
            stale.append((meta_file, f"{source} changed since"))
    return stale


def cache_files(meta_file: Path) -> list[Path]:
    """Every file of the cache that ``meta_file`` describes (its parts, its lock file), the meta file last."""
    stem = meta_file.name.removesuffix(".meta.json")
    return [f for f in sorted(meta_file.parent.glob(glob.escape(stem) + ".*")) if f != meta_file] + [meta_file]


def line_index(tmp: dict[str, Path], source: Path, note: Callable[[bytes], str | None] | None = None) -> dict:
    """Write an int64 (n, 2) array of [byte offset, 1-based line number] of every non-blank line of `source`.

    With `note` (a remark on a raw line, or None), also count the rows it remarks on and keep the first few as
    [line number, remark] in the metadata, so every run can report them without reading the file again."""
    noted: dict[str, Any] = {"noted": 0, "noted_examples": []}

    def rows() -> Iterator[tuple[int, int]]:
        for offset, lineno, raw in nonblank_lines(source, desc=f"indexing {source.name}"):
            if note is not None and (remark := note(raw)):
                noted["noted"] += 1
                if len(noted["noted_examples"]) < NOTED_EXAMPLES:
                    noted["noted_examples"].append([lineno, remark])
            yield offset, lineno

    n_rows, lines = 0, rows()
    with open(tmp["lines"], "wb") as out:
        while block := list(islice(lines, INDEX_FLUSH_ROWS)):  # in blocks: a multi-GB file has millions of rows
            np.array(block, dtype=np.int64).tofile(out)
            n_rows += len(block)
    return {"rows": n_rows, **noted}
