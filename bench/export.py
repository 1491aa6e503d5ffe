"""Exports (``padnet-ds export``): bytes on disk and serving latency, PAD against the fully dynamic MoE.

    python -m bench.export [--quick] [--shapes h256] [--out bench/results/export.json]

One process. Per shape, an upcycled random-init BERT encoder (2 layers, both FFNs PAD-MoE, E=8,
top-2; hidden / FFN / tokens from ``bench/common.py``; experts perturbed so they differ) is saved
by the DeepSpeed engine with random masks at exactly 0.5 and 0.3 dynamic, and as the r = 0.5
model's fully dynamic twin (each expert's weight its effective ``W_eff(e)``, masks all ones, so
it computes the same function and routes every token the same way: the latency ratio then
compares implementations, not routings), and exported (fp32).

Sizes are read from the written files: ``expert_bytes`` sums the safetensors entries of the
experts' storage (mask bits, static values, values, biases; ``card.export_sizes``);
``export_bytes_ratio_r05/_r03`` = PAD's / the fully dynamic export's, whose experts hold E*P
values per linear and no mask (floor ``(1-r)/E + r + 1/(32E)``, plus the biases in both).
``export_folder_bytes_ratio_rXX``: the whole folders (embeddings and tokenizer included).

Latency: the three loaded models (``PADNetForSequenceClassification.from_pretrained``) forward
the same batches of random token ids, interleaved A B C, under ``torch.no_grad``, after warm-up;
medians. ``export_latency_ratio`` = PAD r=0.5 composed at load / fully dynamic (composed at load;
the two run the same code on weights of the same shape, so the goal is <= 1.05);
``export_latency_ratio_forward`` = PAD composed per forward / fully dynamic; ``twin_max_logit_diff``
checks that the three compute the same logits. Memory: the bytes
each model holds (parameters, buffers, composed weights and per-forward caches, unique storages)
and the peak resident set a fresh process gains loading the model and forwarding one batch
(``VmHWM`` after the imports, reset through ``/proc/self/clear_refs``), per variant.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

from . import common

RATIOS = (1.0, 0.5, 0.3)
LAYERS = 2
PEAK = """
import sys, torch
from padnet_ds.export import PADNetForSequenceClassification
torch.set_num_threads(1)

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: imports are not counted
base = status("VmRSS:")
model = PADNetForSequenceClassification.from_pretrained(sys.argv[1], compose=sys.argv[2])
ids = torch.randint(1000, 2000, (int(sys.argv[3]), int(sys.argv[4])))
with torch.no_grad():
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
print(status("VmHWM:") - base)
"""


def fully_dynamic_twin(layer) -> None:
    """Make a PAD layer (lambdas at 1) the fully dynamic MoE computing the same function, in place:
    ``W_e := M W_e + (1 - M) W_static``, masks all ones."""
    import torch

    with torch.no_grad():
        for unit in layer.pad_units():
            keep = unit.mask.to(unit.static_weight.dtype)
            for lin in layer.local_expert_linears(unit):
                lin.weight.copy_(keep * lin.weight + (1 - keep) * unit.static_weight)
            unit.mask.fill_(True)


def save_run(root: Path, shape: Dict[str, int], ratio: float) -> Path:
    """A run folder whose checkpoint the engine wrote: the same weights and (r < 1) random masks at ``ratio``;
    r = 1 is the r = 0.5 model's fully dynamic twin (same outputs, so both route every token alike)."""
    import torch
    import yaml

    from padnet_ds.engine.checkpoint import save
    from padnet_ds.engine.config import load_config, to_dict
    from padnet_ds.engine.distributed import init_distributed
    from padnet_ds.engine.run_dir import RunDir
    from padnet_ds.engine.setup import build_engine
    from padnet_ds.engine.state import LoopState
    from padnet_ds.models.encoder import build_classifier
    from padnet_ds.moe.layer import pad_moe_layers
    from padnet_ds.moe.upcycle import perturb_experts

    run = root / f"r{ratio}"
    cfg = load_config("configs/smoke.yaml", [
        f"output_dir={run}", f"model.random_init={{hidden_size: {shape['hidden']}, num_hidden_layers: {LAYERS}, "
        f"num_attention_heads: 4, intermediate_size: {shape['ffn']}}}", f"model.max_length={shape['seq']}",
        f"moe.num_experts={common.MOE['experts']}", f"moe.k={common.MOE['k']}", "moe.ep_size=1",
        f"partition.ratio={ratio}"])
    torch.manual_seed(0)
    model = build_classifier(cfg.model.name, 2, False, cfg.moe, cfg.model.random_init)
    gen = torch.Generator().manual_seed(1)
    for layer in pad_moe_layers(model).values():
        perturb_experts(layer, 0.3, seed=2)
        for unit in layer.pad_units():
            scores = torch.rand(unit.weight_shape, generator=gen).reshape(-1)
            mask = torch.zeros(scores.numel(), dtype=torch.bool)
            mask[scores.topk(round((0.5 if ratio == 1.0 else ratio) * scores.numel())).indices] = True
            unit.set_mask(mask.view(unit.weight_shape))
        if ratio == 1.0:
            fully_dynamic_twin(layer)
    init_distributed()  # one gloo rank: the engine saves as it would in a run
    engine = build_engine(model, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}})
    save(engine, None, RunDir(str(run)), LoopState(step=1), keep=0)  # the trainer's own save
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "summary.json").write_text(json.dumps({"label_names": ["negative", "positive"], "is_regression": False}))
    return run


def held_bytes(model) -> int:
    """Unique storage bytes of the model's parameters, buffers and the tensors its PAD linears cache."""
    import torch

    seen: Dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        elif isinstance(t, (list, tuple)):
            for x in t:
                add(x)

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for m in model.modules():
        for key in ("_positions", "_composed", "_workspace"):
            add(m.__dict__.get(key))
    return sum(seen.values())


def peak_rss_mb(folder: Path, compose: str, shape: Dict[str, int]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", PEAK, str(folder), compose, str(shape["batch"]), str(shape["seq"])],
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def bench_shape(name: str, shape: Dict[str, int], root: Path, warm: int, reps: int) -> Dict[str, Any]:
    import torch

    from padnet_ds.export import PADNetForSequenceClassification, export_run

    sizes, folders = {}, {}
    for ratio in RATIOS:
        folders[ratio] = root / f"export-r{ratio}"
        sizes[ratio] = export_run(str(save_run(root, shape, ratio)), str(folders[ratio]))
    full = sizes[1.0]
    out: Dict[str, Any] = {"sizes": {str(r): s for r, s in sizes.items()}}
    experts = common.MOE["experts"]
    for ratio in RATIOS[1:]:
        tag = f"r{str(ratio).replace('.', '')}"
        out[f"export_bytes_ratio_{tag}"] = sizes[ratio]["expert_bytes"] / full["expert_bytes"]
        out[f"export_folder_bytes_ratio_{tag}"] = sizes[ratio]["folder_bytes"] / full["folder_bytes"]
        out[f"export_model_bytes_ratio_{tag}"] = sizes[ratio]["model_bytes"] / full["model_bytes"]
        out[f"export_bytes_floor_{tag}"] = (1 - ratio) / experts + ratio + 1 / (32 * experts)
    models = {"fully_dynamic": PADNetForSequenceClassification.from_pretrained(folders[1.0]),
              "pad_load": PADNetForSequenceClassification.from_pretrained(folders[0.5]),
              "pad_forward": PADNetForSequenceClassification.from_pretrained(folders[0.5], compose="forward")}
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (shape["batch"], shape["seq"]), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(model):
        def run():
            with torch.no_grad():
                model(**batch)
        return run

    with torch.no_grad():  # the twins compute the same function: same routing, same GEMM rows
        logits = [m(**batch).logits for m in models.values()]
    out["twin_max_logit_diff"] = max(float((x - logits[0]).abs().max()) for x in logits[1:])
    times = common.interleave({k: forward(m) for k, m in models.items()}, warm, reps)
    med = {k: common.median(v) for k, v in times.items()}
    out.update(export_latency_ratio=med["pad_load"] / med["fully_dynamic"],
               export_latency_ratio_forward=med["pad_forward"] / med["fully_dynamic"],
               latency_ms={k: 1e3 * v for k, v in med.items()},
               held_bytes={k: held_bytes(m) for k, m in models.items()})
    del models
    out["peak_rss_gain_mb"] = {"fully_dynamic": peak_rss_mb(folders[1.0], "load", shape),
                          "pad_load": peak_rss_mb(folders[0.5], "load", shape),
                          "pad_forward": peak_rss_mb(folders[0.5], "forward", shape)}
    print(common.table(["variant", "forward ms", "held MiB", "peak RSS gain MiB"],
                       [[k, out["latency_ms"][k], out["held_bytes"][k] / 2 ** 20, out["peak_rss_gain_mb"][k]]
                        for k in out["latency_ms"]]))
    print(common.table(["key", name], [[k, v] for k, v in out.items() if common.finite(v)]))
    return out


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "export")
    common.add_shape_args(ap)
    args = ap.parse_args(argv)
    shapes = common.chosen_shapes(args, default="h256,h768s")
    warm, reps = common.warmup(args, 3, 1), common.reps(args, 25, 3)
    os.chdir(Path(__file__).resolve().parents[1])  # configs/ and ds_configs/ are relative to the repository
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for name in shapes:
            (Path(tmp) / name).mkdir()
            results[name] = bench_shape(name, common.SHAPES[name], Path(tmp) / name, warm, reps)
    head = results[shapes[0]]
    result = {key: head[key] for key in head if common.finite(head[key])}
    result.update(results=results, shapes={n: common.SHAPES[n] for n in shapes}, moe=common.MOE, layers=LAYERS,
                  machine=common.machine(), quick=args.quick)
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
