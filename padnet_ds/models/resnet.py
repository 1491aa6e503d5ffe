"""ResNet-18/50 whose residual-block convolutions are PAD DY-Conv, plain DY-Conv or static.

``conv="pad"``: every conv inside a residual block is a :class:`PADDynamicConv2d`.
``conv="dynamic"``: the same layer with ``lambda_mode="none"`` and the mask left all ones,
which is exactly plain DY-Conv. ``conv="static"``: an ordinary ResNet. The stem, the 1x1
downsample shortcuts and the classifier stay static in every mode (as in DY-Conv and PAD-Net).
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Type, Union

from torch import Tensor, nn

from ..conv.dyconv import PADDynamicConv2d
from ..pad.compose import PADUnit

CONV_MODES = ("pad", "dynamic", "static")
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}

ConvFactory = Callable[..., nn.Module]


def conv_factory(conv: str, num_kernels: int = 4, temperature: float = 30.0, reduction: int = 16,
                 lambda_mode: str = "both") -> ConvFactory:
    """``make(in_ch, out_ch, kernel_size, stride, padding)`` for the block convs of one mode."""
    if conv not in CONV_MODES:
        raise ValueError(f"conv={conv!r} is not one of {CONV_MODES}")
    if conv == "static":
        return lambda i, o, k, s=1, p=0: nn.Conv2d(i, o, k, s, p, bias=False)
    mode = "none" if conv == "dynamic" else lambda_mode
    return lambda i, o, k, s=1, p=0: PADDynamicConv2d(i, o, k, s, p, num_kernels=num_kernels,
                                                      temperature=temperature, reduction=reduction,
                                                      lambda_mode=mode)


def shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, make: ConvFactory) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = make(in_ch, width, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make(width, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, make: ConvFactory) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = make(in_ch, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make(width, width, 3, stride, 1)  # stride on the 3x3, as torchvision's ResNet v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = make(width, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


class ResNet(nn.Module):

    def __init__(self, block: Union[Type[BasicBlock], Type[Bottleneck]], layers: Sequence[int], make: ConvFactory,
                 num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 width: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        stem = widths[0]
        if small_input:  # 28x28 / 32x32 images: keep resolution for the residual stages
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages: List[nn.Module] = []
        in_ch = stem
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, 2 if (i > 0 and j == 0) else 1, make))
                in_ch = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            # Same init for static convs, every DY-Conv kernel and the static PAD kernel, so the
            # three conv modes differ only in the layer type.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, PADDynamicConv2d):
                for kernel in (*m.weight.data, m.pad.static_weight.data):
                    nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
        for name, layer in dyconv_layers(self):
            layer.pad.name = name  # so partitioner logs and errors name the layer

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_resnet(depth: int = 18, conv: str = "pad", num_kernels: int = 4, small_input: bool = False,
                 in_channels: int = 3, num_classes: int = 1000, width: float = 1.0, lambda_mode: str = "both",
                 temperature: float = 30.0, reduction: int = 16) -> ResNet:
    if depth not in LAYOUTS:
        raise ValueError(f"depth={depth} is not supported: use one of {sorted(LAYOUTS)}")
    kind, layers = LAYOUTS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    make = conv_factory(conv, num_kernels, temperature, reduction, lambda_mode)
    return ResNet(block, layers, make, num_classes, in_channels, small_input, width)


def dyconv_layers(model: nn.Module) -> List[Tuple[str, PADDynamicConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PADDynamicConv2d)]


def pad_units(model: nn.Module) -> List[Tuple[str, PADUnit]]:
    """(layer name, PAD unit) for every DY-Conv layer, in module order: what a partitioner scores."""
    return [(n, m.pad) for n, m in dyconv_layers(model)]
