"""Data for PAD-Net runs. Text classification: `load_text_task` (GLUE, local files, Rotten
Tomatoes), `compute_metrics`, and `encode.EncodedTextDataset` + `encode.pad_to_length` for model inputs;
images for the DY-Conv ResNets in `images`."""
from .config import TextDataConfig
from .splits import TaskSpec, TextSplit
from .text import load_text_task

__all__ = ["TaskSpec", "TextDataConfig", "TextSplit", "compute_metrics", "load_text_task"]


def __getattr__(name):
    # Lazy: scikit-learn/scipy cost a second to import, and image runs never need them.
    if name == "compute_metrics":
        from .metrics import compute_metrics
        return compute_metrics
    raise AttributeError(f"module 'padnet_ds.data' has no attribute {name!r}")
