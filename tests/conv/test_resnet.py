import pytest
import torch
from torch import nn

from padnet_ds.conv import PADDynamicConv2d, set_temperature
from padnet_ds.models.resnet import build_resnet, dyconv_layers, pad_units

BLOCK_CONVS = {18: 8 * 2, 50: 16 * 3}


@pytest.mark.parametrize("conv", ["pad", "dynamic", "static"])
@pytest.mark.parametrize("depth", [18, 50])
def test_small_resnet_forward_backward(depth, conv):
    torch.manual_seed(0)
    model = build_resnet(depth, conv, num_kernels=3, small_input=True, in_channels=1, num_classes=7, width=0.125)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 7)
    out.square().mean().backward()
    layers = dyconv_layers(model)
    units = pad_units(model)
    if conv == "static":
        assert layers == [] and units == []
        assert not any(isinstance(m, PADDynamicConv2d) for m in model.modules())
    else:
        assert len(layers) == BLOCK_CONVS[depth] and [n for n, _ in units] == [n for n, _ in layers]
        assert all(u.name == n for n, u in units)
        want_mode = "none" if conv == "dynamic" else "both"
        assert all(m.pad.lambda_mode == want_mode and bool(m.pad.mask.all()) for _, m in layers)
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in layers)
        if conv == "pad":
            assert all(u.phi.grad is not None for _, u in units)
    # stem, shortcuts and classifier stay static in every mode
    assert isinstance(model.stem[0], nn.Conv2d) and isinstance(model.fc, nn.Linear)
    for name, m in model.named_modules():
        if name.endswith("downsample.0"):
            assert type(m) is nn.Conv2d and m.kernel_size == (1, 1)


def test_large_input_stem_and_temperature():
    model = build_resnet(18, "pad", num_kernels=2, small_input=False, in_channels=3, num_classes=5, width=0.0625)
    assert isinstance(model.stem[-1], nn.MaxPool2d)
    assert set_temperature(model, 1.0) == 16
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(34)
    with pytest.raises(ValueError, match="conv"):
        build_resnet(18, "moe")
    with pytest.raises(ValueError, match="lambda_mode"):
        build_resnet(18, "pad", lambda_mode="x", width=0.0625)
