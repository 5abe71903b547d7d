"""List the data caches, and with --delete remove the ones that can never be used again.  清理失效的数据缓存。

    python scripts/clean_cache.py                      # every cache under dataset/, the stale ones marked
    python scripts/clean_cache.py --delete             # remove the stale ones (when no training job is running)
    python scripts/clean_cache.py --cache_dir /data/minimind-cache

Pretraining data is tokenised once into `<data dir>/.cache/` (about half the size of the jsonl), SFT/DPO files are
indexed there. A cache is stale when its source file is gone or has changed since, or an older version of this code
built it; nothing deletes those by itself, since a running job may still be reading one. Another tokenizer's cache
of a file is kept: switching back reuses it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataset.cache import USER_CACHE_DIR, cache_files, stale_caches
from dataset.files import DATA_DIR
from model.cli import HelpFormatter


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--cache_dir", action="append",
                   help="a cache folder (default: every .cache folder under dataset/, and ~/.cache/minimind-lab)")
    p.add_argument("--delete", action="store_true", help="remove the stale caches")
    args = p.parse_args(argv)
    folders = [Path(f) for f in args.cache_dir] if args.cache_dir else \
        sorted(DATA_DIR.rglob(".cache")) + [USER_CACHE_DIR] * USER_CACHE_DIR.is_dir()
    freed, stale_seen, listed = 0, False, 0
    for folder in folders:
        stale = dict(stale_caches(folder))
        stale_seen |= bool(stale)
        meta_files = sorted(folder.glob("*.meta.json"))
        if meta_files:
            print(f"{folder}:")
        listed += len(meta_files)
        for meta_file in meta_files:
            files = cache_files(meta_file)
            size = sum(f.stat().st_size for f in files if f.is_file())
            why = stale.get(meta_file)
            print(f"{'STALE' if why else 'ok   '} {size / 2**20:9.1f} MiB  {meta_file.name.removesuffix('.meta.json')}"
                  + (f"  ({why})" if why else ""))
            if why and args.delete:
                try:
                    for f in files:  # the meta file last: while it exists the cache is still listed here
                        f.unlink(missing_ok=True)
                    freed += size
                except OSError as e:  # e.g. Windows, a file still open elsewhere
                    print(f"      could not delete {e.filename}: {e.strerror}; the rest stays listed")
    if not listed:
        print(f"no caches in {', '.join(map(str, folders)) or DATA_DIR}")
    if args.delete:
        print(f"freed {freed / 2**20:.1f} MiB")
    elif stale_seen:
        print("remove the stale ones with --delete (when no training job is running)")


if __name__ == "__main__":
    main()
