"""Models made PAD-dynamic: upcycled BERT-family encoders (encoder.py), DY-Conv ResNets (resnet.py) and
the image classifier around them (image.py, batchnorm.py)."""

_ENCODER = ("MoEConfig", "MoEFFNOutput", "upcycle_encoder", "ffn_layers", "build_classifier")
_PRETRAINED = ("resolve_model_path", "load_tokenizer")
__all__ = list(_ENCODER + _PRETRAINED)


def __getattr__(name):
    # Lazy, so that importing padnet_ds.models does not pull in DeepSpeed and transformers.
    if name in _ENCODER:
        from . import encoder
        return getattr(encoder, name)
    if name in _PRETRAINED:
        from . import pretrained
        return getattr(pretrained, name)
    raise AttributeError(f"module 'padnet_ds.models' has no attribute {name!r}")
