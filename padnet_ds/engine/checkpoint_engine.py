"""DeepSpeed's checkpoint engine, loading safely and saying which files it wrote.

DeepSpeed reads every file of a checkpoint through ``engine.checkpoint_engine.load(path,
map_location)``: the model states, the per-expert files (``load_moe_state_dict(...,
checkpoint_engine=self.checkpoint_engine)``) and the ZeRO optimizer shards. Its
``TorchCheckpointEngine`` unpickles them with ``weights_only=False``; :class:`SafeCheckpointEngine`
loads through :func:`padnet_ds.files.safe_load` instead, so a crafted file is refused (with its
name) before anything in it runs. It also records the paths it saves, so that
:func:`padnet_ds.engine.checkpoint.save` can claim them in the tag being committed
(:mod:`padnet_ds.commit`) and each rank hashes its own files.

:func:`install` swaps it in after ``deepspeed.initialize`` (``build_engine`` does this for every
engine padnet-ds builds). DeepSpeed's other writers (``checkpoint.writer``, DataStates) write
asynchronously or elsewhere; ``setup.check_ds_settings`` refuses them.
"""
from __future__ import annotations

from typing import Any, List

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ..files import safe_load


class SafeCheckpointEngine(TorchCheckpointEngine):

    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.written: List[str] = []

    def save(self, state_dict, path: str) -> None:
        super().save(state_dict, path)
        self.written.append(path)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    def take_written(self) -> List[str]:
        """The paths saved since the last call."""
        written, self.written = self.written, []
        return written


def install(engine) -> SafeCheckpointEngine:
    """Replace ``engine.checkpoint_engine`` (a plain ``TorchCheckpointEngine``) by a safe one with the same settings."""
    current = engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(f"DeepSpeed chose the checkpoint engine {type(current).__name__}; padnet-ds commits "
                        "checkpoints itself and needs DeepSpeed's TorchCheckpointEngine (remove checkpoint.writer)")
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # its serialization setting; no second "Initialized" log
    safe.written = []
    engine.checkpoint_engine = safe
    return safe
