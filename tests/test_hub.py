"""``cifar100 export --format hub``: a folder to upload as it is, that ``predict`` reads back
with the run's own answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cifar100.cli import main
from cifar100.deploy.classifier import load_model
from cifar100.deploy.hub import CARD, CONFIG, WEIGHTS, HubError, load_hub
from cifar100.deploy.serving import header
from cifar100.errors import UserError

SAMPLES = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]


@pytest.fixture(scope="module")
def hub_folder(tiny_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-cifar100"
    assert main(["export", str(tiny_run), "--format", "hub", "--out", str(folder)]) == 0
    return folder


def predict_json(capsys, model: Path, photos: list[Path]) -> list[dict]:
    assert main(["predict", *map(str, photos), "--model", str(model), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_from_the_folder_gives_the_runs_top5(tiny_run, hub_folder, shared_dir, capsys):
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]
    from_run = predict_json(capsys, tiny_run, photos)
    from_folder = predict_json(capsys, hub_folder, photos)
    for run_entry, folder_entry in zip(from_run, from_folder, strict=True):
        assert [t["class"] for t in folder_entry["top"]] == [t["class"] for t in run_entry["top"]]
        assert [t["probability"] for t in folder_entry["top"]] == pytest.approx(
            [t["probability"] for t in run_entry["top"]], abs=1e-6
        )


def test_folder_holds_weights_config_and_card(tiny_run, hub_folder):
    assert sorted(p.name for p in hub_folder.iterdir()) == sorted([WEIGHTS, CONFIG, CARD])
    config = json.loads((hub_folder / CONFIG).read_text())
    trained = load_hub(hub_folder)
    assert config["architecture"] == "cnn-fast" and config["num_classes"] == 100
    assert [config["id2label"][str(i)] for i in range(100)] == trained.class_names
    assert config["preprocessing"]["resize"] == {"size": 32, "filter": "lanczos"}
    assert config["preprocessing"]["mean"] == pytest.approx(trained.preprocess.mean.flatten())
    metrics = config["metrics"]
    assert metrics["images"] == 200 and metrics["tta_flip"] is False  # the fake test set
    for key in ("top1", "top5", "superclass_accuracy", "ece"):
        assert 0.0 <= metrics[key] <= 1.0
    assert config["training"]["command"].startswith("cifar100 train")
    assert config["training"]["hardware"]["cpu_count"] >= 1


def test_card_has_hub_front_matter_and_the_record(hub_folder):
    card = (hub_folder / CARD).read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == "cifar100"
    config = json.loads((hub_folder / CONFIG).read_text())
    top1 = meta["model-index"][0]["results"][0]["metrics"][0]
    assert top1["value"] == pytest.approx(config["metrics"]["top1"], abs=1e-4)
    for heading in ("## Metrics", "## Data", "## Training recipe", "## Hardware", "## Limit"):
        assert heading in body
    for words in ("Superclass accuracy", "calibration error", "32x32", "100 classes", "minutes"):
        assert words in body
    assert "**transfer**" not in body  # a CNN from scratch: no transfer settings listed


def test_export_again_replaces_it_but_never_a_foreign_folder(tiny_run, tmp_path, capsys):
    folder = tmp_path / "hub"
    for _ in range(2):
        assert main(["export", str(tiny_run), "--format", "hub", "--out", str(folder)]) == 0
    assert not list(tmp_path.glob(".*partial*"))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--format", "hub", "--out", str(foreign)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a cifar100 model folder" in err[0]
    assert (foreign / "holiday.jpg").read_bytes() == b"mine"


def test_bad_folders_and_flags_are_one_line_errors(hub_folder, tmp_path):
    with pytest.raises(UserError, match="exported model keeps the temperature"):
        load_model(hub_folder, calibrated=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / WEIGHTS).write_bytes((hub_folder / WEIGHTS).read_bytes())
    (broken / CONFIG).write_text("{not json")
    with pytest.raises(HubError, match="not readable JSON"):
        load_model(broken)
    (broken / CONFIG).write_text(json.dumps({"format": "someone-else/2"}))
    with pytest.raises(HubError, match="not a cifar100 model folder"):
        load_model(broken)


def test_serve_shows_the_folders_own_metrics(hub_folder):
    config = json.loads((hub_folder / CONFIG).read_text())
    text = header(hub_folder, load_model(hub_folder))
    assert f"Test accuracy **{100 * config['metrics']['top1']:.2f}%" in text  # a note may follow
    assert "flip TTA" not in text and "cifar100 train --preset quick" in text


def edited_copy(hub_folder: Path, folder: Path, edit) -> Path:
    """A copy of the exported folder whose config.json ``edit`` (config -> None) changed."""
    folder.mkdir()
    (folder / WEIGHTS).write_bytes((hub_folder / WEIGHTS).read_bytes())
    config = json.loads((hub_folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def test_a_class_renamed_in_config_json_answers_under_its_new_name(
    hub_folder, shared_dir, tmp_path, capsys
):
    """config.json's id2label is where the folder's class names come from."""
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]
    before = predict_json(capsys, hub_folder, photos)
    old = before[0]["top"][0]["class"]
    index = json.loads((hub_folder / CONFIG).read_text())["label2id"][old]

    def rename(config):
        config["id2label"][str(index)] = "my-renamed-class"
        config["label2id"]["my-renamed-class"] = config["label2id"].pop(old)

    renamed = edited_copy(hub_folder, tmp_path / "renamed", rename)
    after = predict_json(capsys, renamed, photos)
    assert after[0]["top"][0]["class"] == "my-renamed-class"
    assert after[0]["top"][0]["probability"] == pytest.approx(before[0]["top"][0]["probability"])
    for entry_before, entry_after in zip(before, after, strict=True):
        names = [t["class"] for t in entry_before["top"]]
        assert [t["class"] for t in entry_after["top"]] == [
            "my-renamed-class" if name == old else name for name in names
        ]
    model = load_model(renamed)
    assert model.superclass("my-renamed-class") == load_model(hub_folder).superclass(old)


def _set(path: str, value):
    """An edit of config.json: the field at the dotted ``path`` set to ``value``."""

    def edit(config):
        *parents, last = path.split(".")
        for key in parents:
            config = config[key]
        config[last] = value

    return edit


def _drop_last_label(config):
    del config["id2label"]["99"]


def _skip_an_id(config):
    config["id2label"]["100"] = config["id2label"].pop("99")


def _duplicate_label(config):
    config["id2label"]["1"] = config["id2label"]["0"]


def _rename_only_in_label2id(config):
    config["label2id"]["someone-else"] = config["label2id"].pop(config["id2label"]["0"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("architecture", "resnet9000"), "architecture 'resnet9000' is not a cifar100 model"),
        (_set("architecture", ["cnn-fast"]), "architecture ['cnn-fast'] is not a cifar100 model"),
        (
            _set("architecture", "cnn-seed"),
            "architecture 'cnn-seed' does not match the weights (trained as 'cnn-fast')",
        ),
        (
            _set("config.model.name", "cnn-seed"),
            "config.model.name 'cnn-seed' does not match the weights (trained as 'cnn-fast')",
        ),
        (
            _set("config.model.name", "resnet9000"),
            "config.model.name 'resnet9000' does not match the weights (trained as 'cnn-fast')",
        ),
        (_set("config.optim.lr", 123.0), "config.optim.lr 123.0 does not match the weights"),
        (_set("num_classes", 10), "num_classes 10 does not match"),
        (_drop_last_label, "id2label"),
        (_skip_an_id, "id2label"),
        (_duplicate_label, "id2label"),
        (_set("id2label", ["a", "b"]), "id2label"),
        (_rename_only_in_label2id, "label2id"),
        (_set("fine_to_coarse", [0] * 99), "fine_to_coarse"),
        (_set("superclass_names", ["one"]), "superclass_names"),
        (_set("preprocessing.mean", [0.5, 0.5, 0.5]), "preprocessing.mean"),
        (_set("preprocessing.std", [1.0, 1.0, 1.0]), "preprocessing.std"),
        (_set("preprocessing.model_input_size", 64), "preprocessing.model_input_size"),
        (_set("preprocessing.resize", {"size": 64, "filter": "lanczos"}), "preprocessing.resize"),
        (_set("temperature", 2.0), "temperature 2.0 does not match the weights"),
        (_set("weights", "other.safetensors"), "weights 'other.safetensors'"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_config_json_that_disagrees_with_the_weights_is_refused(
    hub_folder, tmp_path, edit, message, capsys
):
    folder = edited_copy(hub_folder, tmp_path / "edited", edit)
    with pytest.raises(HubError) as error:
        load_model(folder)
    assert str(error.value).startswith(f"{folder / CONFIG}: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    photo = Path(__file__).parent.parent / "README.md"  # never read: the folder is refused first
    assert main(["predict", str(photo), "--model", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cifar100: error: {error.value}"]
