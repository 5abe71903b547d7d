"""scripts/download_data.py against a local HTTP server with Range support (never the network)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.download_data import DownloadError, download_file, file_url, main

LINE = b'{"text": "' + b"x" * 1011 + b'"}\n'  # 1,024 bytes
FILES = {"/data.jsonl": LINE * 1000, "/small.jsonl": b'{"text": "hi"}\n',
         "/sft.jsonl": b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>"}
LYING = "/short.jsonl"  # announces more bytes than it sends
UNSIZED = {"/sft.jsonl"}  # an error page answered with 200 and no Content-Length


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
        if self.path not in UNSIZED:
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


def test_an_error_page_is_not_saved_and_the_old_file_stays(server, tmp_path):
    old = tmp_path / "sft.jsonl"
    old.write_text('{"conversations": []}\n')
    with pytest.raises(SystemExit, match=r"not JSON lines \(it begins b'<!DOCTYPE html>.*an error page\?.*unchanged"):
        main(["--base_url", url(server), "--out_dir", str(tmp_path), "--force", "sft.jsonl"])
    assert old.read_text() == '{"conversations": []}\n' and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("name", ["../blob.bin", "sub/blob.bin", "..", "a\\b.jsonl"])
def test_a_name_with_a_folder_is_refused(server, tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="refused"):
        main(["--base_url", url(server), "--out_dir", str(out), "small.jsonl", name])
    assert server.requests == [] and not list(tmp_path.rglob("*blob*"))  # refused before anything was fetched


def test_resume_is_offered_only_when_there_is_a_part(tmp_path):
    from tests.test_server import free_port

    with pytest.raises(DownloadError) as failed:  # nothing listens there: not one byte arrived
        download_file(f"http://127.0.0.1:{free_port()}/data.jsonl", tmp_path / "data.jsonl", retries=0)
    assert "resume" not in str(failed.value) and not list(tmp_path.iterdir())


def test_a_lora_name_minimind_does_not_publish_gets_no_download_hint(tmp_path, monkeypatch, capsys):
    import dataset.files as lm
    from trainer.train_lora import parse

    monkeypatch.setattr(lm, "DATA_DIR", tmp_path)
    for name, published in (("medical", True), ("mine", False)):
        with pytest.raises(SystemExit):
            parse(["--device", "cpu", "--lora_name", name])
        err = capsys.readouterr().err
        assert (f"download_data.py lora_{name}.jsonl" in err) == published, err
        assert (f"MiniMind publishes no lora_{name}.jsonl" in err) != published and "--data_path" in err


def test_a_model_folder_downloads_every_file_its_hub_lists(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", url(server))
    repo = "/internlm/internlm2-1_8b-reward"
    listing = {"siblings": [{"rfilename": n} for n in (".gitattributes", "config.json", "modeling_internlm2.py")]}
    monkeypatch.setitem(FILES, f"/api/models{repo}", json.dumps(listing).encode())
    monkeypatch.setitem(FILES, f"{repo}/resolve/main/config.json", b'{"auto_map": {}}')
    monkeypatch.setitem(FILES, f"{repo}/resolve/main/modeling_internlm2.py", b"# remote code\n")
    main(["internlm2-1_8b-reward", "--source", "hf", "--out_dir", str(tmp_path)])
    folder = tmp_path / "internlm2-1_8b-reward"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "modeling_internlm2.py"]
    assert (folder / "modeling_internlm2.py").read_bytes() == b"# remote code\n"
    fetched = len(server.requests)
    main(["internlm2-1_8b-reward", "--source", "hf", "--out_dir", str(tmp_path)])  # again: only the list is asked
    assert len(server.requests) == fetched + 1 and "exists, skipped" in capsys.readouterr().out
    listing["siblings"].append({"rfilename": "../escape.py"})
    monkeypatch.setitem(FILES, f"/api/models{repo}", json.dumps(listing).encode())
    with pytest.raises(SystemExit, match="outside the repository folder"):
        main(["internlm2-1_8b-reward", "--source", "hf", "--out_dir", str(tmp_path), "--force"])
    assert not (tmp_path / "escape.py").exists()
    main(["--list"])
    assert "internlm2-1_8b-reward" in capsys.readouterr().out
