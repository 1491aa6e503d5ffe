"""Run as a fresh process by tests/export/test_export.py: load exports, compute eval-split logits, report.

    python check_export.py package JOBS.json   # padnet_ds.export's class (padnet-ds importable, DeepSpeed not)
    python check_export.py remote JOBS.json    # transformers' AutoModel and pipeline with trust_remote_code,
                                               # padnet_ds and deepspeed blocked from importing at all

JOBS.json: {"texts": {"a": [...], "b": [...] | null}, "exports": {name: folder}}. Prints one JSON line
{name: {route: [[logits of row i], ...]}, "modules": [padnet/deepspeed modules imported]}.
Imports nothing from tests/ or padnet_ds at module level (in remote mode neither is importable).
"""
import importlib.abc
import json
import sys


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("padnet_ds", "deepspeed"):
            raise ImportError(f"{name} must not be needed to load an export")


def batches(tokenizer, texts, max_length, size=16):
    a, b = texts["a"], texts["b"]
    for start in range(0, len(a), size):
        yield tokenizer(a[start:start + size], None if b is None else b[start:start + size], truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")


def package(folder, texts):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from padnet_ds.export import PADNetConfig, PADNetForSequenceClassification

    AutoConfig.register(PADNetConfig.model_type, PADNetConfig, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = {}
    for compose in ("load", "forward"):
        model = PADNetForSequenceClassification.from_pretrained(folder, compose=compose)
        with torch.no_grad():
            out[compose] = torch.cat([model(**b).logits for b in batches(tokenizer, texts,
                                                                       model.config.padnet["max_length"])]).tolist()
    return out


def remote(folder, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        auto = torch.cat([model(**b).logits for b in batches(tokenizer, texts,
                                                           model.config.padnet["max_length"])]).tolist()
    classify = pipeline("text-classification", model=folder, trust_remote_code=True)
    inputs = texts["a"] if texts["b"] is None else [{"text": a, "text_pair": b} for a, b in zip(texts["a"], texts["b"])]
    order = [model.config.id2label[i] for i in range(model.config.num_labels)]
    scored = classify(inputs, function_to_apply="none", top_k=None, truncation=True, batch_size=8)
    piped = [[{s["label"]: s["score"] for s in row}[label] for label in order] for row in scored]
    return {"auto": auto, "pipeline": piped}


def main(mode, jobs_file):
    if mode == "remote":
        sys.meta_path.insert(0, Blocked())
    with open(jobs_file) as f:
        jobs = json.load(f)
    run = package if mode == "package" else remote
    result = {name: run(folder, jobs["texts"]) for name, folder in jobs["exports"].items()}
    result["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "padnet_ds"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
