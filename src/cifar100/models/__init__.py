"""Model registry: name -> builder, with the input size and normalisation each model expects.

Models are pure ``nn.Module``s that take normalised float images; they never read files.
Weights for pretrained models are resolved by ``cifar100.models.weights`` and loaded by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cifar100.config.schema import ConfigError, ModelConfig
from cifar100.data.cifar import MEAN as CIFAR_MEAN
from cifar100.data.cifar import NUM_CLASSES
from cifar100.data.cifar import STD as CIFAR_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128; on [0, 1] images that is:
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    builder: Callable[[ModelConfig, int], nn.Module]
    input_size: int  # images are resized to this before the model sees them
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool  # needs ImageNet weights
    description: str
    # The stages it trains: a name in cifar100.training.plans.PLANS ("scratch": one stage;
    # "transfer": frozen backbone, then fine-tuning). A name, not the function: see there.
    plan: str


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        # ConfigError is a ValueError too: callers that caught ValueError still do.
        raise ConfigError(f"unknown model '{name}' (choose from {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def input_size(config: ModelConfig) -> int:
    return config.image_size or model_spec(config.name).input_size


def build_model(config: ModelConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    return model_spec(config.name).builder(config, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int) -> int:
    """Forward FLOPs for one image (2 per multiply-add) of convolutions and linear layers.

    Norms, activations and pooling are left out: they are memory-bound and small next to
    the matmuls. A training step costs about three times the forward pass.
    """
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            total += 2 * per_output * output[0].numel()
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def _register_builtin() -> None:
    from cifar100.models import cnn, efficientnet_lite, mobilenetv2, resnet

    register(
        ModelSpec(
            name="cnn-seed",
            builder=cnn.build_seed_cnn,
            input_size=32,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            pretrained=False,
            description="the coursework CNN: Conv-BN-ReLU stacks, MaxPool, Dropout, GAP",
            plan="scratch",
        )
    )
    register(
        ModelSpec(
            name="cnn-fast",
            builder=cnn.build_fast_cnn,
            input_size=32,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            pretrained=False,
            description="residual CNN tuned for accuracy per CPU-minute",
            plan="scratch",
        )
    )
    register(
        ModelSpec(
            name="resnet18",
            builder=resnet.build_resnet18,
            input_size=32,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            pretrained=False,
            description="ResNet-18 with a 3x3 stem for 32 px: the GPU recipe's network",
            plan="scratch",
        )
    )
    register(
        ModelSpec(
            name="mobilenetv2",
            builder=mobilenetv2.build_mobilenetv2,
            input_size=128,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pretrained=True,
            description="ImageNet MobileNetV2, frozen then fine-tuned",
            plan="transfer",
        )
    )
    for variant, input_size in ((efficientnet_lite.LITE0, 128), (efficientnet_lite.LITE2, 160)):
        register(
            ModelSpec(
                name=variant.name,
                builder=efficientnet_lite.build_efficientnet_lite,
                input_size=input_size,
                mean=LITE_MEAN,
                std=LITE_STD,
                pretrained=True,
                description=f"ImageNet EfficientNet-Lite{variant.name[-1]}, frozen then fine-tuned",
                plan="transfer",
            )
        )


_register_builtin()
