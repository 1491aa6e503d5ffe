"""Process-wide defaults that must be in place before DeepSpeed is imported."""
import os


def _cuda_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl"))


if "DS_ACCELERATOR" not in os.environ and not _cuda_present():
    # DeepSpeed would pick the CPU accelerator anyway, with a warning on every import.
    os.environ["DS_ACCELERATOR"] = "cpu"
