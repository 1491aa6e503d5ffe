"""Training memory per rank: DeepSpeed's stock MoE (fully dynamic) against PAD at dynamic ratios 1.0, 0.5, 0.3,
dense and packed.

    python -m bench.memory [--quick] [--shapes h256,h768] [--out bench/results/memory.json]

2 gloo ranks, ep_size 2, ZeRO 2, fp32, E=8, k=2, torch AdamW, the shapes of ``bench.moe_step``;
the model is the MoE layer alone. Bytes are counted, not sampled, so no timing is involved.

Model states (``model_states_bytes``), counted on each rank right after the backward of the
second training step (so Adam's states exist and the step's gradients are held), as unique
tensor storages (a storage reached twice counts once, at its full ``nbytes``):
  params      the module's parameters and buffers (PAD: also the bool masks). Under ZeRO 2 these
              are views into DeepSpeed's flat bit16 groups, whose storages are counted instead.
  grads       ``.grad`` of module parameters, plus every tensor held by the ZeRO optimizer under
              an attribute whose name contains ``grad`` (averaged / partitioned gradients, the
              ipg reduction buckets)
  master      the ZeRO optimizer's fp32 partitions (``single_partition_of_fp32_groups``), which
              DeepSpeed keeps even in fp32 training
  optimizer   the inner optimizer's ``state`` tensors (AdamW exp_avg, exp_avg_sq, step)
  other       any other tensor reachable from the ZeRO optimizer's attributes (depth <= 3)

Activations (``activation_bytes``): the unique storage bytes of every tensor saved for backward
during one training forward of the MoE layer, captured with
``torch.autograd.graph.saved_tensors_hooks``, parameter storages excluded, plus PAD's per-layer
composition terms (``S``, ``Md``, ``1 - M``, kept on the hub node's context) and the weight-sized
workspace each PAD unit keeps.

Checkpoint bytes (``checkpoint_bytes``): the size on disk of one ``engine.save_checkpoint`` after
those steps, every rank's files together (model states, one file per global expert, ZeRO
optimizer partitions); ``checkpoint_bytes_ratio_packed_rXX`` is packed over the stock MoE's.

``memory_ratio_rXX`` = PAD at ratio XX / stock MoE, model states per rank (training memory; dense
PAD trains with dense static weights and full expert tensors, so this is >= 1 and the same for
every ratio). ``memory_ratio_packed_rXX``: the same layer packed (``PADMoE.pack``: each expert
holds only its values at the mask's dynamic positions, the static weight only where the mask is
0, int32 positions once per layer); ``packed_dense_static`` keeps the whole static weight (the
alternative the packed layout was chosen against). ``deployment_ratio_rXX`` is the packed storage
``(1-r)P + rEP`` over ``EP`` from ``padnet_ds.pad.accounting.pad_counts`` (expert weights only;
biases and gate excluded).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List

from . import common

RATIOS = (1.0, 0.5, 0.3)
PACKED_RATIOS = (0.5, 0.3)
PACKED_KINDS = ("packed", "packed_dense_static")


def _storage(t) -> tuple:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def walk_tensors(obj, prefix: str, depth: int, found: List[tuple], seen_objs: set) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        found.append((prefix, obj))
        if obj.grad is not None:
            found.append((prefix + ".grad", obj.grad))
        return
    if depth < 0 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            walk_tensors(v, f"{prefix}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{prefix}[param]", depth - 1,
                         found, seen_objs)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            walk_tensors(v, f"{prefix}[{i}]", depth - 1, found, seen_objs)


def count_model_states(engine) -> Dict[str, int]:
    """Bytes per category of every unique storage held by the module and the (ZeRO) optimizer."""
    import torch

    zero = engine.optimizer
    items: List[tuple] = []  # (category, tensor), first category wins
    module = engine.module
    params = list(module.parameters())
    items += [("params", p) for p in params]
    items += [("params", b) for b in module.buffers()]
    items += [("grads", p.grad) for p in params if p.grad is not None]
    inner = getattr(zero, "optimizer", zero)
    for group in getattr(zero, "single_partition_of_fp32_groups", []):
        items.append(("master", group))
        if group.grad is not None:
            items.append(("grads", group.grad))
    for flat in getattr(zero, "bit16_groups_flat", []):
        items.append(("params", flat))
    for state in inner.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                items.append(("optimizer", v))
    found: List[tuple] = []
    for name, value in vars(zero).items():
        if name in ("optimizer", "module") or isinstance(value, torch.nn.Module):
            continue
        walk_tensors(value, name, 3, found, set())
    for path, t in found:
        items.append(("grads" if "grad" in path.split("[")[0] else "other", t))
    seen = set()
    out = dict(params=0, grads=0, master=0, optimizer=0, other=0)
    for cat, t in items:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = _storage(t)
        if key[0] in seen or key[0] == 0:
            continue
        seen.add(key[0])
        out[cat] += key[1]
    out["total"] = sum(v for k, v in out.items())
    return out


def saved_activation_bytes(fn, exclude_ptrs: set) -> int:
    """Bytes kept for backward by ``fn()``'s graph: saved tensors, plus what PAD keeps outside them.

    A PAD ``Composition`` holds ``S``, ``Md`` and ``1 - M`` (and ``lambda_s W_static`` while
    scoring) on its hub node's context rather than in ``saved_tensors``, and each PAD unit keeps
    one weight-sized workspace across steps: both are counted here too.
    """
    import torch

    from padnet_ds.pad.compose import Composition
    from padnet_ds.pad.packed import PackedComposition

    storages: Dict[int, int] = {}

    def add(t):
        if t.device.type != "meta":
            ptr, nbytes = _storage(t)
            if ptr not in exclude_ptrs and ptr != 0:
                storages[ptr] = nbytes

    def pack(t):
        add(t)
        return t

    built = []
    originals = {cls: cls.__init__ for cls in (Composition, PackedComposition)}

    def recording(original):
        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            built.append(self)
        return init

    for cls, original in originals.items():
        cls.__init__ = recording(original)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for cls, original in originals.items():
            cls.__init__ = original
    for comp in built:
        for t in comp.kept():
            add(t)
    del out
    return sum(storages.values())


def checkpoint_bytes(engine, folder: str, tag: str) -> int:
    """Bytes on disk of ``engine.save_checkpoint`` (every rank's files; removed afterwards). Collective."""
    import shutil

    import torch

    engine.save_checkpoint(folder, tag=tag)
    torch.distributed.barrier()
    path = Path(folder) / tag
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(path)
    return total


def _rank(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import gc

    import torch

    common.quiet_deepspeed()
    from padnet_ds.engine.setup import build_engine

    from .moe_step import adamw, ds_config, make_models, train_step

    res: Dict[str, Any] = {}
    for s in cfg["shapes"]:
        shape = common.SHAPES[s]
        h, f = shape["hidden"], shape["ffn"]
        x = torch.randn(shape["batch"], shape["seq"], h, requires_grad=True)
        res[s] = {}
        variants = [("moe", "moe", 1.0)] + [(f"pad_r{r}", "pad", r) for r in cfg["ratios"]]
        variants += [(f"{kind}_r{r}", kind, r) for kind in PACKED_KINDS for r in cfg["packed_ratios"]]
        for variant, kind, ratio in variants:
            model = make_models(h, f, 2, variants=(kind,), ratio=ratio)[kind]
            engine = build_engine(model, ds_config(shape["batch"]), optimizer=adamw)
            train_step(engine, x)
            y, aux = engine(x)
            engine.backward(y.pow(2).mean() + 0.01 * aux)
            states = count_model_states(engine)
            engine.step()
            param_ptrs = {_storage(p)[0] for p in engine.module.parameters()}
            param_ptrs |= {_storage(t)[0] for t in getattr(engine.optimizer, "bit16_groups_flat", [])}
            act = saved_activation_bytes(lambda engine=engine: engine(x), param_ptrs)
            layer = engine.module.moe
            dyn = layer.dynamic_ratio() if hasattr(layer, "dynamic_ratio") else 1.0
            res[s][variant] = dict(model_states_bytes=states, activation_bytes=act, dynamic_ratio=dyn,
                                   checkpoint_bytes=checkpoint_bytes(engine, cfg["checkpoint_dir"], f"{s}_{variant}"))
            del engine, model
            gc.collect()
    return res


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "memory")
    common.add_shape_args(ap, threads=False)
    args = ap.parse_args(argv)
    shapes = common.chosen_shapes(args)
    with tempfile.TemporaryDirectory(prefix="padnet-bench-memory-") as folder:
        cfg = dict(shapes=shapes, ratios=RATIOS, packed_ratios=PACKED_RATIOS, checkpoint_dir=folder)
        per_rank = common.spawn(_rank, 2, cfg)
    del cfg["checkpoint_dir"]
    from padnet_ds.pad.accounting import pad_counts

    res: Dict[str, Any] = {}
    mib = 2 ** 20
    for s in shapes:
        r0 = per_rank[0][s]
        # Ranks differ only by which experts they hold; report rank 0, check the other matches.
        base = r0["moe"]["model_states_bytes"]["total"]
        base_act = r0["moe"]["activation_bytes"]
        rows, entry = [], {}
        for v, m in r0.items():
            st = m["model_states_bytes"]
            entry[v] = dict(m, memory_ratio=st["total"] / base, activation_ratio=m["activation_bytes"] / base_act,
                            checkpoint_ratio=m["checkpoint_bytes"] / r0["moe"]["checkpoint_bytes"],
                            rank1_total_bytes=per_rank[1][s][v]["model_states_bytes"]["total"])
            rows.append([v, st["params"] / mib, st["grads"] / mib, st["master"] / mib, st["optimizer"] / mib,
                         st["other"] / mib, st["total"] / mib, st["total"] / base, m["activation_bytes"] / mib,
                         m["activation_bytes"] / base_act, m["checkpoint_bytes"] / mib, entry[v]["checkpoint_ratio"]])
        shape = common.SHAPES[s]
        p = shape["hidden"] * shape["ffn"]
        deploy = {str(r): pad_counts(p, 8, r)["pad"] / pad_counts(p, 8, r)["fully_dynamic"] for r in RATIOS}
        deploy_dense_static = {str(r): pad_counts(p, 8, r)["pad_dense_static"] / pad_counts(p, 8, r)["fully_dynamic"]
                               for r in RATIOS}
        res[s] = dict(variants=entry, deployment_ratio=deploy, deployment_ratio_dense_static=deploy_dense_static)
        print(f"\n[{s}] per rank (rank 0), MiB; ep_size 2, ZeRO 2, fp32, AdamW, {common.tokens(shape)} tokens per rank")
        print(common.table(["variant", "params", "grads", "master", "adam", "other", "total", "vs moe", "activ.",
                            "act vs moe", "ckpt (all ranks)", "ckpt vs moe"], rows))
        print(common.table(["deployment (packed) vs fully dynamic", "ratio"],
                           [[f"r={r}", v] for r, v in deploy.items()]))
    first = res[shapes[0]]
    result = dict(config=cfg, shapes={s: dict(common.SHAPES[s], **common.MOE) for s in shapes},
                  machine=common.machine(), quick=args.quick, results=res,
                  memory_ratio_r10=first["variants"]["pad_r1.0"]["memory_ratio"],
                  memory_ratio_r05=first["variants"]["pad_r0.5"]["memory_ratio"],
                  memory_ratio_r03=first["variants"]["pad_r0.3"]["memory_ratio"],
                  memory_ratio_packed_r05=first["variants"]["packed_r0.5"]["memory_ratio"],
                  memory_ratio_packed_r03=first["variants"]["packed_r0.3"]["memory_ratio"],
                  checkpoint_bytes_ratio_packed_r05=first["variants"]["packed_r0.5"]["checkpoint_ratio"],
                  checkpoint_bytes_ratio_packed_r03=first["variants"]["packed_r0.3"]["checkpoint_ratio"],
                  checkpoint_bytes_ratio_r05=first["variants"]["pad_r0.5"]["checkpoint_ratio"],
                  memory_ratio_packed_dense_static_r05=first["variants"]["packed_dense_static_r0.5"]["memory_ratio"],
                  memory_ratio_packed_dense_static_r03=first["variants"]["packed_dense_static_r0.3"]["memory_ratio"],
                  activation_ratio_r05=first["variants"]["pad_r0.5"]["activation_ratio"],
                  activation_ratio_packed_r05=first["variants"]["packed_r0.5"]["activation_ratio"],
                  deployment_ratio_r05=first["deployment_ratio"]["0.5"],
                  deployment_ratio_r03=first["deployment_ratio"]["0.3"],
                  memory_ratio_per_shape={s: {v: e["memory_ratio"] for v, e in r["variants"].items()}
                                          for s, r in res.items()},
                  activation_ratio_per_shape={s: {v: e["activation_ratio"] for v, e in r["variants"].items()}
                                              for s, r in res.items()})
    out = common.write_json(args.out, result)
    print(f"\nmemory_ratio r0.5 = {result['memory_ratio_r05']:.3f}, r0.3 = {result['memory_ratio_r03']:.3f} (training, "
          f"{shapes[0]}); packed r0.5 = {result['memory_ratio_packed_r05']:.3f}, r0.3 = "
          f"{result['memory_ratio_packed_r03']:.3f} (goal <= 0.62 / 0.45; dense static weight: "
          f"{result['memory_ratio_packed_dense_static_r05']:.3f} / "
          f"{result['memory_ratio_packed_dense_static_r03']:.3f}); checkpoint bytes packed r0.5 / moe = "
          f"{result['checkpoint_bytes_ratio_packed_r05']:.3f}; "
          f"deployment r0.5 = {result['deployment_ratio_r05']:.3f}, r0.3 = "
          f"{result['deployment_ratio_r03']:.3f}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
