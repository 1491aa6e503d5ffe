"""Deployment cost of PAD weights (docs/PAD.md section 7), shared by MoE and DY-Conv.

For one factor of P values, F factors (experts or kernels) and dynamic ratio r, a fully
dynamic layer stores F*P values. PAD stores the static weight where the mask is 0 and each
factor where it is 1: ``(1-r)*P + r*F*P`` (E=8, r=0.5: 4.5P; K=4, r=0.3: 1.9P, the spec's
worked numbers), plus one mask bit per entry. ``pad_dense_static`` keeps the whole static
weight (``P + r*F*P``), which is what training holds in memory. The ``prune`` baseline has
no static part.
"""
from __future__ import annotations

from typing import Dict


def pad_counts(p: int, factors: int, ratio: float, has_static: bool = True) -> Dict[str, float]:
    return dict(factor_size=p, factors=factors, fully_dynamic=float(factors * p),
                pad=has_static * (1 - ratio) * p + ratio * factors * p,
                pad_dense_static=has_static * p + ratio * factors * p, mask_bits=p, dynamic_ratio=ratio)
