"""Knowledge distillation (``cifar100.training.distill``: loss, teachers, teacher_cache): the
loss on toy cases, the targets the engine mixes, the teacher cache's keys and invalidation,
the checks that keep a teacher honest, and distilled runs end to end on the fake data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cifar100.cli import build_parser, main
from cifar100.config.schema import AugmentConfig, DistillConfig, ModelConfig
from cifar100.data.augment import one_hot
from cifar100.data.cifar import MEAN, STD, Split
from cifar100.data.preprocess import Preprocess
from cifar100.models import build_model
from cifar100.recipes.flags import from_flags
from cifar100.records.record import make_record
from cifar100.records.table import table_row
from cifar100.runtime.checkpoint import load_checkpoint
from cifar100.runtime.download import file_digest
from cifar100.training.distill.loss import Distiller, OnlineTeacher, kd_term, soft_targets
from cifar100.training.distill.teacher_cache import (
    ViewBatches,
    cache_key,
    cache_path,
    fill_logits,
    open_logits,
    view_draws,
    view_policy,
)
from cifar100.training.distill.teachers import (
    TeacherError,
    check_teachers,
    load_teacher,
    refuse_changed,
)
from cifar100.training.engine import StepContext, mixed_batch, soft_cross_entropy

CPU = torch.device("cpu")
SHA = "ab" * 32


def test_a_student_matching_its_teacher_has_zero_kd_term():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 3
    labels = one_hot(torch.arange(8), 100)
    for standardize in (False, True):
        probs = soft_targets([logits], 4.0, standardize)
        assert kd_term(logits, probs, 4.0, standardize).item() == pytest.approx(0.0, abs=1e-5)
        assert kd_term(logits.flip(1), probs, 4.0, standardize).item() > 0.1
    probs = soft_targets([logits], 4.0)
    pure_kd = Distiller(DistillConfig(weight=1.0), 100)
    assert pure_kd.loss(logits, torch.cat([labels, probs], 1)).item() == pytest.approx(0, abs=1e-5)
    labels_only = Distiller(DistillConfig(weight=0.0), 100)
    both = torch.cat([labels, probs], 1)
    assert torch.equal(labels_only.loss(logits, both), soft_cross_entropy(logits, labels))


def test_an_ensemble_teaches_the_mean_of_its_probabilities():
    a, b = torch.randn(4, 100), torch.randn(4, 100) * 5
    expected = (torch.softmax(a / 2, 1) + torch.softmax(b / 2, 1)) / 2
    assert torch.allclose(soft_targets([a, b], 2.0), expected)


def test_the_online_teacher_sees_the_raw_images_behind_the_students_inputs():
    student, images, seen = Preprocess(32, MEAN, STD), torch.rand(4, 3, 32, 32), []

    def net(x):
        seen.append(x)
        return x.flatten(1)[:, :100]

    teacher = OnlineTeacher(DistillConfig(teachers=("t",)), 100, [net], student)
    targets = teacher.targets(student(images), torch.arange(4))
    assert torch.allclose(seen[0], images, atol=1e-5)
    assert torch.allclose(targets, soft_targets([images.flatten(1)[:, :100]], 4.0), atol=1e-5)


class _Teacher:
    """Stands in for both kinds: its targets are the labels' one-hots, or a record of the
    images it was shown."""

    def __init__(self, sees_mixed_images: bool, labels: torch.Tensor):
        self.sees_mixed_images, self.labels, self.shown = sees_mixed_images, labels, None

    def targets(self, inputs, indices):
        self.shown = inputs
        return one_hot(self.labels, 100)


@pytest.mark.parametrize("sees_mixed", [False, True])
def test_mixup_mixes_cached_targets_like_labels_and_shows_online_teachers_the_mix(sees_mixed):
    labels, images = torch.arange(16) % 100, torch.rand(16, 3, 32, 32)
    teacher = _Teacher(sees_mixed, labels)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ctx = StepContext(
        optimizer=optimizer,
        scheduler=None,
        num_classes=100,
        label_smoothing=0.0,
        augment=AugmentConfig(mixup_alpha=1.0),
        teacher=teacher,
    )
    inputs, targets = mixed_batch(images, labels, torch.arange(16), ctx, torch.Generator())
    assert targets.shape == (16, 200) and not torch.equal(inputs, images)
    if sees_mixed:
        assert teacher.shown is inputs  # the online teacher ran on the mixed images
    else:
        assert teacher.shown is images  # the cached targets were mixed like the labels:
        assert torch.equal(targets[:, :100], targets[:, 100:])  # same one-hots, same mix


def _uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def test_cache_keys_change_with_teacher_data_views_and_policy_only():
    images, augment = _uint8_images(20), AugmentConfig(translate=4)
    base = cache_key(SHA, images, augment, 8, 0)
    assert cache_key(SHA, images, AugmentConfig(translate=4, mixup_alpha=0.4), 8, 0) == base
    others = [
        cache_key("cd" * 32, images, augment, 8, 0),  # another teacher checkpoint
        cache_key(SHA, _uint8_images(20, seed=1), augment, 8, 0),  # other images
        cache_key(SHA, images, AugmentConfig(translate=2), 8, 0),  # another policy
        cache_key(SHA, images, AugmentConfig(translate=4, flip=False), 8, 0),
        cache_key(SHA, images, augment, 4, 0),  # fewer views
        cache_key(SHA, images, augment, 8, 1),  # other views
    ]
    assert all(key != base and cache_path(key) != cache_path(base) for key in others)
    assert len({cache_path(key) for key in others}) == len(others)


def _probe(images: torch.Tensor) -> torch.Tensor:
    """A deterministic 'teacher': 100 pixels of each image, scaled."""
    return images.flatten(1)[:, ::31][:, :100] * 10


def test_cached_logits_belong_to_the_views_the_student_is_shown():
    images, augment = _uint8_images(20), AugmentConfig(translate=4)
    draws = view_draws(augment, 4, 0, len(images))
    assert draws.flip[:, 0].tolist() == [False, True, False, True]  # flips alternate
    cache = open_logits(cache_key(SHA, images, augment, 4, 0), len(images), 100)
    rows, policy = torch.arange(0, 20, 2), view_policy(augment)
    computed = fill_logits(cache, lambda n: _probe, images, rows, draws, policy, CPU)
    assert computed == 4 * 10 and cache.done[:, rows].all() and not cache.done[:, 1::2].any()
    labels = torch.zeros(10, dtype=torch.int64)
    preprocess = Preprocess(32, MEAN, STD)
    batches = ViewBatches(
        Split(images[rows], labels, labels),
        preprocess,
        CPU,
        policy,
        draws=draws.map(lambda d: d[:, rows]),
        logits=[cache.logits[:, rows]],
    )
    indices = torch.tensor([3, 0, 7, 9])
    inputs = batches.get(indices, torch.Generator().manual_seed(1))
    raw = inputs * preprocess.std + preprocess.mean
    assert torch.allclose(batches.teacher_logits(indices)[0].float(), _probe(raw), atol=0.02)
    with pytest.raises(RuntimeError, match="other than the one served"):
        batches.teacher_logits(indices.clone())
    assert fill_logits(cache, lambda n: _probe, images, rows, draws, policy, CPU) == 0
    assert cache.seconds > 0  # computing cost time, and the file keeps it
    reopened = open_logits(cache.key, len(images), 100)
    assert reopened.seconds == cache.seconds


def test_a_cache_file_is_reused_and_a_foreign_or_damaged_one_recomputed(capsys):
    images = _uint8_images(20)
    key = cache_key(SHA, images, AugmentConfig(), 2, 0)
    draws, policy, rows = view_draws(AugmentConfig(), 2, 0, 20), AugmentConfig(), torch.arange(20)
    fill_logits(open_logits(key, 20, 100), lambda n: _probe, images, rows, draws, policy, CPU)
    assert open_logits(key, 20, 100).done.all()  # reused: nothing left to compute
    path = cache_path(key)
    foreign = {**load_checkpoint(path), "key": {**key, "view_seed": 5}}
    torch.save(foreign, path)  # a file at this name made for other settings
    assert not open_logits(key, 20, 100).done.any()
    path.write_bytes(b"damaged")
    assert not open_logits(key, 20, 100).done.any()
    warnings = capsys.readouterr().err
    assert "made for other settings" in warnings and "unreadable" in warnings


def _teacher_copy(tiny_run, tmp_path, name: str, edit) -> str:
    """A copy of the tiny run whose best checkpoint ``edit`` changed."""
    target = tmp_path / name
    shutil.copytree(tiny_run, target)
    state = load_checkpoint(target / "checkpoints" / "best.pt")
    edit(state)
    torch.save(state, target / "checkpoints" / "best.pt")
    return str(target)


def test_teachers_of_other_classes_or_that_saw_the_validation_images_are_refused(
    tiny_run, tmp_path
):
    def ten_classes(state):
        config = state["config"]
        model = build_model(ModelConfig(**{**config["model"], "widths": (16, 32, 32, 32)}), 10)
        state["model"], state["class_names"] = model.state_dict(), state["class_names"][:10]

    def refit(state):
        state["config"]["train"]["refit"] = True

    with pytest.raises(TeacherError, match="its 10 classes are not this data set's 100"):
        check_teachers(
            from_flags("quick", teachers=[_teacher_copy(tiny_run, tmp_path, "ten", ten_classes)])
        )
    refitted = _teacher_copy(tiny_run, tmp_path, "refit", refit)
    with pytest.raises(TeacherError, match="a refit, trained on every training image"):
        check_teachers(from_flags("quick", teachers=[refitted]))
    with pytest.raises(TeacherError, match="validated on another split"):
        from_flags("quick", teachers=[str(tiny_run)], sets=["data.split_seed=3"])
    check_teachers(from_flags("quick", teachers=[refitted], refit=True))  # validates nothing
    with pytest.raises(TeacherError, match="teacher .*nope: no trained model here"):
        from_flags("quick", teachers=[str(tmp_path / "nope")])


def test_a_resumed_run_refuses_a_teacher_whose_checkpoint_changed(tiny_run, tmp_path):
    teacher = load_teacher(str(tiny_run))
    recorded = {"distill": {"teachers": [{"source": str(tiny_run), "sha256": "0" * 64}]}}
    (tmp_path / "run.json").write_text(json.dumps(recorded))
    with pytest.raises(TeacherError, match="its checkpoint changed since this run started"):
        refuse_changed(tmp_path, [teacher])
    recorded["distill"]["teachers"][0]["sha256"] = teacher.sha256
    (tmp_path / "run.json").write_text(json.dumps(recorded))
    refuse_changed(tmp_path, [teacher])


def test_train_help_documents_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--teacher", "--kd-temperature", "--kd-weight", "--refit"))


STUDENT = [
    *["train", "--preset", "quick", "--epochs", "1", "--train-subset", "200"],
    *["--set", "model.widths=[8,16,32,32]", "--set", "train.batch_size=50"],
    *["--set", "train.eval_batch_size=200"],
]


def _student(fake_data_dir, run_dir, teacher, *extra) -> dict:
    argv = [*STUDENT, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]
    assert main([*argv, "--teacher", str(teacher), *extra]) == 0
    return json.loads((run_dir / "results.json").read_text())


def test_a_distilled_run_records_its_teacher_and_its_cost(fake_data_dir, tiny_run, tmp_path):
    results = _student(fake_data_dir, tmp_path / "online", tiny_run, "--kd-temperature", "2")
    teacher = results["distill"]["teachers"][0]
    assert teacher["sha256"] == file_digest(tiny_run / "checkpoints" / "best.pt")
    assert teacher["train_minutes"] is not None and results["distill"]["temperature"] == 2.0
    record = make_record(tmp_path / "online")
    assert record["config"]["distill"]["teachers"] == [str(tiny_run)]
    assert "teacher" in table_row(record)[4]  # the teacher's own time, beside the student's


def test_cached_teacher_logits_are_computed_once_for_the_training_images(
    fake_data_dir, tiny_run, tmp_path
):
    cached = ["--set", "distill.mode=cached", "--set", "distill.views=2"]
    first = _student(fake_data_dir, tmp_path / "a", tiny_run, *cached)["distill"]
    assert first["logits_computed"] == 2 * 200  # two views of the 200 training images
    second = _student(fake_data_dir, tmp_path / "b", tiny_run, *cached, "--seed", "1")
    assert second["distill"]["logits_computed"] == 0  # reused
    assert second["distill"]["cache_files"] == first["cache_files"]
    # The file keeps its own cost: the run that read it reports what the first one paid,
    # and the results table adds it to the teacher's time (the first run's minutes hold it).
    assert second["distill"]["cache_seconds"] == first["cache_seconds"] > [0]
    assert "teacher logits" not in table_row(make_record(tmp_path / "a"))[4]
    reader = make_record(tmp_path / "b")
    reader["distill"]["cache_seconds"] = [600.0]  # as if the first run had taken 10 minutes
    assert table_row(reader)[4].endswith(" + 10.0 min teacher logits")


def _last_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def unaided(fake_data_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The student's recipe without a teacher: the weights it ends with."""
    run_dir = tmp_path_factory.mktemp("unaided") / "run"
    assert main([*STUDENT, "--data-dir", str(fake_data_dir), "--run-dir", str(run_dir)]) == 0
    return _last_weights(run_dir)


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_the_teacher_changes_what_the_student_learns(
    fake_data_dir, learned_run, tmp_path, unaided, mode
):
    """Catches a training step that ignores the teacher: every other distillation test
    checks bookkeeping, which such a step keeps. The same seed and views at --kd-weight 0
    and 0.9 must end with different weights; online, the run at 0 ends exactly where the
    unaided run does (the control: same seed, same weights, so a difference is the
    teacher's). Cached views replace the augmentation, so there the control does not hold."""
    settings = ["--set", f"distill.mode={mode}"]
    if mode == "cached":
        settings += ["--set", "distill.views=1"]
    _student(fake_data_dir, tmp_path / "ignored", learned_run, *settings, "--kd-weight", "0")
    ignored = _last_weights(tmp_path / "ignored")
    if mode == "online":
        assert all(torch.equal(ignored[k], unaided[k]) for k in unaided)
    _student(fake_data_dir, tmp_path / "taught", learned_run, *settings, "--kd-weight", "0.9")
    taught = _last_weights(tmp_path / "taught")
    weights = [k for k in unaided if k.endswith("weight")]
    assert [k for k in weights if torch.equal(taught[k], ignored[k])] == []
