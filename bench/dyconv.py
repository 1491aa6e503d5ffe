"""Forward+backward time of PAD DY-Conv against plain DY-Conv at a ResNet-like shape.

    python -m bench.dyconv [--out bench/results/dyconv.json] [--device cpu|cuda]

Variants, timed interleaved (A B C ... A B C ...) after warm-up, median per variant:
  plain          DY-Conv written here, with no mask and no static kernel (the reference)
  pad            PADDynamicConv2d, lambda_mode both, phi != 0, random mask at --ratio
  pad_addcmul    the same composition done as ``addcmul(S, Md, W~)`` over the batch (for comparison)
  dynamic        PADDynamicConv2d with lambda_mode none and the mask all ones (ResNet conv="dynamic")
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet_ds.conv import PADDynamicConv2d


class PlainDyConv(nn.Module):
    """Plain DY-Conv (Chen et al. 2020) without BN in the attention; shares parameters with ``like``."""

    def __init__(self, like: PADDynamicConv2d) -> None:
        super().__init__()
        self.like = like

    def forward(self, x: Tensor) -> Tensor:
        m = self.like
        b, c, h, w = x.shape
        pi = m.kernel_attention(x)
        weight = torch.mm(pi, m.weight.flatten(1)).reshape(b * m.out_channels, *m.weight.shape[2:])
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None, m.stride, m.padding, m.dilation, b * m.groups)
        return out.reshape(b, m.out_channels, *out.shape[2:])


class AddcmulPAD(nn.Module):
    """PAD composed after aggregation: ``W_eff = addcmul(S, Md, W~(x))``, one B*P pass."""

    def __init__(self, like: PADDynamicConv2d) -> None:
        super().__init__()
        self.like = like

    def forward(self, x: Tensor) -> Tensor:
        m = self.like
        b, c, h, w = x.shape
        pi = m.kernel_attention(x)
        static, mdyn = m.pad.shared_terms()
        agg = torch.mm(pi, m.weight.flatten(1)).view(b, *static.shape)
        weight = torch.addcmul(static, mdyn, agg).reshape(b * m.out_channels, *static.shape[1:])
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None, m.stride, m.padding, m.dilation, b * m.groups)
        return out.reshape(b, m.out_channels, *out.shape[2:])


def build(args, device):
    torch.manual_seed(0)
    shape = (args.channels, args.channels, 3)
    pad = PADDynamicConv2d(*shape, padding=1, num_kernels=args.kernels, lambda_mode="both").to(device)
    with torch.no_grad():
        pad.pad.phi.fill_(0.3)
    pad.pad.set_mask(torch.rand(pad.pad.weight_shape, device=device) < args.ratio)
    dynamic = PADDynamicConv2d(*shape, padding=1, num_kernels=args.kernels, lambda_mode="none").to(device)
    plain = PlainDyConv(dynamic)  # same kernels and attention as `dynamic`
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dynamic(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(AddcmulPAD(pad)(x), pad(x), rtol=1e-4, atol=1e-5)
    return {"plain": plain, "pad": pad, "pad_addcmul": AddcmulPAD(pad), "dynamic": dynamic}, x


def step(module: nn.Module, x: Tensor, grad: Tensor, device) -> float:
    for p in module.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--kernels", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.3, help="dynamic ratio of the PAD mask")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default="bench/results/dyconv.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants, x = build(args, device)
    x.requires_grad_(True)  # inside a network the input gradient is always needed
    grad = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    times = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):
        for name, module in variants.items():
            t = step(module, x, grad, device)
            if rep >= args.warmup:
                times[name].append(t)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median["plain"]
    print(f"DY-Conv fwd+bwd, batch {args.batch}, {args.channels}->{args.channels} 3x3, {args.size}x{args.size}, "
          f"K={args.kernels}, PAD ratio {args.ratio}, {device}, threads {torch.get_num_threads()}")
    print(f"{'variant':<12} {'median ms':>10} {'vs plain':>9}")
    for name, t in median.items():
        print(f"{name:<12} {t * 1e3:>10.3f} {t / base:>8.3f}x")
    result = dict(config=vars(args), device=str(device), threads=torch.get_num_threads(),
                  torch=torch.__version__, machine=platform.machine(),
                  median_s=median, ratio_vs_plain={n: t / base for n, t in median.items()},
                  goal="pad / plain <= 1.10", within_goal=median["pad"] / base <= 1.10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pad/plain = {median['pad'] / base:.3f} (goal <= 1.10); wrote {out}")
    return result


if __name__ == "__main__":
    main()
