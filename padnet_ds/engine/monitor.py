"""What a run shows while it trains, on rank 0: TensorBoard scalars and the expert-load heatmap, a progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..comm import rank


class Monitor:
    """TensorBoard on rank 0 (a no-op elsewhere).

    ``purge_step``: TensorBoard hides every event at this step or later that earlier event files
    of ``logdir`` hold (a resumed run replays the steps after its checkpoint).
    """

    def __init__(self, logdir: Path, enabled: bool, purge_step: Optional[int] = None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def partition(self, entry: Dict[str, Any], step: int) -> None:
        """A partition step's target and achieved ratio, overall and per PAD unit."""
        scalars = {"partition/ratio": entry.get("ratio", float("nan")),
                   "partition/achieved": entry.get("achieved", float("nan"))}
        for name, layer in entry.get("layers", {}).items():
            scalars[f"partition/{name}/ratio"] = layer.get("ratio", float("nan"))
        self.scalars(scalars, step)

    def expert_load(self, loads: Sequence[torch.Tensor], layer_names: Sequence[str], step: int) -> None:
        """``loads[l][e]``: tokens routed to global expert e of layer l, summed over ranks."""
        if self.writer is None or not loads:
            return
        matrix = torch.stack([counts.float().cpu() for counts in loads]).numpy()  # [layers, experts]
        for name, row in zip(layer_names, matrix):
            share = row / max(row.sum(), 1.0)
            for e, value in enumerate(share):
                self.writer.add_scalar(f"moe/{name}/expert_{e}_load", float(value), step)
        self.writer.add_image("moe/expert_load_heatmap", heatmap(matrix), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def heatmap(matrix: np.ndarray, cell: int = 16) -> np.ndarray:
    """Rows = layers, columns = experts; each row normalised to its share, dark blue -> yellow."""
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
    scale = share / max(float(share.max()), 1e-12)
    low, high = np.array([30, 30, 120], np.float32), np.array([250, 230, 40], np.float32)
    rgb = (low + scale[..., None] * (high - low)).astype(np.uint8)  # [layers, experts, 3]
    return np.kron(rgb, np.ones((cell, cell, 1), np.uint8))  # each cell cell x cell pixels


class Progress:
    """tqdm on rank 0, silent elsewhere."""

    def __init__(self, total: int, start: int) -> None:
        self.bar = None
        if rank() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)
        self.last = start

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
