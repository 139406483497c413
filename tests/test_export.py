"""``cifar100 export``: ONNX and safetensors files that match PyTorch and carry their metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from cifar100.cli import main
from cifar100.config.schema import ModelConfig
from cifar100.data.cifar import load_cifar100
from cifar100.data.preprocess import Preprocess
from cifar100.deploy.classifier import load_model
from cifar100.deploy.exports import (
    ExportError,
    OnnxClassifier,
    check_onnx,
    export_onnx,
    export_run,
    load_safetensors,
)
from cifar100.models import REGISTRY, build_model, model_spec
from cifar100.runs.trained import load_trained

SAMPLES = ["bird.png", "cat.png", "dragonfly.png", "missvickie_potato_chips.png"]


@pytest.fixture(scope="module")
def exported(tiny_run, fake_data_dir) -> dict:
    """--format all into the run directory (default paths), checked on the fake test set."""
    return export_run(tiny_run, "all", None, str(fake_data_dir), 1000)


def test_export_writes_both_files_beside_the_run(tiny_run, exported):
    assert exported["files"] == {
        "onnx": str(tiny_run / "model.onnx"),
        "safetensors": str(tiny_run / "model.safetensors"),
    }
    onnx_check = exported["checks"]["onnx"]
    assert onnx_check["images"] == 200  # the whole fake test set (fewer than 1,000)
    assert onnx_check["top1_agreement"] >= 0.999
    assert onnx_check["max_abs_logit_diff"] < 1e-4
    assert exported["checks"]["safetensors"]["max_abs_logit_diff"] == 0.0


def test_onnx_metadata_and_dynamic_batch(tiny_run, exported):
    model = onnx.load(exported["files"]["onnx"])
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    trained = load_trained(tiny_run)
    assert json.loads(props["class_names"]) == trained.class_names
    assert json.loads(props["superclass_names"]) == trained.superclass_names
    assert json.loads(props["mean"]) == pytest.approx(trained.preprocess.mean.flatten().tolist())
    assert json.loads(props["std"]) == pytest.approx(trained.preprocess.std.flatten().tolist())
    assert props["input_size"] == "32" and props["input_layout"].startswith("NCHW")
    assert "[0, 1]" in props["input_scaling"] and props["source_run"] == str(tiny_run)
    session = ort.InferenceSession(exported["files"]["onnx"])
    (graph_input,) = session.get_inputs()
    assert graph_input.shape[1:] == [3, 32, 32] and isinstance(graph_input.shape[0], str)
    for batch in (1, 7):
        images = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
        logits = session.run(None, {graph_input.name: images})[0]
        expected = trained.classifier()(torch.from_numpy(images)).detach().numpy()
        assert logits.shape == (batch, 100)
        np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_onnx_parity_on_1000_real_test_images(tiny_run, real_data_dir, tmp_path):
    report = export_run(tiny_run, "onnx", tmp_path / "real.onnx", str(real_data_dir), 1000)
    check = report["checks"]["onnx"]
    assert check["images"] == 1000
    assert check["top1_agreement"] >= 0.999 and check["max_abs_logit_diff"] < 1e-3
    assert check["candidate_top1"] == pytest.approx(check["reference_top1"], abs=0.001)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_exports_to_matching_onnx(name, tmp_path):
    spec = model_spec(name)  # mobilenetv2 resizes 32 -> 128 inside the graph
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        Preprocess(spec.input_size, spec.mean, spec.std), build_model(ModelConfig(name=name))
    ).eval()
    path = export_onnx(classifier, tmp_path / f"{name}.onnx", {"class_names": "[]"})
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = classifier(images)
    np.testing.assert_allclose(OnnxClassifier(path).logits(images), expected, atol=1e-4)


def test_check_fails_when_onnx_disagrees(tiny_run, exported, fake_data_dir):
    other = load_trained(tiny_run).classifier()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.copy_(torch.randn_like(parameter))
    test = load_cifar100(fake_data_dir).test
    with pytest.raises(ExportError, match="agrees with PyTorch on only"):
        check_onnx(other, exported["files"]["onnx"], test.images, test.labels)


def test_predict_with_onnx_matches_the_run_dir(tiny_run, exported, shared_dir):
    photos = [shared_dir / "samples" / "imagenet" / name for name in SAMPLES]
    from_run = load_model(tiny_run).predict(photos)
    from_onnx = load_model(exported["files"]["onnx"]).predict(photos)
    for a, b in zip(from_run, from_onnx, strict=True):
        assert a.error is None and b.error is None
        assert a.top[0][0] == b.top[0][0]
        assert a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-5)


def test_predict_cli_accepts_onnx_and_safetensors(exported, shared_dir, capsys):
    photo = str(shared_dir / "samples" / "imagenet" / "cat.png")
    tops = []
    for key in ("onnx", "safetensors"):
        assert main(["predict", photo, "--model", exported["files"][key], "--json"]) == 0
        tops.append(json.loads(capsys.readouterr().out)[0]["top"])
    assert [t["class"] for t in tops[0]] == [t["class"] for t in tops[1]]


def test_safetensors_round_trip(tiny_run, exported):
    trained = load_trained(tiny_run)
    path = exported["files"]["safetensors"]
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    assert json.loads(metadata["class_names"]) == trained.class_names
    assert json.loads(metadata["config"])["model"]["widths"] == [16, 32, 32, 32]
    state = trained.model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    reloaded = load_safetensors(path)
    assert reloaded.class_names == trained.class_names
    assert reloaded.fine_to_coarse == trained.fine_to_coarse
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(reloaded.classifier()(images), trained.classifier()(images))


def test_cli_export_onnx_json(tiny_run, fake_data_dir, tmp_path, capsys):
    out = tmp_path / "nested" / "tiny.onnx"
    code = main(
        [
            "export",
            str(tiny_run),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--data-dir",
            str(fake_data_dir),
            "--check-images",
            "50",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and out.is_file() and report["files"] == {"onnx": str(out)}
    assert report["checks"]["onnx"]["images"] == 50


def test_unreadable_exports_are_one_line_errors(tmp_path, shared_dir, capsys):
    photo = str(shared_dir / "samples" / "imagenet" / "cat.png")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    bare = tmp_path / "bare.onnx"  # a valid ONNX model without our metadata
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [value("x", onnx.TensorProto.FLOAT, [1])],
        [value("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), bare)
    fake_weights = tmp_path / "junk.safetensors"
    fake_weights.write_bytes(b"\x00" * 16)
    for model, problem in (
        (broken, "not a readable ONNX model"),
        (bare, "no class_names in its metadata"),
        (fake_weights, "not a cifar100 safetensors export"),
    ):
        assert main(["predict", photo, "--model", str(model)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(model) in err[0] and problem in err[0]
