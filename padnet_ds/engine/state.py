"""What the training loop carries from step to step: its position (checkpointed) and the log window."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

from torch import Tensor

from ..errors import CheckpointError

Number = Union[Tensor, float, int]


@dataclass
class LoopState:
    """Where the loop is. Saved in every checkpoint (DeepSpeed's client state ``padnet``), restored on resume."""
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    rows_in_epoch: int = 0  # rows of `epoch`'s global order already trained on (all ranks together)
    best: Dict[str, Any] = field(default_factory=dict)  # metrics of the best eval so far, plus its "step"
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per log step

    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        missing = [n for n in names if n not in state]
        if "batch_in_epoch" in state and missing == ["rows_in_epoch"]:
            raise ValueError("checkpoint loop state counts this rank's micro-batches (batch_in_epoch), from a "
                             "padnet-ds version whose data order depended on the number of ranks: resume it with "
                             "that version, or start the run again")
        if missing:
            raise CheckpointError(f"checkpoint loop state lacks {missing}: it was not written by padnet-ds train")
        for name in names:  # other keys (e.g. "tag", which older versions stored) are ignored
            setattr(self, name, copy.deepcopy(state[name]))

    def record_eval(self, metrics: Dict[str, float], main_metric: str) -> None:
        """Keep ``metrics`` as the best eval when its ``main_metric`` beats the best so far."""
        main = metrics.get(main_metric)
        if main is not None and (not self.best or main > self.best.get(main_metric, -math.inf)):
            self.best = dict(metrics, step=self.step)


@dataclass
class LogWindow:
    """Sums over the micro-batches since the last log step.

    Loss, aux loss and tokens stay device tensors until the log step reads them: a ``float()``
    per micro-batch would synchronise the GPU every micro-batch.
    """
    loss: Number = 0.0
    aux: Number = 0.0
    micro_batches: int = 0
    tokens: Number = 0
    expert_loads: Dict[str, Tensor] = field(default_factory=dict)  # MoE layer -> tokens per global expert
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: Tensor, aux, tokens: Number, expert_loads: Dict[str, Tensor]) -> None:
        self.tokens += tokens
        self.loss += loss.detach().float()
        self.aux += aux.detach().float() if aux is not None else 0.0
        self.micro_batches += 1
        for name, counts in expert_loads.items():
            self.expert_loads[name] = self.expert_loads.get(name, 0) + counts

    def means(self) -> Dict[str, float]:
        """This rank's mean loss and aux loss per micro-batch, and its tokens per second."""
        elapsed = time.perf_counter() - self.started
        n = max(1, self.micro_batches)
        return {"loss": float(self.loss) / n, "l_aux": float(self.aux) / n,
                "tokens_per_s": float(self.tokens) / max(elapsed, 1e-9)}
