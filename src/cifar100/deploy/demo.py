"""The demo page: drop a photo (or several), see the model's top-5 classes, the superclass
and the 32x32 image the model actually sees. Built with Gradio (the ``demo`` extra:
``pip install -e '.[demo]'``); ``cifar100 serve`` starts it.

Offline by construction: no analytics or version check (``serving.OFFLINE_ENV`` and
``analytics_enabled=False``), no share link, and a theme in the system's own fonts
(a Google-hosted font would be fetched by every visitor's browser). The browser test
records every request the page makes and fails on any that leaves the machine.

The same predictions are Gradio API endpoints, ``/classify`` (one image) and
``/classify_many``, for ``gradio_client``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifar100.deploy.classifier import load_model
from cifar100.deploy.serving import OFFLINE_ENV, TOP, Answer, answer, example_images, header
from cifar100.errors import UserError
from cifar100.runtime.stopping import interrupted

os.environ.update(OFFLINE_ENV)  # before gradio and huggingface_hub read them at import

try:
    import gradio as gr
except ImportError:  # the page is an optional extra; the rest of the project runs without
    raise UserError(
        "the demo page needs Gradio: install it with pip install -e '.[demo]'"
    ) from None

MAX_UPLOAD = "50mb"  # Gradio refuses bigger uploads on the page, with its own message
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the system's, fetched from nowhere
MONO_FONTS = ["ui-monospace", "monospace"]
VIEW_BUTTONS = ["download", "fullscreen"]  # not "share": it posts to Hugging Face
# A small photo (a 32x32 example) fills the box like a large one, and images scaled up stay
# pixel-sharp: what the model sees, without the browser's smoothing.
CSS = """
#photo img { width: 100%; height: 100%; object-fit: contain; }
#photo img, #seen img, #gallery img, .gallery-item img { image-rendering: pixelated; }
"""
TABLE_HEADER = f"| Photo | Top class | Probability | Superclass | Next {TOP - 1} |"
# How long the server may take to start and the page to answer its first request: Gradio's
# own limits (5 s to start, 3 s for one try at the page) fail on a busy machine.
START_TIMEOUT_S = 120


def show_one(classifier, upload: dict | None) -> tuple[Any, str, Any]:
    """One photo -> (top-5 for gr.Label, the message line, the 32x32 view).

    ``upload`` is gr.Image's raw value (``preprocess=False``): Gradio's own preprocessing
    opens the file with Pillow first and fails with a bare "Error" on a broken file; here
    ``cifar100.data.images.read_image`` reads it (every format and colour mode ``predict``
    reads) and a bad file gets its one-line message on the page.
    """
    path = (upload or {}).get("path")
    if path is None:  # the photo was cleared
        return None, "", None
    result = _answer(classifier, path)
    if result.error is not None:
        return None, f"**Cannot classify this file.** {result.error}", None
    best, probability = result.top[0]
    superclass = f" · superclass **{result.superclass}**" if result.superclass else ""
    return dict(result.top), f"**{best}** ({probability:.1%}){superclass}", result.seen


def show_many(classifier, paths: list[str] | None) -> tuple[str, list]:
    """Several files -> (a Markdown table of answers, gallery of (32x32 view, caption))."""
    rows, gallery = [TABLE_HEADER, "|---|---|--:|---|---|"], []
    for path in paths or []:
        result = _answer(classifier, path)
        name = result.name.replace("|", "\\|")
        if result.error is not None:
            rows.append(f"| {name} | cannot classify: {result.error.replace('|', '/')} | | | |")
            continue
        (best, p), rest = result.top[0], result.top[1:]
        others = ", ".join(f"{n} {q:.0%}" for n, q in rest)
        rows.append(f"| {name} | **{best}** | {p:.1%} | {result.superclass or ''} | {others} |")
        gallery.append((result.seen, f"{result.name}: {best} {p:.0%}"))
    return ("\n".join(rows) if paths else ""), gallery


def _answer(classifier, path: str) -> Answer:
    try:
        return answer(classifier, path)
    except Exception as error:  # the page keeps serving, whatever one file does
        print(f"cifar100 serve: {Path(path).name}: {error!r}", file=sys.stderr, flush=True)
        return Answer(Path(path).name, error=f"could not classify it ({type(error).__name__})")


def build_page(classifier, title: str, examples: list[Path]) -> gr.Blocks:
    """The page for ``classifier``: ``title`` is the header's Markdown."""
    with gr.Blocks(title="CIFAR-100 classifier", analytics_enabled=False) as page:
        gr.Markdown(title, elem_id="header")
        with gr.Tab("One photo"):
            with gr.Row():
                with gr.Column():
                    photo = gr.Image(
                        type="filepath",
                        sources=["upload", "clipboard"],
                        label="Photo: upload, paste or drop (any format)",
                        height=300,  # a small photo is scaled up to it, a large one down
                        buttons=["fullscreen"],
                        elem_id="photo",
                    )
                    if examples:
                        gr.Examples(
                            [[str(p)] for p in examples], photo, label="CIFAR-100 test images"
                        )
                with gr.Column():
                    message = gr.Markdown(elem_id="message")
                    top = gr.Label(num_top_classes=TOP, label=f"Top {TOP}", elem_id="top")
                    seen = gr.Image(
                        label="What the model sees: the photo's centre square at 32x32",
                        format="png",  # lossless: each of the 32x32 pixels stays sharp
                        interactive=False,
                        height=300,
                        buttons=VIEW_BUTTONS,
                        elem_id="seen",
                    )
            photo.change(
                lambda upload: show_one(classifier, upload),
                photo,
                [top, message, seen],
                api_name="classify",
                preprocess=False,  # the file as uploaded: see show_one
            )
        with gr.Tab("Several photos"):
            files = gr.File(file_count="multiple", label="Photos (any format)", elem_id="files")
            table = gr.Markdown(elem_id="table")
            gallery = gr.Gallery(
                label="What the model sees",
                columns=8,
                format="png",
                buttons=VIEW_BUTTONS,
                elem_id="gallery",
            )
            files.change(
                lambda f: show_many(classifier, f),
                files,
                [table, gallery],
                api_name="classify_many",
            )
    return page


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page for ``model`` (anything ``load_model`` reads) until SIGINT or SIGTERM
    (then raises ``stopping.Interrupted``)."""
    path = Path(model)
    classifier = load_model(path)
    with tempfile.TemporaryDirectory(prefix="cifar100-examples-") as folder:
        examples = example_images(classifier, Path(folder))
        page = build_page(classifier, header(path, classifier), examples)
        _launch(page, host, port, folder)
        print(f"http://{host}:{port}", flush=True)  # the one result: where the page is
        try:
            while True:  # gradio serves from its own threads; signals land here
                time.sleep(0.5)
        except KeyboardInterrupt as stop:
            page.close(verbose=False)  # cli.main prints the one stop line
            raise interrupted(stop, "the page is closed; nothing to save") from None


def _launch(page: gr.Blocks, host: str, port: int, examples: str) -> None:
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    try:
        with _patient_server():
            _start(page, host, port, examples, theme)
    except OSError as error:  # gradio's "Cannot find empty port", a bad host name, ...
        reason = "in use" if "empty port" in str(error) else str(error).splitlines()[0]
        raise UserError(f"cannot serve on {host}:{port} ({reason}); try another --port") from None
    if not _answers(page.local_url, START_TIMEOUT_S):
        page.close(verbose=False)
        raise UserError(
            f"cannot serve on {host}:{port} (the page did not answer within "
            f"{START_TIMEOUT_S} s); try another --port"
        )


def _start(page: gr.Blocks, host: str, port: int, examples: str, theme) -> None:
    page.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[examples],
        theme=theme,
        css=CSS,
        footer_links=["api"],
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        run_history=False,
        enable_monitoring=False,
        _frontend=False,  # skips Gradio's one 3 s try at the page: _answers waits instead
    )


def _answers(url: str, timeout_s: float) -> bool:
    """Whether ``url`` answers (any HTTP status) within ``timeout_s``, trying until then."""
    deadline = time.monotonic() + timeout_s
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with direct.open(url, timeout=min(left, 30)):
                return True
        except urllib.error.HTTPError:
            return True  # an answer, if not a page: the server is up
        except (OSError, ValueError):
            time.sleep(min(0.2, max(left, 0)))


@contextlib.contextmanager
def _patient_server() -> Iterator[None]:
    """While Gradio starts its server: wait for it until it is up, its thread has died (a
    port taken after Gradio's check), or ``START_TIMEOUT_S``, where Gradio gives it 5 s."""
    from gradio import http_server
    from gradio.exceptions import ServerFailedToStartError

    hasty = http_server.Server

    class PatientServer(hasty):
        def run_in_thread(self) -> None:
            if getattr(self, "reloader", None):  # never here: no Spaces, no watched folders
                return super().run_in_thread()
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.started:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    raise ServerFailedToStartError(
                        f"server did not start on port {self.config.port}"
                    )
                time.sleep(0.01)

    http_server.Server = PatientServer
    try:
        yield
    finally:
        http_server.Server = hasty
