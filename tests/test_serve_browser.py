"""``cifar100 serve`` end to end: the real command on a free localhost port with a tiny run,
driven in headless Chromium (Playwright, with the system's /usr/bin/chromium) and through
Gradio's API (``gradio_client``), then stopped with SIGTERM like any service."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import cifar100
from cifar100.cli import main

CHROMIUM = Path("/usr/bin/chromium")
SAMPLES = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]
# Ceilings, never waits: each wait below ends as soon as its condition holds. On a busy
# 2-core machine importing torch and Gradio, or one request, can take far longer than usual.
START_TIMEOUT_S = 300  # importing torch and Gradio on a busy 2-core CI machine
ANSWER_TIMEOUT_MS = 120_000  # any one step in the browser: launch, load, upload, answer
REQUEST_TIMEOUT_S = 120  # any one request of gradio_client (httpx's own default: 5 s)
STOP_TIMEOUT_S = 120  # SIGTERM to exit
HOST = "127.0.0.1"
MESSAGE = "#message [data-testid=markdown]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"cifar100 serve exited with {server.returncode}: {server.stderr.read()}")
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, min(left, 30))) as response:
                if response.status == 200:
                    return
        except (OSError, http.client.HTTPException):  # not up yet, or a half-started answer
            pass
        time.sleep(0.5)  # the pace of the polling, not a wait for anything
    pytest.fail(f"{url} did not answer within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def server(learned_run, tmp_path_factory):
    """The page at its URL; stopped with SIGTERM afterwards, which must end it cleanly.
    It serves a model whose answers differ between the photos, so that a server that
    prepares images differently from ``cifar100 predict`` (BGR, another resize) shows."""
    port = free_port()
    # The server imports the cifar100 these tests import, whatever PYTHONPATH said.
    source = str(Path(cifar100.__file__).resolve().parents[1])
    path = os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifar100",
            "serve",
            "--model",
            str(learned_run),
            "--port",
            str(port),
        ],
        cwd=tmp_path_factory.mktemp("serve"),  # no runs/ here: only --model can be served
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://{HOST}:{port}/"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)  # a no-op when it already exited
        out, err = process.communicate(timeout=STOP_TIMEOUT_S)
    assert process.returncode == 143, err
    assert out.strip() == url.rstrip("/")  # the one result line: where the page was
    assert err.strip().splitlines()[-1].startswith("cifar100: stopped by SIGTERM")


def bad_files(folder: Path) -> dict[str, Path]:
    text = folder / "notes.jpg"
    text.write_text("a text file renamed .jpg")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    huge = folder / "huge.png"
    huge.write_bytes(png_header(40_000, 40_000))  # 1.6 billion pixels, as the header claims
    return {"not an image Pillow can read": text, "not an image": empty, "too many pixels": huge}


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none: the server must refuse
    it from the header alone (the browser, too, gives up on it at once)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def top5_of_predict(capsys, model: Path, photo: Path) -> list[tuple[str, float]]:
    """``cifar100 predict``'s top five (class, probability), most likely first."""
    assert main(["predict", str(photo), "--model", str(model), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    return [(entry["class"], entry["probability"]) for entry in top]


def test_the_page_in_chromium(server, learned_run, shared_dir, tmp_path, capsys):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install it (apt-get install -y chromium)")
    photo = shared_dir / "samples" / "imagenet" / "cat.png"
    top5 = top5_of_predict(capsys, learned_run, photo)
    best, probability = top5[0]
    expected = f"{best} ({probability:.1%})"  # the message's start: "class_35 (19.2%) · ..."
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, timeout=ANSWER_TIMEOUT_MS
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.set_default_timeout(ANSWER_TIMEOUT_MS)  # Playwright's own default: 30 s
            page.set_default_navigation_timeout(ANSWER_TIMEOUT_MS)
            page.on("request", lambda request: requests.append(request.url))
            page.goto(server, wait_until="networkidle")
            # the page renders after its last request: wait for the text, not for the network
            header = page.locator("#header")
            expect(header).to_contain_text(
                "CIFAR-100 classifier: cnn-fast", timeout=ANSWER_TIMEOUT_MS
            )  # expect's own default: 5 s
            upload = page.locator("#photo input[type=file]")
            upload.set_input_files(photo)
            message = read_message(page, "superclass")
            assert message.startswith(expected)  # class and probability, as `predict` says
            for name, _ in top5:  # all five, in the label
                expect(page.locator("#top")).to_contain_text(name, timeout=ANSWER_TIMEOUT_MS)
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            for error, path in bad_files(tmp_path).items():
                upload.set_input_files(path)
                message = read_message(page, f"{path.name}: {error}")
                assert message.startswith("Cannot classify this file.")
                assert "Traceback" not in message and len(message.splitlines()) == 1
            upload.set_input_files(photo)  # the server kept serving
            assert read_message(page, "superclass").startswith(expected)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
    outside = [url for url in requests if not url.startswith(server)]
    assert not outside, f"the page fetched from outside 127.0.0.1: {outside}"


def read_message(page, words: str) -> str:
    """The message line once it holds ``words`` (the answer to the latest upload); its text
    alone, without the progress timer Gradio shows over it while an answer is on its way."""
    page.wait_for_function(
        "([selector, words]) => (document.querySelector(selector)?.innerText || '')"
        ".includes(words)",
        arg=[MESSAGE, words],
        timeout=ANSWER_TIMEOUT_MS,
    )
    return page.locator(MESSAGE).inner_text().strip()


def test_gradio_client_predicts_as_the_predict_command(server, learned_run, shared_dir, capsys):
    """The full top five with probabilities, photo by photo: catches a server that feeds the
    model other pixels than ``predict`` does (BGR, another resize)."""
    client = Client(server, verbose=False, httpx_kwargs={"timeout": REQUEST_TIMEOUT_S})
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]
    answers = []
    for photo in photos:
        label, message, seen = client.predict(handle_file(str(photo)), api_name="/classify")
        expected = top5_of_predict(capsys, learned_run, photo)
        served = [(c["label"], c["confidence"]) for c in label["confidences"]]
        assert [name for name, _ in served] == [name for name, _ in expected], photo.name
        assert [p for _, p in served] == pytest.approx([p for _, p in expected], rel=1e-5)
        assert label["label"] == expected[0][0] and message.startswith(f"**{expected[0][0]}**")
        assert Image.open(seen).size == (256, 256)
        answers.append(expected[0][0])
    assert len(set(answers)) > 1  # the precondition: the model tells the photos apart
    table, gallery = client.predict(
        [handle_file(str(p)) for p in photos], api_name="/classify_many"
    )
    assert len(gallery) == len(photos) and table.count("\n") == len(photos) + 1
