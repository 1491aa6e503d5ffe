"""Iterative Mode Partition: which PAD mask entries stay dynamic (docs/PAD.md sections 4-5).

- ``config``: :class:`PartitionConfig` and its validation
- ``schedule``: the global steps of partition steps and their target ratios
- ``sites``: where the masks live and who holds copies
- ``scores``: IMP sensitivities from the training backward (score sinks), magnitudes, random
- ``sync``: rank synchronization of scores, mask agreement checks
- ``select``: deterministic top-k selection (global or per mask)
- ``partitioner``: :class:`Partitioner`, the training loop's entry point
- ``portable``: its checkpointed state independent of the cluster shape (resume on other ranks)
"""
from .config import PartitionConfig

__all__ = ["PartitionConfig", "Partitioner"]


def __getattr__(name):
    # Lazy: reading a run config (PartitionConfig) should not import DeepSpeed.
    if name == "Partitioner":
        from .partitioner import Partitioner
        return Partitioner
    raise AttributeError(f"module 'padnet_ds.partition' has no attribute {name!r}")
