"""Data for PAD-Net runs. Text classification: `load_text_task` (GLUE, local files, Rotten
Tomatoes), `compute_metrics`, and `encode.EncodedTextDataset` + `encode.collate` for model inputs."""
from .text import TaskSpec, TextDataConfig, TextSplit, load_text_task

__all__ = ["TaskSpec", "TextDataConfig", "TextSplit", "compute_metrics", "load_text_task"]


def __getattr__(name):
    # Lazy: scikit-learn/scipy cost a second to import, and image runs never need them.
    if name == "compute_metrics":
        from .metrics import compute_metrics
        return compute_metrics
    raise AttributeError(f"module 'padnet_ds.data' has no attribute {name!r}")
