"""Upcycling BERT-family Hugging Face encoders into PAD-MoE (docs/PAD.md section 3).

A BERT layer computes its FFN as ``output(intermediate(a), a)`` with

    intermediate(a) = act(dense_1(a))        output(h, a) = LayerNorm(dropout(dense_2(h)) + a)

Upcycling swaps ``intermediate`` for an identity and ``output`` for :class:`MoEFFNOutput`,
which runs ``LayerNorm(dropout(moe(a)) + a)`` with the same dropout and LayerNorm modules.
The layer's own forward is untouched, so attention masks, ``token_type_ids``, labels,
``return_dict`` and HF's output recording keep working exactly as before.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from ..moe.layer import PADMoE, check_moe_args
from ..settings import Bool, Float, Int, Settings
from .pretrained import load_tokenizer, resolve_model_path

LAYER_CHOICES = ("all", "every_other")


class MoEConfig(Settings):
    """How to upcycle: DeepSpeed MoE arguments plus PAD's, and which layers to replace."""
    section = "moe"

    num_experts: Int = Field(8, ge=1)
    k: Int = Field(2, ge=1, description="experts per token")
    ep_size: Int = Field(1, ge=1, description="expert-parallel ranks; must divide num_experts and the world size")
    capacity_factor: Float = Field(1.25, gt=0)
    eval_capacity_factor: Float = Field(2.0, gt=0)
    min_capacity: Int = Field(4, ge=0)
    drop_tokens: Bool = True
    noisy_gate_policy: Optional[Literal["None", "Jitter", "RSample"]] = None
    use_rts: Bool = True
    top2_2nd_expert_sampling: Bool = True
    layers: Union[str, List[int]] = Field("all", description='"all", "every_other" (odd indices) or a list of '
                                          "FFN layer indices")
    lambda_mode: Literal["both", "s", "d", "none", "prune"] = "both"
    mask_scope: Literal["shared", "expert"] = "shared"
    dropless: Bool = Field(False, description="no capacity, no token dropped (drop_tokens is then ignored); "
                           "moe/dispatch.py")
    aux_loss_coef: Float = Field(0.01, ge=0, description="applied by the engine, not by the layer")

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_choice(cls, layers: Any) -> Any:
        if isinstance(layers, str):
            if layers not in LAYER_CHOICES:
                raise ValueError(f"is not one of {', '.join(LAYER_CHOICES)} or a list of layer indices")
            return layers
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"must be one of {', '.join(LAYER_CHOICES)} or a non-empty list of layer indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError("must list FFN layer indices (integers >= 0)")
        if len(set(layers)) != len(layers):
            raise ValueError("lists a layer more than once")
        return list(layers)

    @model_validator(mode="after")
    def _experts_fit(self) -> "MoEConfig":
        check_moe_args(self.num_experts, self.ep_size, self.k, self.noisy_gate_policy, self.mask_scope)
        return self

    def moe_kwargs(self) -> dict:
        """The keyword arguments of :meth:`PADMoE.from_dense` (everything but the layer choice)."""
        return self.model_dump(exclude={"layers", "aux_loss_coef"})


class _Activation(nn.Module):
    # HF allows a plain callable as hidden_act; the expert template must be a module to be deep-copied.
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class MoEFFNOutput(nn.Module):
    """Stands in for ``BertOutput``: ``LayerNorm(dropout(moe(a)) + a)``.

    The latest forward's ``l_aux`` and expert counts stay on the layer (``PADMoE.last_l_aux``,
    ``PADMoE.last_expert_counts``), where the engine reads them.
    """

    def __init__(self, moe: PADMoE, dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.LayerNorm = layer_norm  # HF's name, so "LayerNorm" no-decay rules still match

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        y, _, _ = self.moe(hidden_states)
        return self.LayerNorm(self.dropout(y) + input_tensor)


def _is_dense_ffn_layer(layer: nn.Module) -> bool:
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    return (isinstance(getattr(inter, "dense", None), nn.Linear) and hasattr(inter, "intermediate_act_fn")
            and isinstance(getattr(out, "dense", None), nn.Linear) and hasattr(out, "dropout")
            and hasattr(out, "LayerNorm"))


def _is_upcycled_layer(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "output", None), MoEFFNOutput)


def ffn_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The transformer layers with a BERT-style FFN (dense or upcycled), in model order."""
    return [(name, m) for name, m in model.named_modules() if _is_dense_ffn_layer(m) or _is_upcycled_layer(m)]


def select_layers(layers: Union[str, Sequence[int]], n: int) -> List[int]:
    """Indices chosen by ``layers`` among ``n`` FFN layers."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n))
        if layers == "every_other":
            return list(range(1, n, 2))  # odd layers, as in GShard / Switch: the first FFN stays dense
        raise ValueError(f"layers={layers!r} is not one of {LAYER_CHOICES} or a list of layer indices")
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers=[] chooses no layer to upcycle")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer index {i!r} is not an int (layers={chosen})")
        if not 0 <= i < n:
            raise ValueError(f"layer index {i} is out of range: the model has {n} FFN layers (0..{n - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers={chosen} lists a layer more than once")
    return sorted(chosen)


def _activation_of(intermediate: nn.Module) -> nn.Module:
    act = intermediate.intermediate_act_fn
    return act if isinstance(act, nn.Module) else _Activation(act)


def upcycle_encoder(model: nn.Module, moe_cfg: MoEConfig) -> nn.Module:
    """Replace the FFN of the chosen layers by a PAD-MoE upcycled from it, in place; returns ``model``.

    Static weights = the dense weights and every expert = a copy, so with lambdas at 1 (and
    no token dropped) the model computes what it did before.
    """
    layers = ffn_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BERT-style FFN layers (submodules with intermediate.dense "
                         "+ intermediate_act_fn and output.dense/dropout/LayerNorm): only BERT-family encoders "
                         "(BERT, MiniLM, RoBERTa, ELECTRA, ...) can be upcycled")
    chunk = getattr(getattr(model, "config", None), "chunk_size_feed_forward", 0)
    if chunk:
        # HF would run the FFN once per chunk and every chunk would overwrite the layer's l_aux.
        raise ValueError(f"config.chunk_size_feed_forward={chunk}: set it to 0 before upcycling (a chunked FFN "
                         "loses all but the last chunk's load-balancing loss)")
    for i in select_layers(moe_cfg.layers, len(layers)):
        name, layer = layers[i]
        if _is_upcycled_layer(layer):
            raise ValueError(f"layer {i} ({name}) is already a PAD-MoE layer: upcycle a dense model only once")
        inter, out = layer.intermediate, layer.output
        moe = PADMoE.from_dense(inter.dense, out.dense, _activation_of(inter), **moe_cfg.moe_kwargs())
        # DeepSpeed creates the gate on the CPU in fp32; put the layer where the dense FFN lived.
        moe.to(device=inter.dense.weight.device)
        layer.intermediate = nn.Identity()
        layer.output = MoEFFNOutput(moe, out.dropout, out.LayerNorm)
    return model


def build_classifier(name_or_path: str, num_labels: int, is_regression: bool, moe_cfg: Optional[MoEConfig],
                     random_init_config: Optional[Dict] = None) -> nn.Module:
    """A sequence classifier, upcycled with ``moe_cfg`` (``None`` keeps it dense, for baselines).

    Loads ``name_or_path`` (Hub id, local folder, or ``minilm``) with a new head, or, when
    ``random_init_config`` (BertConfig kwargs) is given, builds a randomly initialised BERT
    whose vocabulary comes from ``name_or_path``'s tokenizer unless the dict sets ``vocab_size``.
    """
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if is_regression and num_labels != 1:
        raise ValueError(f"a regression head has one output: num_labels={num_labels} must be 1")
    if num_labels < 1:
        raise ValueError(f"num_labels={num_labels} must be >= 1")
    problem_type = "regression" if is_regression else "single_label_classification"
    if random_init_config is not None:
        kwargs = dict(random_init_config)
        if "vocab_size" not in kwargs:
            tokenizer = load_tokenizer(name_or_path)
            kwargs["vocab_size"] = len(tokenizer)
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
        config = BertConfig(**kwargs, num_labels=num_labels, problem_type=problem_type)
        model = BertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name_or_path), num_labels=num_labels, problem_type=problem_type)
    return upcycle_encoder(model, moe_cfg) if moe_cfg is not None else model
