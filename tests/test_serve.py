"""``cifar100 serve``, without a browser: which model it picks, the header, the answer for
one upload (bad files included), the example images, and the page's handlers."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cifar100.cli import main
from cifar100.deploy import demo
from cifar100.deploy.classifier import load_model
from cifar100.deploy.exports import export_run
from cifar100.deploy.serving import NoModelError, answer, best_run, example_images, header

CLASS_NAMES = {f"class_{i:02d}" for i in range(100)}  # the fake data set's names


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return load_model(tiny_run)


def fake_run(root, name: str, val_top1: float, finished: bool = True):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"val_top1": val_top1}))
    if finished:
        (run / "checkpoints" / "best.pt").write_bytes(b"")
    return run


def test_best_run_is_chosen_by_validation_accuracy(tmp_path):
    fake_run(tmp_path, "a", 0.50)
    best = fake_run(tmp_path, "b", 0.70)
    fake_run(tmp_path, "c", 0.90, finished=False)  # no checkpoint: not a run to serve
    (tmp_path / "d").mkdir()  # still training: no results.json
    assert best_run(tmp_path) == (best, 0.70, 2)


def test_without_any_run_it_says_how_to_train_one(tmp_path, capsys):
    with pytest.raises(NoModelError, match="cifar100 train --preset quick"):
        best_run(tmp_path / "runs")
    assert main(["serve", "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trained run under" in err[0] and "--model" in err[0]


def test_answer_gives_top5_superclass_and_the_32x32_view(classifier, shared_dir):
    photo = shared_dir / "samples" / "imagenet" / "cat.png"
    result = answer(classifier, photo)
    expected = classifier.predict(photo)[0].top
    assert result.error is None and result.name == "cat.png"
    assert [name for name, _ in result.top] == [name for name, _ in expected]
    assert result.superclass and result.superclass.startswith("super_")
    assert result.seen.shape == (256, 256, 3) and result.seen.dtype == np.uint8
    assert (result.seen[:8, :8] == result.seen[0, 0]).all()  # one model pixel: one flat block


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, I am text", "not an image Pillow can read"),
        (b"", "not an image Pillow can read"),
        ("bomb", "too many pixels"),
    ],
    ids=["text-renamed-jpg", "zero-bytes", "huge"],
)
def test_a_bad_file_gets_a_one_line_message_naming_it(classifier, tmp_path, content, message):
    folder = tmp_path / "server-side-upload-folder"
    folder.mkdir()
    path = folder / "holiday.jpg"
    if content == "bomb":  # 10,000 x 10,000 pixels of black: a 100 KB file
        path = folder / "holiday.png"
        Image.new("L", (10_000, 10_000)).save(path)
    else:
        path.write_bytes(content)
    result = answer(classifier, path)
    assert result.top == [] and message in result.error
    assert result.error.startswith(path.name) and str(folder) not in result.error
    assert "\n" not in result.error


def test_header_names_the_model_its_accuracy_and_record(classifier, tiny_run):
    text = header(tiny_run, classifier)
    results = json.loads((tiny_run / "results.json").read_text())
    assert text.startswith("## CIFAR-100 classifier: cnn-fast")
    assert f"{100 * results['test_top1']:.2f}%" in text and "(flip TTA)" in text
    assert "cifar100 train --preset quick" in text and "threads" in text


def test_header_of_an_exported_file_finds_its_run(tiny_run, fake_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    onnx_path = tmp_path / "m.onnx"
    export_run(run, "onnx", onnx_path, str(fake_data_dir), 50)
    onnx_model = load_model(onnx_path)
    text = header(onnx_path, onnx_model)
    assert "Test accuracy" in text and "cifar100 train --preset quick" in text
    assert onnx_model.superclass(onnx_model.class_names[0]) == "super_00"
    shutil.rmtree(run)  # its run gone: the header says what it knows, and no more
    assert "not recorded" in header(onnx_path, onnx_model)


def test_examples_are_test_images_named_for_their_class(classifier, tmp_path):
    paths = example_images(classifier, tmp_path, count=8)
    assert len(paths) == 8 and len({p.stem for p in paths}) == 8
    assert {p.stem for p in paths} <= CLASS_NAMES
    for path in paths:
        assert Image.open(path).size == (32, 32)


def test_page_handlers_answer_and_keep_going(classifier, shared_dir, tmp_path):
    photo = shared_dir / "samples" / "imagenet" / "bird.png"
    top, message, seen = demo.show_one(classifier, {"path": str(photo)})
    best = classifier.predict(photo)[0].top[0][0]
    assert next(iter(top)) == best and f"**{best}**" in message and "superclass" in message
    assert demo.show_one(classifier, None) == (None, "", None)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a photo")
    top, message, seen = demo.show_one(classifier, {"path": str(broken)})
    assert top is None and seen is None and "broken.jpg: not an image" in message
    table, gallery = demo.show_many(classifier, [str(photo), str(broken)])
    assert table.count("\n") == 3 and f"**{best}**" in table and "cannot classify" in table
    assert len(gallery) == 1 and gallery[0][1].startswith("bird.png: ")


def test_a_bad_model_or_a_taken_port_is_one_line(tiny_run, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("cifar100: error: ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_run), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == f"cifar100: error: cannot serve on 127.0.0.1:{port} (in use); try another --port"
    )


def test_the_page_starts_on_a_machine_too_busy_for_gradios_own_timeouts(
    classifier, tmp_path, monkeypatch
):
    """Gradio gives its server 5 s to start and the page's first answer 3 s (one try),
    then fails; on a busy 2-core machine either can take longer. Here the server takes 6 s
    to start and that first check times out: the page must still come up."""
    import httpx
    import uvicorn

    startup = uvicorn.Server.startup

    async def slow_startup(self, *args, **kwargs):
        await asyncio.sleep(6)
        return await startup(self, *args, **kwargs)

    def timed_out(*args, **kwargs):
        raise httpx.ReadTimeout("the machine is busy")

    monkeypatch.setattr(uvicorn.Server, "startup", slow_startup)
    monkeypatch.setattr(httpx, "head", timed_out)  # what gradio's own start-up check sends
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = demo.build_page(classifier, "## test page", [])
    try:
        demo._launch(page, "127.0.0.1", port, str(tmp_path))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120) as response:
            assert response.status == 200
    finally:
        page.close(verbose=False)
