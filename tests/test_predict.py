"""``cifar100 predict`` and image reading: every format and mode, and clean per-file errors."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar100.cli import main
from cifar100.data.images import ImageError, read_image

SAMPLES = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]
CLASS_NAMES = {f"class_{i:02d}" for i in range(100)}  # the fake data set's names


def predict_json(capsys, *args) -> tuple[int, list[dict], list[str]]:
    code = main(["predict", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err.strip().splitlines()


def assert_top(entry: dict, k: int = 5) -> None:
    names = [t["class"] for t in entry["top"]]
    probs = [t["probability"] for t in entry["top"]]
    assert len(names) == k and len(set(names)) == k and set(names) <= CLASS_NAMES
    assert probs == sorted(probs, reverse=True)
    assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    assert "error" not in entry


def test_predict_sample_photos(tiny_run, shared_dir, capsys):
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]
    code, results, errors = predict_json(capsys, *photos, "--model", tiny_run)
    assert code == 0 and errors == []
    assert [r["image"] for r in results] == [str(p) for p in photos]
    for entry in results:
        assert_top(entry)


def test_predict_text_output_and_top_k(tiny_run, shared_dir, capsys):
    photo = shared_dir / "samples" / "imagenet" / "cat.png"
    assert main(["predict", str(photo), "--model", str(tiny_run), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 4
    assert all(line.strip().split()[1] in CLASS_NAMES for line in lines[1:])


def _gradient(width: int = 96, height: int = 64) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 128.0),
        ],
        axis=2,
    ).astype(np.uint8)


def _write(folder: Path, kind: str) -> Path:
    rgb = Image.fromarray(_gradient())
    if kind == "rgba-png":
        pixels = np.concatenate([_gradient(), np.full((64, 96, 1), 255, np.uint8)], axis=2)
        pixels[:, :48] = 0  # left half: transparent, hiding black
        return _save(Image.fromarray(pixels), folder / "rgba.png")
    writers = {
        "la-png": lambda: _save(rgb.convert("LA"), folder / "la.png"),
        "l-png": lambda: _save(rgb.convert("L"), folder / "l.png"),
        "1-bit-png": lambda: _save(rgb.convert("1"), folder / "one.png"),
        "p-png": lambda: _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), folder / "p.png"),
        "p-transparent-gif": lambda: _save(rgb.convert("P"), folder / "t.gif", transparency=0),
        "cmyk-jpeg": lambda: _save(rgb.convert("CMYK"), folder / "cmyk.jpg", quality=95),
        "rgb-jpeg": lambda: _save(rgb, folder / "rgb.jpg", quality=95),
        "i16-png": lambda: _save(
            Image.fromarray((np.linspace(0, 65535, 64 * 96).reshape(64, 96)).astype(np.uint16)),
            folder / "g.png",
        ),
        "webp": lambda: _save(rgb, folder / "x.webp", lossless=True),
        "bmp": lambda: _save(rgb, folder / "x.bmp"),
        "tiff-float": lambda: _save(
            Image.fromarray(np.full((20, 30), 0.5, np.float32)), folder / "f.tiff"
        ),
        "huge-aspect": lambda: _save(
            Image.fromarray(np.zeros((3, 4000, 3), np.uint8) + 77), folder / "wide.png"
        ),
        "tiny-1x1": lambda: _save(Image.new("RGB", (1, 1), (10, 200, 30)), folder / "dot.png"),
    }
    return writers[kind]()


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


KINDS = [
    "rgba-png",
    "la-png",
    "l-png",
    "1-bit-png",
    "p-png",
    "p-transparent-gif",
    "cmyk-jpeg",
    "rgb-jpeg",
    "i16-png",
    "webp",
    "bmp",
    "tiff-float",
    "huge-aspect",
    "tiny-1x1",
]


@pytest.mark.parametrize("kind", KINDS)
def test_read_image_any_mode_and_format(tmp_path, kind):
    image = read_image(_write(tmp_path, kind))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_read_image_converts_colour_faithfully(tmp_path):
    rgb = read_image(_write(tmp_path, "bmp"))
    # The centre square of the gradient: blue is flat 128, red grows left to right.
    assert torch.allclose(rgb[2], torch.full((32, 32), 128 / 255), atol=1 / 255)
    assert float(rgb[0, :, -1].mean()) > float(rgb[0, :, 0].mean()) + 0.3
    assert torch.allclose(read_image(_write(tmp_path, "cmyk-jpeg")), rgb, atol=0.05)
    assert torch.allclose(read_image(_write(tmp_path, "webp")), rgb, atol=1e-6)
    grey = read_image(_write(tmp_path, "l-png"))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_16_bit_is_scaled_not_clipped(tmp_path):
    image = read_image(_write(tmp_path, "i16-png"))
    assert 0.4 < float(image.mean()) < 0.6  # clipping at 255 would make it nearly all white
    assert float(read_image(_write(tmp_path, "tiff-float")).mean()) == pytest.approx(0.5, 0.01)


def test_transparency_is_composited_on_white(tmp_path):
    image = read_image(_write(tmp_path, "rgba-png"))
    # Transparent black on the left shows as white; the opaque colours on the right.
    assert torch.allclose(image[:, :, :12], torch.ones(3, 32, 12), atol=0.02)
    assert float(image[2, :, -1].mean()) == pytest.approx(128 / 255, abs=0.05)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # stored: red left, blue right
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert float(image[0, :8].mean()) > 0.8 and float(image[2, :8].mean()) < 0.2  # red on top
    assert float(image[2, -8:].mean()) > 0.8  # blue at the bottom


def test_predict_every_kind_in_one_call(tiny_run, tmp_path, capsys):
    paths = [_write(tmp_path, kind) for kind in KINDS]
    code, results, errors = predict_json(capsys, *paths, "--model", tiny_run)
    assert code == 0 and errors == []
    for entry in results:
        assert_top(entry)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes claiming ``width`` x ``height`` 1-bit pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    return path


def _truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="PNG"
    )
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_bad_files_get_one_line_errors_and_the_rest_are_answered(tiny_run, tmp_path, capsys):
    good = _write(tmp_path, "bmp")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    bad = {
        "missing": tmp_path / "missing.png",
        "text": text,
        "truncated": _truncated_png(tmp_path / "cut.png"),
        "bomb": _png_header_only(tmp_path / "bomb.png", 30_000, 30_000),
        "bomb-warning-range": _png_header_only(tmp_path / "bomb2.png", 10_000, 10_000),
    }
    paths = [
        bad["missing"],
        good,
        bad["text"],
        bad["truncated"],
        bad["bomb"],
        bad["bomb-warning-range"],
        good,
    ]
    code, results, errors = predict_json(capsys, *paths, "--model", tiny_run)
    assert code == 1
    assert len(errors) == len(bad)
    for line, path in zip(errors, [p for p in paths if p != good], strict=True):
        assert line.startswith(f"cifar100: error: {path}: ")
    assert "not found" in errors[0] and "not an image" in errors[1]
    assert "truncated" in errors[2] and "decompression bomb" in errors[3]
    assert "decompression bomb" in errors[4]
    assert_top(results[1])
    assert_top(results[6])
    for entry in (results[i] for i in (0, 2, 3, 4, 5)):
        assert entry["top"] == [] and entry["error"].startswith(entry["image"])


def test_pixel_limit_is_configurable(tmp_path):
    path = _write(tmp_path, "bmp")
    with pytest.raises(ImageError, match=r"96x64 is 6,144 pixels, over the limit of 1,000"):
        read_image(path, max_pixels=1000)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        read_image(tmp_path)


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    code = main(["predict", str(_write(tmp_path, "bmp")), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(tmp_path / "nope") in err[0]


def test_predict_each_answers_a_chunk_before_reading_the_next(tiny_run, shared_dir, monkeypatch):
    """``cifar100 predict`` prints as it goes: the first answer comes before the second
    chunk of files is even read."""
    from cifar100.deploy import classifier

    read = []
    monkeypatch.setattr(classifier, "CHUNK", 1)
    monkeypatch.setattr(
        classifier, "read_image", lambda path: read.append(path) or read_image(path)
    )
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES[:2]]
    answers = classifier.load_model(tiny_run).predict_each(photos, top=3)
    assert next(answers).image == str(photos[0]) and read == [photos[0]]
    assert next(answers).image == str(photos[1]) and read == photos
