"""scripts/download_data.py against a local HTTP server with Range support (never the network)."""

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.download_data import DownloadError, download_file, file_url, main

FILES = {"/data.jsonl": bytes(range(256)) * 4000, "/small.jsonl": b'{"text": "hi"}\n'}
LYING = "/short.jsonl"  # announces more bytes than it sends


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = FILES.get(self.path, FILES["/data.jsonl"] if self.path == LYING else None)
        if body is None:
            return self.send_error(404)
        start = 0
        if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) and self.server.ranges:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        sent = body[start:] if self.path != LYING else body[start:len(body) // 2]
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.ranges = [], True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(httpd, name=""):
    return f"http://127.0.0.1:{httpd.server_address[1]}{name}"


def test_download_via_cli(server, tmp_path, capsys):
    main(["--base_url", url(server), "--out_dir", str(tmp_path), "data.jsonl", "small.jsonl"])
    assert (tmp_path / "data.jsonl").read_bytes() == FILES["/data.jsonl"]
    assert (tmp_path / "small.jsonl").read_bytes() == FILES["/small.jsonl"]
    assert not list(tmp_path.glob("*.part"))
    main(["--base_url", url(server), "--out_dir", str(tmp_path), "data.jsonl"])  # present: skipped
    assert "exists, skipped" in capsys.readouterr().out and len(server.requests) == 2


def test_resume_from_part(server, tmp_path):
    body = FILES["/data.jsonl"]
    (tmp_path / "data.jsonl.part").write_bytes(body[:12345])
    download_file(url(server, "/data.jsonl"), tmp_path / "data.jsonl")
    assert (tmp_path / "data.jsonl").read_bytes() == body
    assert server.requests == [("/data.jsonl", "bytes=12345-")]


def test_complete_part_and_server_without_range(server, tmp_path):
    body = FILES["/data.jsonl"]
    (tmp_path / "a.jsonl.part").write_bytes(body)  # finished before the rename: the server answers 416
    download_file(url(server, "/data.jsonl"), tmp_path / "a.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == body
    server.ranges = False  # a server that ignores Range sends everything: start over, don't append
    (tmp_path / "b.jsonl.part").write_bytes(b"junk")
    download_file(url(server, "/data.jsonl"), tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_bytes() == body


def test_size_mismatch(server, tmp_path, monkeypatch):
    monkeypatch.setattr("scripts.download_data.time.sleep", lambda s: None)
    with pytest.raises(DownloadError, match="expected 7"):
        download_file(url(server, "/small.jsonl"), tmp_path / "s.jsonl", expected_size=7)
    assert not (tmp_path / "s.jsonl").exists()
    # a connection that ends early: retried (resuming), then a clear error; the .part stays for later
    with pytest.raises(DownloadError, match=r"of 1024000 bytes.*resume"):
        download_file(url(server, LYING), tmp_path / "short.jsonl", retries=1)
    assert not (tmp_path / "short.jsonl").exists() and (tmp_path / "short.jsonl.part").stat().st_size > 0
    assert server.requests[-1][1] is not None  # the retry asked for the rest only


def test_not_found_and_urls(server, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="404"):
        main(["--base_url", url(server), "--out_dir", str(tmp_path), "nope.jsonl"])
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert file_url("dpo.jsonl", "hf") == \
        "https://huggingface.co/datasets/jingyaogong/minimind_dataset/resolve/main/dpo.jsonl"
    assert file_url("dpo.jsonl") == \
        "https://www.modelscope.cn/datasets/gongjy/minimind_dataset/resolve/master/dpo.jsonl"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert file_url("dpo.jsonl", "hf").startswith("https://hf-mirror.com/datasets/")
    assert file_url("x.pth", repo="gongjy/minimind-3-pytorch", repo_type="model") == \
        "https://www.modelscope.cn/models/gongjy/minimind-3-pytorch/resolve/master/x.pth"


def test_list(capsys):
    main(["--list"])
    out = capsys.readouterr().out
    assert "sft_t2t_mini.jsonl" in out and "pretrain_hq.jsonl" in out and "1.6 GB" in out
