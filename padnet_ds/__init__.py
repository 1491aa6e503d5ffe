"""padnet-ds: PAD-Net partially dynamic Mixture-of-Experts on DeepSpeed."""
from . import _env  # noqa: F401  (sets accelerator defaults before DeepSpeed is imported)

__version__ = "0.1.0"
__all__ = ["PADMoE", "PADUnit", "__version__"]


def __getattr__(name):
    # Lazy: `import padnet_ds` for the CLI's argument parsing should not pay for DeepSpeed.
    if name == "PADMoE":
        from .moe.layer import PADMoE
        return PADMoE
    if name == "PADUnit":
        from .pad.compose import PADUnit
        return PADUnit
    raise AttributeError(f"module 'padnet_ds' has no attribute {name!r}")
