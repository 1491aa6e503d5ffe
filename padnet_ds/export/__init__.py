"""Exports: a checkpoint as a folder that loads and serves without DeepSpeed (``padnet-ds export`` / ``predict``).

``PADNetForSequenceClassification`` / ``PADNetConfig`` are the text model (the same source files
every export folder carries for ``trust_remote_code``), ``PADResNetForImageClassification`` the
vision one, ``export_run`` writes a folder, ``predict_file`` classifies a CSV/TSV/JSONL file.
Imports are lazy: loading an export imports neither DeepSpeed nor the training code.
"""

_NAMES = {"PADNetConfig": "configuration_padnet", "PADNetForSequenceClassification": "modeling_padnet",
          "NotAnExportError": "modeling_padnet", "PADResNetForImageClassification": "vision",
          "export_run": "writer", "predict_file": "predict"}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        from importlib import import_module

        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'padnet_ds.export' has no attribute {name!r}")
