"""Download path of the data set, offline: a real HTTP server on 127.0.0.1 plays the host.

Each test points ``cifar100.data.cifar.URL``/``MD5`` at the local server; conftest gives every
test an empty private cache ($CIFAR100_CACHE), so what is left behind can be checked.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_fake_cifar

from cifar100.cli import main
from cifar100.data import cifar
from cifar100.data.cifar import DataError, load_cifar100
from cifar100.runtime.download import DownloadError, extract_tar, fetch


class Host:
    """Routes of the local server: path -> body, and paths whose transfer is cut short."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.requests: list[str] = []
        self.url = ""

    def serve(self, name: str, body: bytes, truncated: bool = False) -> str:
        self.routes[f"/{name}"] = body
        if truncated:
            self.truncated.add(f"/{name}")
        return f"{self.url}/{name}"


@pytest.fixture
def host() -> Iterator[Host]:
    state = Host()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.requests.append(self.path)
            body = state.routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            cut = self.path in state.truncated
            # A cut transfer announces the full length, sends half and hangs up.
            self.send_header("Content-Length", str(len(body) + (4096 if cut else 0)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fake_tarball(tmp_path_factory) -> bytes:
    """A gzipped ``cifar-100-python/`` as the real archive lays it out (1 image per class)."""
    root = write_fake_cifar(tmp_path_factory.mktemp("tarball"), train_per_class=2, test_per_class=1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root / "cifar-100-python", arcname="cifar-100-python")
    return buffer.getvalue()


def md5(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


def publish(
    monkeypatch, host: Host, body: bytes, checksum: str | None = None, truncated: bool = False
) -> str:
    url = host.serve("cifar-100-python.tar.gz", body, truncated)
    monkeypatch.setattr(cifar, "URL", url)
    monkeypatch.setattr(cifar, "MD5", checksum or md5(body))
    return url


def cache() -> Path:
    return cifar.default_cache_dir()


def leftovers() -> list[str]:
    """Everything in the cache folder (hidden partial files included)."""
    folder = cache()
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def closed_url() -> str:
    """A URL on a port nothing listens on: fails at once, like a machine offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


def test_download_into_cache_then_load_from_cache(monkeypatch, host, fake_tarball):
    publish(monkeypatch, host, fake_tarball)
    dataset = load_cifar100()
    assert len(dataset.train) == 200 and len(dataset.test) == 100
    assert dataset.source == cache() / "cifar-100-python"
    assert leftovers() == [
        "cifar-100-python",
        "cifar-100-python/meta",
        "cifar-100-python/test",
        "cifar-100-python/train",
    ]
    # The second load finds the cache and never asks the host again.
    monkeypatch.setattr(cifar, "URL", closed_url())
    assert len(load_cifar100().train) == 200
    assert host.requests == ["/cifar-100-python.tar.gz"]


def test_md5_mismatch_leaves_nothing(monkeypatch, host, fake_tarball):
    publish(monkeypatch, host, fake_tarball, checksum="0" * 32)
    with pytest.raises(DataError) as caught:
        load_cifar100()
    message = str(caught.value)
    assert_one_line(message)
    assert "md5" in message and md5(fake_tarball) in message and cifar.URL in message
    assert leftovers() == []


def test_truncated_transfer_leaves_nothing(monkeypatch, host, fake_tarball):
    publish(monkeypatch, host, fake_tarball, truncated=True)
    with pytest.raises(DataError) as caught:
        load_cifar100()
    assert_one_line(str(caught.value))
    assert "cut short" in str(caught.value) or "IncompleteRead" in str(caught.value)
    assert leftovers() == []


def test_http_error_is_reported(monkeypatch, host):
    monkeypatch.setattr(cifar, "URL", f"{host.url}/missing.tar.gz")
    with pytest.raises(DataError, match="Not Found"):
        load_cifar100()
    assert leftovers() == []


def evil_archive(good: bytes, kind: str, outside: Path) -> bytes:
    """The good archive plus one member that would land outside the target folder."""
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(good), mode="r:gz") as src,
        tarfile.open(fileobj=buffer, mode="w:gz") as tar,
    ):
        for member in src.getmembers():
            tar.addfile(member, src.extractfile(member) if member.isfile() else None)
        payload = b"escaped"
        member = tarfile.TarInfo()
        if kind == "parent":
            member.name = "cifar-100-python/../../evil"
        elif kind == "absolute":
            member.name = str(outside / "evil")
        elif kind == "symlink":
            member.name, member.type, member.linkname = (
                "cifar-100-python/link",
                tarfile.SYMTYPE,
                str(outside),
            )
        else:  # hard link to a file outside
            member.name, member.type, member.linkname = (
                "cifar-100-python/hard",
                tarfile.LNKTYPE,
                "../../evil",
            )
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink"])
def test_unsafe_member_refused_and_nothing_written(monkeypatch, host, fake_tarball, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    publish(monkeypatch, host, evil_archive(fake_tarball, kind, outside))  # md5 matches
    with pytest.raises(DataError) as caught:
        load_cifar100()
    assert_one_line(str(caught.value))
    assert "unsafe archive member" in str(caught.value)
    assert leftovers() == []
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == before
    assert not (tmp_path.parent / "evil").exists()


def test_not_an_archive_leaves_nothing(monkeypatch, host):
    publish(monkeypatch, host, os.urandom(5000))
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_cifar100()
    assert leftovers() == []


def test_archive_without_the_data_set(monkeypatch, host):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("README")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    publish(monkeypatch, host, buffer.getvalue())
    with pytest.raises(DataError, match="holds no cifar-100-python/meta"):
        load_cifar100()


def test_offline_names_the_three_ways(monkeypatch):
    monkeypatch.setattr(cifar, "URL", closed_url())
    with pytest.raises(DataError) as caught:
        load_cifar100()
    message = str(caught.value)
    assert_one_line(message)
    for way in ("--data-dir", "CIFAR100_DATA", str(cache()), cifar.URL, cifar.MD5):
        assert way in message
    assert "download failed" in message
    assert leftovers() == []


def test_no_download_names_the_three_ways_without_trying(monkeypatch, host, fake_tarball):
    publish(monkeypatch, host, fake_tarball)
    with pytest.raises(DataError, match="one of three ways"):
        load_cifar100(download=False)
    assert host.requests == []


def test_cli_offline_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(cifar, "URL", closed_url())
    assert main(["data", "info", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cifar100: error: CIFAR-100 not found")
    assert captured.err.count("\n") == 1


def test_cli_bad_checksum_one_line_error(monkeypatch, host, fake_tarball, capsys):
    publish(monkeypatch, host, fake_tarball, checksum="f" * 32)
    assert main(["data", "info", "--json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cifar100: error:") and err.count("\n") == 1 and "md5" in err
    assert leftovers() == []


def test_subprocess_offline_exits_nonzero_with_one_line(tmp_path):
    # The real URL, but every request goes through a proxy nobody listens on: offline.
    proxy = closed_url().rsplit("/", 1)[0]
    env = {
        **os.environ,
        "CIFAR100_CACHE": str(tmp_path / "cache"),
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    env.pop("CIFAR100_DATA", None)
    result = subprocess.run(
        [sys.executable, "-m", "cifar100", "data", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("cifar100: error: CIFAR-100 not found")
    assert result.stderr.count("\n") == 1
    assert "cs.toronto.edu" in result.stderr
    assert [p for p in (tmp_path / "cache").rglob("*") if not p.is_dir()] == []


def test_fetch_publishes_only_a_verified_file(host, tmp_path):
    body = b"x" * 3000
    url = host.serve("blob.bin", body)
    dest = tmp_path / "dl" / "blob.bin"
    assert fetch(url, dest, md5=md5(body), progress=False).read_bytes() == body
    with pytest.raises(DownloadError, match="sha256"):
        fetch(url, tmp_path / "dl" / "other.bin", sha256_prefix="0000", progress=False)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def test_extract_tar_replaces_a_stale_folder(tmp_path, fake_tarball):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(fake_tarball)
    target = tmp_path / "target"
    (target / "cifar-100-python").mkdir(parents=True)
    (target / "cifar-100-python" / "stale").write_text("old")
    extract_tar(archive, target)
    assert sorted(p.name for p in (target / "cifar-100-python").iterdir()) == [
        "meta",
        "test",
        "train",
    ]
    assert [p.name for p in target.iterdir()] == ["cifar-100-python"]


TORCHRUN_LOAD = """
import sys
from pathlib import Path
import torch
from cifar100.data import cifar
from cifar100.runtime import distributed
cifar.URL, cifar.MD5 = sys.argv[1], sys.argv[2]
distributed.init(torch.device("cpu"))
images = len(cifar.load_cifar100().train)
Path(sys.argv[3], f"rank{distributed.rank()}").write_text(str(images))
"""


def test_under_torchrun_only_rank_zero_downloads(monkeypatch, host, fake_tarball, tmp_path):
    """Two real processes, one empty cache: one request; rank 1 waits, then reads the cache."""
    url = publish(monkeypatch, host, fake_tarball)
    script = tmp_path / "load.py"
    script.write_text(TORCHRUN_LOAD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(script),
            url,
            md5(fake_tarball),
            str(tmp_path),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["200", "200"]
    assert host.requests == ["/cifar-100-python.tar.gz"]
    assert "cifar-100-python/train" in leftovers()
