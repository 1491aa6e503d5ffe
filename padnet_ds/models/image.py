"""``ImageClassifier``: a ResNet (PAD DY-Conv, plain DY-Conv or static) as the training loop drives models.

``forward(pixel_values, labels=None)`` returns ``.loss`` (cross entropy) and ``.logits``, like
a Hugging Face classifier. Around the ResNet it keeps what must be identical on every rank and
travel with the checkpoint: the input normalisation, the DY-Conv attention temperature (a
buffer mirroring the plain float on each layer, so ``padnet-ds eval`` of a checkpoint uses the
trained value) and, after each training forward, BatchNorm statistics averaged over the ranks.
Training forwards may augment the batch (random shifts and flips).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conv.dyconv import set_temperature
from .batchnorm import average_bn_stats, match_bn_buffers


@dataclass
class ClassifierOutput:
    loss: Optional[Tensor]
    logits: Tensor


def shift_flip(x: Tensor, shift: int, flip: bool) -> Tensor:
    """Random shifts by up to ``shift`` pixels (zero padding) and optional horizontal flips, per image.

    Drawn from torch's global generator inside the training forward, which the loop seeds and
    checkpoints per rank; batches a resumed run skips are never forwarded, so it draws the same.
    """
    if shift > 0:
        b, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))  # [B, C, H + 2 shift, W + 2 shift]
        offsets = torch.randint(0, 2 * shift + 1, (b, 2)).tolist()
        x = torch.stack([padded[i, :, dy: dy + h, dx: dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        x = torch.where((torch.rand(x.shape[0]) < 0.5).to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x


class ImageClassifier(nn.Module):
    """``forward(pixel_values, labels=None)`` -> ``.loss`` (cross entropy) and ``.logits`` around a ResNet."""

    def __init__(self, resnet: nn.Module, mean: Tensor, std: Tensor, temperature: float,
                 sync_bn_stats: bool = True, augment_shift: int = 0, augment_flip: bool = False) -> None:
        super().__init__()
        self.resnet = resnet
        self.augment_shift, self.augment_flip = augment_shift, augment_flip  # training forwards only
        self.register_buffer("pixel_mean", mean.reshape(1, -1, 1, 1).clone())  # [1, C, 1, 1]
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
