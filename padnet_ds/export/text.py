"""A text run's checkpoint as a :class:`~.modeling_padnet.PADNetForSequenceClassification`: its config and tensors.

The encoder's architecture comes from the run's ``model`` section (``models.encoder.classifier_config``,
what training built), the MoE layers from the checkpoint itself (a gate per layer, one file per
global expert), the labels from the run. Every tensor outside the MoE layers is copied under
its own name (prefixed ``model.``, the wrapper's attribute); each MoE layer keeps its path
(``<encoder layer>.output.moe``) with the gate and the PAD linears in export form
(:mod:`.tensors`). The result is checked against the class it will load into (built on the
meta device) before anything is written.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..engine.checkpoint_reader import CheckpointState
from ..engine.config import RunConfig
from ..settings import ConfigError
from .configuration_padnet import PADNetConfig
from .modeling_padnet import PADNetForSequenceClassification
from .tensors import GATE_KEY, PADWeight, expert_states, linear_paths, moe_layers, moe_linear

MOE_SUFFIX = ".output.moe"  # models/encoder.py puts each PAD-MoE at <encoder layer>.output.moe
AUTO_MAP = {"AutoConfig": "configuration_padnet.PADNetConfig",
            "AutoModelForSequenceClassification": "modeling_padnet.PADNetForSequenceClassification"}
REMOTE_CODE = ("configuration_padnet.py", "modeling_padnet.py")


def linear_tensors(prefix: str, weight: PADWeight, bias: Optional[Tensor]) -> Dict[str, Tensor]:
    """One PAD linear of all experts under ``prefix`` (modeling_padnet.PADExpertLinears' names)."""
    out = {f"{prefix}.phi": weight.phi}
    bits = weight.mask_bits()
    if bits is not None:
        out[f"{prefix}.mask_bits"] = bits
    if weight.static is not None:
        out[f"{prefix}.static_values"] = weight.static
    out.update({f"{prefix}.values.{e}": v for e, v in enumerate(weight.values)})
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


def text_export(ckpt: CheckpointState, cfg: RunConfig, labels: Sequence[str], is_regression: bool,
                padnet: Dict) -> Tuple[PADNetConfig, Dict[str, Tensor]]:
    """(config, tensors) of the export of ``ckpt``; ``padnet`` is the config's provenance section."""
    from ..models.encoder import classifier_config

    num_labels = 1 if is_regression else len(labels)
    encoder = classifier_config(cfg.model.name, num_labels, is_regression, cfg.model.random_init)
    rep = ckpt.replicated
    layers = moe_layers(rep)
    tensors: Dict[str, Tensor] = {}
    specs: Dict[str, Dict] = {}
    for index, layer in enumerate(layers):
        if not layer.endswith(MOE_SUFFIX):
            raise ConfigError(f"checkpoint {ckpt.tag_dir}: MoE layer {layer} is not an upcycled encoder FFN "
                              f"(<layer>{MOE_SUFFIX}); padnet-ds export handles the encoders padnet-ds train builds")
        gate = rep[layer + GATE_KEY]
        experts = expert_states(ckpt.tag_dir, ckpt.experts.get(layer, {}), index, layer, gate.shape[0])
        paths = linear_paths(experts[0])
        if paths != ["fc1", "fc2"]:
            raise ConfigError(f"checkpoint {ckpt.tag_dir}: the experts of {layer} hold linears {paths}, not the "
                              "fc1/fc2 FFN padnet-ds upcycles; this export format has no other expert shape")
        spec = {}
        for path in paths:
            weight, bias = moe_linear(rep, layer, path, experts, f"checkpoint {ckpt.tag_dir}: {layer} {path}")
            spec[path] = dict(weight.spec(cfg.moe.lambda_mode), bias=bias is not None)
            tensors.update(linear_tensors(f"model.{layer}.{path}", weight, bias))
        tensors[f"model.{layer}.gate.weight"] = gate.float()
        specs[layer[: -len(MOE_SUFFIX)]] = spec
    tensors.update({f"model.{key}": t for key, t in rep.items() if not any(key.startswith(f"{m}.") for m in layers)})
    moe = dict(num_experts=cfg.moe.num_experts, k=cfg.moe.k, lambda_mode=cfg.moe.lambda_mode,
               mask_scope=cfg.moe.mask_scope, layers=specs) if layers else {}
    values = encoder.to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "architectures"):
        values.pop(key, None)
    names = [str(n) for n in labels] if not is_regression else ["score"]
    config = PADNetConfig(encoder=values, moe=moe, padnet=padnet, id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)},
                          problem_type=encoder.problem_type, architectures=[PADNetForSequenceClassification.__name__],
                          auto_map=dict(AUTO_MAP))
    check_against_model(config, tensors, str(ckpt.tag_dir))
    return config, tensors


def check_against_model(config: PADNetConfig, tensors: Dict[str, Tensor], origin: str) -> None:
    """Every tensor the class expects is there with its shape, and nothing else."""
    with torch.device("meta"):
        model = PADNetForSequenceClassification(config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {keys[:4]}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                   ("other shape", wrong)) if keys)
        raise ConfigError(f"checkpoint {origin} does not fit the model its run config describes ({detail}): "
                          "was config.yaml changed after training?")
