"""An export's sizes, read from its files, and its model card (README.md).

Expert bytes are what an export stores for the dynamic factors of its PAD weights (the experts of
every MoE linear, the kernels of every DY-Conv layer): the mask bits, the static values, the
factors' values and their biases, i.e. everything that differs from a fully dynamic model of the
same shape, whose factors would hold F * P values each weight (``fully_dynamic_expert_bytes``,
from the shapes in config.json at the export's dtype).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, List, Tuple

EXPERT_PARTS = ("mask_bits", "static_values", "values", "bias")


def tensor_bytes(path: Path) -> Dict[str, Tuple[int, str]]:
    """{name: (bytes on disk, dtype)} from a safetensors file's header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: (v["data_offsets"][1] - v["data_offsets"][0], v["dtype"]) for k, v in header.items()
            if k != "__metadata__"}


def pad_prefixes(config: Dict[str, Any]) -> List[Tuple[str, Dict]]:
    """(tensor-name prefix, PAD weight spec) of every PAD weight of an export's config.json."""
    out = []
    for layer, spec in ((config.get("moe") or {}).get("layers") or {}).items():
        out += [(f"model.{layer}.output.moe.{fc}.", s) for fc, s in spec.items()]
    for layer, spec in (config.get("dyconv") or {}).get("layers", {}).items():
        out.append((f"{layer}.", spec))
    return out


def is_expert_tensor(name: str, prefix: str) -> bool:
    rest = name[len(prefix):]
    return name.startswith(prefix) and rest.replace("pad.", "", 1).split(".")[0] in EXPERT_PARTS


def export_sizes(folder: Path) -> Dict[str, Any]:
    """Bytes on disk: the folder, model.safetensors, the expert storage, and a fully dynamic model's."""
    config = json.loads((folder / "config.json").read_text())
    tensors = tensor_bytes(folder / "model.safetensors")
    expert = fully = 0
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    for prefix, spec in pad_prefixes(config):
        names = [k for k in tensors if is_expert_tensor(k, prefix)]
        expert += sum(tensors[k][0] for k in names)
        dtype = next(tensors[k][1] for k in names if ".values" in k[len(prefix) - 1:])
        bias = sum(tensors[k][0] for k in names if k.endswith(".bias"))
        fully += len(spec["dynamic"]) * math.prod(spec["shape"]) * itemsize[dtype] + bias
    return {"folder_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
            "model_bytes": (folder / "model.safetensors").stat().st_size,
            "expert_bytes": expert, "fully_dynamic_expert_bytes": fully,
            "expert_bytes_ratio": expert / fully if fully else None}


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def model_card(config, summary: Dict[str, Any], sizes: Dict[str, Any], source: str) -> str:
    """README.md: where the model came from, its eval metrics, dynamic ratios, sizes and how to load it."""
    cfg = config.to_dict()
    text = cfg.get("model_type") == "padnet_moe"
    specs = pad_prefixes(cfg)
    dynamic = sum(sum(s["dynamic"]) for _, s in specs)
    total = sum(len(s["dynamic"]) * math.prod(s["shape"]) for _, s in specs)
    lines = ["---", f"library_name: {'transformers' if text else 'padnet-ds'}",
             "tags: [padnet-ds, pad-net, " + ("mixture-of-experts]" if text else "dynamic-convolution]"), "---", "",
             f"# {summary.get('task') or cfg.get('padnet', {}).get('task', 'padnet-ds')} "
             f"({'PAD-MoE' if text else 'PAD DY-Conv ResNet'}, exported by padnet-ds)", "",
             f"Exported from `{source}` (step {cfg.get('padnet', {}).get('step')}), "
             f"stored in {cfg.get('padnet', {}).get('dtype')}.", ""]
    step = cfg.get("padnet", {}).get("step")
    if summary.get("eval") and summary.get("steps") not in (None, step):
        lines += [f"(summary.json's eval metrics are of step {summary['steps']}, not of this checkpoint: "
                  "`padnet-ds eval` it for its own.)", ""]
    elif summary.get("eval"):
        lines += ["| eval metric | final | best |", "|---|---|---|"]
        best = summary.get("best_eval") or {}
        lines += [f"| {k} | {v:.4f} | {best.get(k, float('nan')):.4f} |" for k, v in summary["eval"].items()
                  if isinstance(v, (int, float))]
        lines.append("")
    if specs:
        lines += [f"Overall dynamic ratio {dynamic / total:.3f} (of {total} factor entries).", "",
                  "| PAD weight | shape | factors | dynamic ratio | lambda_d | lambda_s |", "|---|---|---|---|---|---|"]
        lines += [f"| {p.rstrip('.')} | {s['shape']} | {len(s['dynamic'])} | {s['dynamic_ratio']:.3f} | "
                  f"{s['lambda_d']:.4f} | {s['lambda_s']:.4f} |" for p, s in specs]
        lines.append("")
    ratio = sizes.get("expert_bytes_ratio")
    lines += [f"Sizes on disk: folder {_mb(sizes['folder_bytes'])}, model.safetensors {_mb(sizes['model_bytes'])}; "
              f"expert storage {_mb(sizes['expert_bytes'])}"
              + (f" = {ratio:.3f} of a fully dynamic model's {_mb(sizes['fully_dynamic_expert_bytes'])}." if ratio
                 else "."), ""]
    lines += _usage(text)
    return "\n".join(lines) + "\n"


def _usage(text: bool) -> List[str]:
    if not text:
        return ["```python", "from padnet_ds.export import PADResNetForImageClassification",
                "model = PADResNetForImageClassification.from_pretrained(\"THIS_FOLDER\")",
                "logits = model(pixel_values).logits   # [B, C, H, W] pixels as in training (0..1)", "```"]
    return ["```python", "from transformers import pipeline",
            "classify = pipeline(\"text-classification\", model=\"THIS_FOLDER\", trust_remote_code=True)",
            "classify(\"a gripping, funny film\")", "```", "",
            "or `padnet-ds predict THIS_FOLDER rows.csv --output predictions.csv`. No DeepSpeed is needed: "
            "`modeling_padnet.py` is plain torch. Routing is DeepSpeed's top-k gate without a capacity limit "
            "(no token is dropped); `from_pretrained(..., compose=\"forward\")` composes expert weights per "
            "forward instead of once at load (less memory, slower)."]
