"""Download MiniMind's dataset files into dataset/ (resumable, size-checked).  下载 MiniMind 数据集。

    python scripts/download_data.py --list                                     # what there is
    python scripts/download_data.py pretrain_t2t_mini.jsonl sft_t2t_mini.jsonl # the recommended start
    python scripts/download_data.py dpo.jsonl --source hf                      # from Hugging Face instead
    python scripts/download_data.py out.pth --repo gongjy/minimind-3-pytorch --repo_type model --out_dir out
    python scripts/download_data.py internlm2-1_8b-reward                       # a model folder -> out/<name>/

Sources: ModelScope `gongjy/minimind_dataset` (default, fast in China) or Hugging Face
`jingyaogong/minimind_dataset` (honours HF_ENDPOINT, e.g. https://hf-mirror.com). An interrupted download
leaves `<file>.part`; running the same command again resumes it with an HTTP Range request. What arrives is checked
before it replaces anything: its size when the server announces one, and a .jsonl must start with a line of JSON (a
hub can answer 200 with an HTML error page). Names are file names: no folders, no '..'. The URL patterns
below follow the two hubs' documented "resolve" links; they were not tested against the live hubs from here.

A model folder (MODEL_FOLDERS, e.g. MiniMind's reward model) is downloaded whole: the hub's file list of the repository
(its API: Hugging Face's /api/models/<repo>, ModelScope's /api/v1/models/<repo>/repo/files), then each file as above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from dataset.files import DATA_DIR, KNOWN_FILES
from model.cli import HelpFormatter
from model.files import OUT_DIR

DEFAULT_REPOS = {"modelscope": "gongjy/minimind_dataset", "hf": "jingyaogong/minimind_dataset"}
CHUNK = 1 << 20
FIRST_LINE_LIMIT = 16 << 20  # a .jsonl whose first line is longer than this is no data file of ours
# Whole model repositories the stages use: name -> (repository per source, size, purpose)
MODEL_FOLDERS = {
    "internlm2-1_8b-reward": ({"modelscope": "Shanghai_AI_Laboratory/internlm2-1_8b-reward",
                               "hf": "internlm/internlm2-1_8b-reward"}, "~4 GB",
                              "reward model for GRPO/PPO (--reward_model_path out/internlm2-1_8b-reward; MiniMind's)"),
}

class DownloadError(RuntimeError):
    pass


def file_url(name: str, source: str = "modelscope", repo: str | None = None, repo_type: str = "dataset",
             base_url: str | None = None) -> str:
    """The download URL of one file of a hub repository (or `<base_url>/<name>`)."""
    if base_url:
        return f"{base_url.rstrip('/')}/{name}"
    repo = repo or DEFAULT_REPOS[source]
    if source == "hf":
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        prefix = "datasets/" if repo_type == "dataset" else ""
        return f"{endpoint}/{prefix}{repo}/resolve/main/{name}"
    kind = "datasets" if repo_type == "dataset" else "models"
    return f"https://www.modelscope.cn/{kind}/{repo}/resolve/master/{name}"


def repo_files(repo: str, source: str) -> list[str]:
    """The files of a model repository on the hub, from its API (Hugging Face honours HF_ENDPOINT)."""
    if source == "hf":
        url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/api/models/{repo}"
    else:
        url = f"https://www.modelscope.cn/api/v1/models/{repo}/repo/files?Recursive=true"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "minimind-lab"}),
                                    timeout=60) as response:
            listing = json.load(response)
        files = [f["rfilename"] for f in listing["siblings"]] if source == "hf" else \
            [f["Path"] for f in listing["Data"]["Files"] if f.get("Type") == "blob"]
    except (urllib.error.URLError, HTTPException, OSError, ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"cannot list the files of {repo} ({url}): {type(e).__name__}: {e}") from None
    unsafe = [f for f in files if f.startswith("/") or ".." in Path(f).parts]
    if unsafe:
        raise DownloadError(f"{url} lists files outside the repository folder: {unsafe[:3]}")
    return [f for f in files if f != ".gitattributes"]


def download_folder(name: str, source: str, out_dir: Path, force: bool, retries: int) -> Path:
    """Every file of the model repository MODEL_FOLDERS[name] into out_dir/name (present files are kept)."""
    repo = MODEL_FOLDERS[name][0][source]
    folder = out_dir / name
    for file in repo_files(repo, source):
        dest = folder / file
        if dest.exists() and not force:
            print(f"[download] {dest} exists, skipped")
            continue
        url = file_url(file, source, repo, "model")
        print(f"[download] {url} -> {dest}")
        download_file(url, dest, retries=retries)
    return folder


def _total_size(response) -> int | None:
    """Full file size from Content-Range (a 206 answer) or Content-Length (a 200 answer)."""
    content_range = response.headers.get("Content-Range")
    if content_range and (m := re.search(r"/(\d+)$", content_range)):
        return int(m.group(1))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _fetch_into(url: str, part: Path, expected_size: int | None, timeout: float) -> int | None:
    """Append the rest of `url` to `part` (starting over if the server ignores Range); return the full size."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "minimind-lab"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is complete, or stale if larger
            total = _total_size(e)
            if total == have:
                return total
            part.unlink()
            return _fetch_into(url, part, expected_size, timeout)
        hint = " (check the name with --list, or try the other --source)" if e.code == 404 else ""
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}{hint}") from None
    with response:
        total = _total_size(response)
        if response.status != 206:
            have = 0  # the server sent the whole file
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: the server announces {total} bytes, expected {expected_size}")
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                            unit_divisor=1024, desc=part.name[:-5]) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def download_file(url: str, dest: Path, expected_size: int | None = None, retries: int = 3,
                  timeout: float = 60) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming a previous .part; verify the size, then rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            total = _fetch_into(url, part, expected_size, timeout)
        except (urllib.error.URLError, HTTPException, OSError) as e:
            total, error = None, e
        else:
            have = part.stat().st_size
            if total is None or have == total:
                if expected_size is not None and have != expected_size:
                    part.unlink()
                    raise DownloadError(f"{url}: got {have} bytes, expected {expected_size}")
                check_content(part, dest, url)
                os.replace(part, dest)
                return dest
            if have > total:
                part.unlink()
                raise DownloadError(f"{url}: got {have} bytes, more than the announced {total}; removed {part}")
            error = f"connection ended at {have} of {total} bytes"
        if attempt < retries:
            print(f"[download] {error}; retrying ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(min(2 ** attempt, 10))
    resume = f". Run the same command again to resume from {part}" if part.exists() else ""
    raise DownloadError(f"{url}: {error}{resume}")


def check_content(part: Path, dest: Path, url: str) -> None:
    """Refuse (and delete) a download that is not what its name says: a .jsonl must start with a line of JSON. A
    server can answer 200 with an HTML error page of no announced size; ``dest``, if there, stays as it was."""
    if dest.suffix != ".jsonl":
        return
    with open(part, "rb") as f:
        first = f.readline(FIRST_LINE_LIMIT)
    try:
        json.loads(first)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        part.unlink()
        kept = f"; {dest} is unchanged" if dest.exists() else ""
        raise DownloadError(f"{url}: what arrived is not JSON lines (it begins {first[:60]!r}): an error page? "
                            f"Deleted it{kept}") from None


def check_name(name: str) -> None:
    """A file name is all it may be: with a folder or '..' in it, the file would land outside --out_dir."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        sys.exit(f"[download] refused {name!r}: give a file name, without folders or '..' (--out_dir says where)")


def print_list() -> None:
    print(f"{'file':26} {'size':>7}  purpose")
    for name, (size, purpose) in KNOWN_FILES.items():
        print(f"{name:26} {size:>7}  {purpose}")
    print(f"\n{'model folder':26} {'size':>7}  purpose")
    for name, (_, size, purpose) in MODEL_FOLDERS.items():
        print(f"{name:26} {size:>7}  {purpose}")
    print("\nStart with: pretrain_t2t_mini.jsonl sft_t2t_mini.jsonl dpo.jsonl lora_identity.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="*", help="file names in the repository (see --list)")
    parser.add_argument("--list", action="store_true", help="show the known dataset files and exit")
    parser.add_argument("--source", choices=["modelscope", "hf"], default="modelscope")
    parser.add_argument("--repo", help="another repository, e.g. gongjy/minimind-3-pytorch for weights")
    parser.add_argument("--repo_type", choices=["dataset", "model"], default="dataset")
    parser.add_argument("--base_url", help="download <base_url>/<file> instead (a mirror; used by the tests)")
    parser.add_argument("--out_dir", type=Path, help="where to put the files (default: dataset/; model folders: out/)")
    parser.add_argument("--force", action="store_true", help="download again even if the file exists")
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    if args.list or not args.files:
        print_list()
        return
    for name in args.files:
        check_name(name)
    for name in args.files:
        if name in MODEL_FOLDERS and args.repo is None and args.base_url is None:
            try:
                folder = download_folder(name, args.source, args.out_dir or OUT_DIR, args.force, args.retries)
            except DownloadError as e:
                sys.exit(f"[download] failed: {e}")
            print(f"[download] {folder} is complete")
            continue
        dest = (args.out_dir or DATA_DIR) / name
        if dest.exists() and not args.force:
            print(f"[download] {dest} exists, skipped (--force to download again)")
            continue
        if name not in KNOWN_FILES and args.repo is None and args.base_url is None:
            print(f"[download] {name} is not a known file (see --list); trying anyway", file=sys.stderr)
        url = file_url(name, args.source, args.repo, args.repo_type, args.base_url)
        print(f"[download] {url} -> {dest}")
        try:
            download_file(url, dest, retries=args.retries)
        except DownloadError as e:
            sys.exit(f"[download] failed: {e}")


if __name__ == "__main__":
    main()
