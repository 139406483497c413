"""Knowledge distillation's loss and its online teacher: what a training step calls.

The student learns the labels and its teachers' softened probabilities (Hinton et al.,
2015)::

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(teacher_T || student_T)

``T^2`` keeps the soft term's gradients the same size whatever the temperature. An
ensemble's target is the mean of its teachers' probabilities at ``T``, as ``cifar100
evaluate`` averages an ensemble: teachers trained apart have logits on different scales,
their probabilities are comparable (and a mixture of distributions is a distribution).

The engine sees only the protocol ``engine.SoftTargets`` (``targets``, ``loss``,
``sees_mixed_images``), so the loop still knows no model. Two kinds implement it:
``OnlineTeacher`` here runs the teachers on every (augmented, mixed) batch;
``teacher_cache.CachedTeacher`` looks their logits up for the stored views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifar100.config.schema import DistillConfig
from cifar100.data.preprocess import Preprocess
from cifar100.training.engine import soft_cross_entropy

TeacherNet = Callable[[torch.Tensor], torch.Tensor]  # float [0, 1] images -> logits


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Each row to mean 0, std 1 (logit standardisation): only the shape is compared."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-7)


def soft_targets(
    teacher_logits: Sequence[torch.Tensor], temperature: float, standardize: bool = False
) -> torch.Tensor:
    """(B, C) the mean over teachers of softmax(logits / T): the ensemble's soft labels."""
    probs = [
        F.softmax((standardized(z.float()) if standardize else z.float()) / temperature, dim=1)
        for z in teacher_logits
    ]
    return torch.stack(probs).mean(dim=0)


def kd_term(
    logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, standardize: bool
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, batch mean; 0 when they agree.

    KL rather than the cross-entropy with the soft targets: the two differ by the
    teachers' entropy, a constant that would hide whether the student matches them.
    """
    z = standardized(logits.float()) if standardize else logits.float()
    log_student = F.log_softmax(z / temperature, dim=1)
    kl = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student  # 0 log 0 = 0
    return temperature**2 * kl.sum(dim=1).mean()


@dataclass
class Distiller:
    """The loss against targets laid out as ``[label targets | teacher probabilities]``.

    Both halves travel as one (B, 2C) tensor so that MixUp/CutMix mix them alike.
    """

    config: DistillConfig
    num_classes: int

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, teacher = targets[:, : self.num_classes], targets[:, self.num_classes :]
        cfg = self.config
        hard = soft_cross_entropy(logits, labels)
        return (1 - cfg.weight) * hard + cfg.weight * kd_term(
            logits, teacher, cfg.temperature, cfg.standardize
        )

    def soft(self, teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return soft_targets(teacher_logits, self.config.temperature, self.config.standardize)


class OnlineTeacher(Distiller):
    """The teachers run on every training batch as the student sees it (augmented, then
    mixed), in eval mode and without gradients: consistent teaching, at a teacher's
    forward pass per image and step."""

    sees_mixed_images = True

    def __init__(
        self,
        config: DistillConfig,
        num_classes: int,
        nets: Sequence[TeacherNet],
        student: Preprocess,
    ):
        super().__init__(config, num_classes)
        self.nets, self.student = list(nets), student

    @torch.no_grad()
    def targets(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # The student's inputs are normalised for it; each teacher brings its own resizing
        # and normalisation, so undo the student's first (exact up to rounding; MixUp and
        # CutMix commute with it). A student input larger than 32 px is resized from there.
        images = inputs.float() * self.student.std + self.student.mean
        return self.soft([net(images) for net in self.nets])
