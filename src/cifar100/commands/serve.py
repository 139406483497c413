"""``cifar100 serve``: the demo page in the browser for any trained model.

Drop, paste or upload a photo (or several), or click a CIFAR-100 test image: the page shows
the top-5 classes with probabilities, the superclass, and the 32x32 image the model sees.
Without --model it serves the run under runs/ with the best validation top-1. Needs the
demo extra (pip install -e '.[demo]'); works offline, nothing is shared or reported.
Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar100.deploy.serving import choose_model
from cifar100.recipes.argtypes import port
from cifar100.recipes.shared_flags import add_shared


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_shared(p, "serve", "model")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="where to look for the best run without --model (default: runs)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: "
        "every network the machine is on)",
    )
    p.add_argument("--port", type=port, default=7860, help="port to listen on (default: 7860)")


def run(args: argparse.Namespace) -> int:
    path, why = choose_model(args.model, args.runs_dir)  # before Gradio loads: answers at once
    print(why, file=sys.stderr, flush=True)
    # Gradio loads only here: the other commands never need it.
    from cifar100.deploy.demo import serve

    serve(path, args.host, args.port)
    return 0
