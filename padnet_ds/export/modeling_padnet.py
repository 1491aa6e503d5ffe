"""An exported padnet-ds PAD-MoE text classifier, in plain torch: no DeepSpeed, no process group.

This file is copied verbatim into every export folder and named in its ``config.json``
``auto_map``, so ``AutoModelForSequenceClassification.from_pretrained(OUT_DIR,
trust_remote_code=True)`` (and ``pipeline("text-classification", model=OUT_DIR,
trust_remote_code=True)``) run it where padnet-ds is not installed; it imports only torch,
transformers and its sibling ``configuration_padnet.py``. ``padnet_ds.export`` imports the
same file.

The model is the run's encoder (built from ``config.encoder`` by transformers) with each
upcycled FFN ``LayerNorm(dropout(dense_2(act(dense_1(a)))) + a)`` replaced by
``LayerNorm(dropout(moe(a)) + a)``, as padnet-ds trained it. Each PAD linear of an MoE layer
(E experts, weight [out, in], P = out * in entries, mask M_e of expert e with 1 = dynamic,
A = AND_e M_e the entries every expert reads dynamically) is stored as:

    mask_bits       uint8 [1 or E, ceil(P/8)]   M (shared) or every M_e, bits most significant first
                                                (numpy.packbits); absent when every entry is dynamic
    static_values   [P - |A|]                   W_static where A = 0 (where some expert reads it);
                                                absent when no expert does
    values.<e>      [|M_e|]                     W_e where M_e = 1
    bias            [E, out]                    b_e
    phi             [1]                         (lambda_d, lambda_s) = lambda_pair(lambda_mode, phi)

and composed as in training (padnet-ds docs/PAD.md sections 1 and 9):

    W_eff(e) = lambda_d M_e W_e + lambda_s (1 - M_e) W_static
             = scatter_{A=0}(lambda_s static_values), then lambda_d values.<e> written at M_e = 1

The two writes cover every entry, so nothing needs zeroing. ``compose="load"`` builds every
W_eff(e) once (the first forward after loading, or :meth:`compose_experts`); ``"forward"``
composes each expert into one reused workspace when its tokens arrive, keeping only the
stored values (and the dynamic positions, int64, once per mask) resident.

Routing reproduces DeepSpeed's ``TopKGate`` in eval mode (``deepspeed/moe/sharded_moe.py``)
without a capacity limit, so no token is dropped (see :func:`route`); with an eval capacity
that drops nothing, the exported model's logits equal ``padnet-ds eval`` of the checkpoint.
The model is for inference: the composed weights are not differentiable.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_padnet import PADNetConfig

EXPORT_MODEL_TYPE = "padnet_moe"


try:  # with padnet-ds installed it is one of its input errors (the CLI exits 2); remote code may lack it
    from padnet_ds.errors import CheckpointError as _BadFolder
except ImportError:
    _BadFolder = ValueError


class NotAnExportError(_BadFolder):
    """A folder given to ``from_pretrained`` that is not (or not all of) a padnet-ds export."""


def check_export_folder(path, model_type: str = EXPORT_MODEL_TYPE) -> None:
    """A local folder must hold a padnet-ds export's config.json (of ``model_type``) and model.safetensors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return  # a Hub id: transformers resolves and checks it
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise NotAnExportError(f"{config} does not exist: {path} is not a padnet-ds export (write one with "
                               "`padnet-ds export RUN OUT_DIR`)")
    try:
        with open(config, encoding="utf-8") as f:
            found = json.load(f).get("model_type")
    except (ValueError, AttributeError) as err:
        raise NotAnExportError(f"{config} is not a JSON object ({err}): {path} is not a padnet-ds export") from None
    if found != model_type:
        raise NotAnExportError(f"{config} has model_type {found!r}, not {model_type!r}: {path} is not a padnet-ds "
                               "export (write one with `padnet-ds export RUN OUT_DIR`)")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise NotAnExportError(f"{weights} does not exist: the export in {path} is incomplete (export it again)")


def lambda_pair(mode: str, phi: Tensor) -> Tuple[Tensor, Tensor]:
    """(lambda_d, lambda_s) of a lambda mode: the same function as ``padnet_ds.pad.compose.lambda_pair``
    (this file must run without padnet-ds; tests/export checks that the two agree)."""
    one = torch.ones((), dtype=phi.dtype, device=phi.device)
    learned = 2 * torch.sigmoid(phi.view(()))
    return {"both": (learned, 2 - learned), "s": (one, learned), "d": (learned, one), "none": (one, one),
            "prune": (one, torch.zeros_like(one))}[mode]


def unpack_bits(bits: Tensor, numel: int) -> Tensor:
    """``numpy.unpackbits(bits, axis=-1)[..., :numel]`` as bool: [..., nbytes] uint8 -> [..., numel]."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (bits.unsqueeze(-1) >> shifts).bitwise_and_(1).bool().flatten(-2)[..., :numel]  # [..., 8 * nbytes]


def route(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(experts [S, k], weights [S, k] fp32) for fp32 gate logits [S, E]: DeepSpeed's eval-mode choices.

    With ``g = softmax(logits)``: k = 1 picks ``argmax g`` with weight ``g`` (not renormalised);
    k = 2 picks ``e1 = argmax g``, then ``e2 = argmax`` of the logits with e1 masked to -inf (no
    Gumbel noise: PADMoE samples the second expert only in training), weights
    ``g_i / max(g_e1 + g_e2, eps)``; k > 2 takes ``topk(g, k)`` with weights ``g_i / max(sum, eps)``.
    Routes are in DeepSpeed's order, so combining them sums in its order too.
    """
    gates = logits.softmax(dim=1)
    eps = torch.finfo(gates.dtype).eps
    if k == 1:
        first = gates.argmax(dim=1, keepdim=True)
        return first, gates.gather(1, first)
    if k == 2:
        first = gates.argmax(dim=1)
        second = logits.masked_fill(F.one_hot(first, gates.shape[1]).bool(), float("-inf")).argmax(dim=1)
        experts = torch.stack([first, second], dim=1)
        picked = gates.gather(1, experts)  # [S, 2]
        return experts, picked / (picked[:, :1] + picked[:, 1:]).clamp(min=eps)
    top, experts = gates.topk(k, dim=1)
    chosen = torch.zeros_like(gates).scatter_(1, experts, 1.0)
    return experts, top / (gates * chosen).sum(dim=1, keepdim=True).clamp(min=eps)  # the sum over E, as DeepSpeed


class PADExpertLinears(nn.Module):
    """One PAD linear of all E experts, held as exported (module docstring), composed on demand."""

    def __init__(self, spec: Dict, num_experts: int, lambda_mode: str, shared_mask: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in spec["shape"])
        self.numel = self.out_features * self.in_features
        self.lambda_mode = lambda_mode
        dynamic = [int(n) for n in spec["dynamic"]]
        if len(dynamic) != num_experts:
            raise ValueError(f"a PAD linear spec lists {len(dynamic)} experts' dynamic counts, expected {num_experts}")
        if all(n == self.numel for n in dynamic):
            self.mask_bits = None  # fully dynamic: every position, nothing to store
        else:
            rows = 1 if shared_mask else num_experts
            self.register_buffer("mask_bits", torch.zeros(rows, (self.numel + 7) // 8, dtype=torch.uint8))
        n_static = int(spec["static"])
        self.static_values = nn.Parameter(torch.zeros(n_static), requires_grad=False) if n_static else None
        self.values = nn.ParameterList([nn.Parameter(torch.zeros(n), requires_grad=False) for n in dynamic])
        self.bias = nn.Parameter(torch.zeros(num_experts, self.out_features), requires_grad=False) \
            if spec.get("bias", True) else None
        self.phi = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.forget())

    def forget(self) -> None:
        """Drop the positions and composed weights (rebuilt from the stored tensors on next use)."""
        for key in ("_positions", "_composed", "_workspace"):
            self.__dict__.pop(key, None)

    def positions(self) -> Tuple[List[Tensor], Optional[Tensor]]:
        """(each expert's dynamic positions, the static positions A = 0 or None), int64, checked against the values."""
        device = self.values[0].device
        cached = self.__dict__.get("_positions")
        if cached is not None and cached[0][0].device == device:
            return cached
        if self.mask_bits is None:
            every = torch.arange(self.numel, device=device)
            dynamic, static = [every] * len(self.values), None
        else:
            masks = unpack_bits(self.mask_bits.to(device), self.numel)  # [1 or E, P]
            rows = [m.nonzero().squeeze(1) for m in masks]
            dynamic = rows * len(self.values) if len(rows) == 1 else rows
            static = (~masks.all(dim=0)).nonzero().squeeze(1)
        for e, (pos, v) in enumerate(zip(dynamic, self.values)):
            if pos.numel() != v.numel():
                raise ValueError(f"values.{e} holds {v.numel()} values but its mask has {pos.numel()} dynamic "
                                 "entries: the values do not belong to this mask (a damaged export)")
        n_static = 0 if self.static_values is None else self.static_values.numel()
        if (0 if static is None else static.numel()) != n_static:
            raise ValueError(f"static_values holds {n_static} values but the masks leave "
                             f"{0 if static is None else static.numel()} entries static: a damaged export")
        self.__dict__["_positions"] = (dynamic, static if n_static else None)
        return self.__dict__["_positions"]

    @torch.no_grad()
    def weight(self, e: int, out: Optional[Tensor] = None) -> Tensor:
        """W_eff(e) [out, in], into ``out`` when given."""
        dynamic, static = self.positions()
        lam_d, lam_s = lambda_pair(self.lambda_mode, self.phi)
        values = self.values[e]
        flat = torch.empty(self.numel, dtype=values.dtype, device=values.device) if out is None else out.view(-1)
        if static is not None:
            flat.index_copy_(0, static, torch.mul(self.static_values, lam_s))
        flat.index_copy_(0, dynamic[e], torch.mul(values, lam_d))
        return flat.view(self.out_features, self.in_features)

    @torch.no_grad()
    def compose_all(self) -> Tensor:
        """Every W_eff(e), [E, out, in], kept for the following forwards."""
        composed = self.__dict__.get("_composed")
        like = self.values[0]
        if composed is None or composed.device != like.device or composed.dtype != like.dtype:
            composed = torch.stack([self.weight(e) for e in range(len(self.values))])
            self.__dict__["_composed"] = composed
        return composed

    def linear(self, e: int, x: Tensor, compose: str) -> Tensor:
        if compose == "load":
            w = self.compose_all()[e]
        else:
            ws = self.__dict__.get("_workspace")
            like = self.values[e]
            if ws is None or ws.device != like.device or ws.dtype != like.dtype:
                ws = torch.empty(self.out_features, self.in_features, dtype=like.dtype, device=like.device)
                self.__dict__["_workspace"] = ws
            w = self.weight(e, out=ws)  # valid until the next expert composes: used at once
        return F.linear(x, w, None if self.bias is None else self.bias[e])

    def extra_repr(self) -> str:
        n = sum(v.numel() for v in self.values)
        return f"experts={len(self.values)}, in={self.in_features}, out={self.out_features}, " \
               f"dynamic_ratio={n / (len(self.values) * self.numel):.3f}, lambda_mode={self.lambda_mode!r}"


class PADMoE(nn.Module):
    """``y = sum_r weight_r * fc2_e(act(fc1_e(x)))`` over each token's routes r = (expert e, weight)."""

    def __init__(self, hidden_size: int, spec: Dict, moe: Dict, activation: nn.Module, compose: str) -> None:
        super().__init__()
        self.num_experts, self.k = int(moe["num_experts"]), int(moe["k"])
        self.compose = compose
        self.gate = nn.Linear(hidden_size, self.num_experts, bias=False)
        shared = moe["mask_scope"] == "shared"
        self.fc1 = PADExpertLinears(spec["fc1"], self.num_experts, moe["lambda_mode"], shared)
        self.fc2 = PADExpertLinears(spec["fc2"], self.num_experts, moe["lambda_mode"], shared)
        self.act = activation

    def forward(self, hidden: Tensor) -> Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])  # [S, M]: tokens are routed one by one
        logits = F.linear(x.float(), self.gate.weight.float())  # [S, E], fp32 as DeepSpeed's gate
        experts, weights = route(logits, self.k)  # [S, k] each
        routed = x.new_zeros(self.k, *x.shape)  # [k, S, M]: route r of token s
        for e in range(self.num_experts):
            token, slot = (experts == e).nonzero(as_tuple=True)
            if token.numel():
                h = self.act(self.fc1.linear(e, x[token], self.compose))
                routed[slot, token] = self.fc2.linear(e, h, self.compose)
        combined = (routed * weights.t().unsqueeze(-1)).sum(dim=0)  # fp32 weights: summed in fp32, as DeepSpeed
        return combined.to(hidden.dtype).view(hidden.shape)

    def compose_experts(self) -> None:
        self.fc1.compose_all()
        self.fc2.compose_all()


class PADMoEOutput(nn.Module):
    """Stands in for the encoder layer's FFN output: ``LayerNorm(dropout(moe(a)) + a)``."""

    def __init__(self, moe: PADMoE, dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)


def upcycled(layer: nn.Module, spec: Dict, moe: Dict, hidden_act, compose: str) -> None:
    """Give an encoder layer (``intermediate`` + ``output``, BERT-style) a PAD-MoE FFN, in place."""
    out = getattr(layer, "output", None)
    if not (hasattr(layer, "intermediate") and hasattr(out, "dropout") and hasattr(out, "LayerNorm")):
        raise ValueError(f"{type(layer).__name__} has no BERT-style FFN (intermediate, output.dropout, "
                         "output.LayerNorm): the export's moe.layers do not fit its encoder")
    hidden = out.LayerNorm.normalized_shape[0]
    activation = ACT2FN[hidden_act] if isinstance(hidden_act, str) else hidden_act
    layer.intermediate = nn.Identity()
    layer.output = PADMoEOutput(PADMoE(hidden, spec, moe, activation, compose), out.dropout, out.LayerNorm)


class PADNetForSequenceClassification(PreTrainedModel):
    """The exported classifier: ``model`` is the encoder with its upcycled FFNs as PAD-MoE."""

    config_class = PADNetConfig
    base_model_prefix = "padnet"
    main_input_name = "input_ids"
    # Routing is discontinuous: a bf16 gate would pick other experts. phi: the lambdas, one scalar per linear.
    _keep_in_fp32_modules_strict = ["gate", "phi"]

    def __init__(self, config: PADNetConfig) -> None:
        super().__init__(config)
        encoder = config.encoder_config()
        self.model = AutoModelForSequenceClassification.from_config(encoder)
        for path, spec in (config.moe.get("layers") or {}).items():
            upcycled(self.model.get_submodule(path), spec, config.moe, encoder.hidden_act, config.compose)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_export_folder(pretrained_model_name_or_path)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        if model.config.compose == "load":
            model.compose_experts()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every tensor comes from model.safetensors; the encoder's own modules init themselves

    def moe_layers(self) -> Dict[str, PADMoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, PADMoE)}

    def compose_experts(self) -> None:
        """Compose every expert's weight now (``compose="load"``), not at the first forward."""
        for moe in self.moe_layers().values():
            moe.compose_experts()

    def set_compose(self, compose: str) -> None:
        """Switch between composing once (``"load"``) and per forward (``"forward"``; frees the composed weights)."""
        if compose not in ("load", "forward"):
            raise ValueError(f"compose={compose!r} is not 'load' or 'forward'")
        self.config.compose = compose
        for moe in self.moe_layers().values():
            moe.compose = compose
            for lin in (moe.fc1, moe.fc2):
                lin.forget()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None, **kwargs):
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels)
        return self.model(**{k: v for k, v in given.items() if v is not None}, **kwargs)
