"""PAD DY-Conv ResNets as exports: the same folder layout as text (config.json, model.safetensors, README.md),
loaded by :class:`PADResNetForImageClassification`.

The loader is padnet-ds's own inference model (``models.resnet`` + ``models.image``, plain torch,
no DeepSpeed): DY-Conv mixes its kernels per sample, so the composition is per forward by nature
(``S + scatter_idx(lambda_d pi(x) @ V)``, the packed DY-Conv path) and there is no remote-code
copy. Each DY-Conv layer stores its K kernels as the text export stores experts
(``modeling_padnet.py``): ``<layer>.values`` [K, n] at the shared mask's dynamic positions,
``<layer>.pad.static_values`` where it is 0, ``<layer>.pad.mask_bits`` and ``<layer>.pad.phi``;
every other tensor (stem, BatchNorm statistics, attention, classifier, the input
normalisation and the trained attention temperature) under its own name.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor
from transformers import PretrainedConfig

from ..models.image import ImageClassifier
from ..models.resnet import build_resnet, dyconv_layers
from ..pad.packed import pack_model, positions_of
from ..settings import ConfigError
from .modeling_padnet import check_export_folder
from .tensors import dyconv_weight, mask_from_bits

MODEL_TYPE = "padnet_resnet"
RESNET_KEYS = ("depth", "conv", "num_kernels", "small_input", "in_channels", "num_classes", "width", "lambda_mode",
               "reduction")


class PADResNetConfig(PretrainedConfig):
    """``resnet``: build_resnet's arguments; ``dyconv``: {"layers": {layer: spec}} (dynamic ratio, lambdas)."""
    model_type = MODEL_TYPE

    def __init__(self, resnet=None, dyconv=None, padnet=None, **kwargs):
        self.resnet = dict(resnet or {})
        self.dyconv = dict(dyconv or {})
        self.padnet = dict(padnet or {})
        super().__init__(**kwargs)


def build_model(config: PADResNetConfig, masks: Dict[str, Tensor]) -> ImageClassifier:
    """The exported classifier, packed under ``masks`` ({DY-Conv layer: bool mask}), weights not loaded."""
    r = config.resnet
    resnet = build_resnet(r["depth"], r["conv"], r["num_kernels"], small_input=r["small_input"],
                          in_channels=r["in_channels"], num_classes=r["num_classes"], width=r["width"],
                          lambda_mode=r["lambda_mode"], reduction=r["reduction"])
    model = ImageClassifier(resnet, torch.zeros(r["in_channels"]), torch.ones(r["in_channels"]), 1.0,
                            sync_bn_stats=False)
    layers = {f"resnet.{name}": layer for name, layer in dyconv_layers(resnet)}
    if set(layers) != set(masks):
        raise ConfigError(f"the export's DY-Conv layers {sorted(masks)[:3]}... do not match the ResNet its config "
                          f"describes ({sorted(layers)[:3]}...): a damaged export")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.pad.mask.copy_(masks[name].view(layer.pad.weight_shape))
    pack_model(model)
    return model


class PADResNetForImageClassification:
    """Loads a vision export: ``PADResNetForImageClassification.from_pretrained(OUT_DIR)`` -> an eval-mode
    :class:`~padnet_ds.models.image.ImageClassifier` (``model(pixel_values).logits``)."""

    @staticmethod
    def from_pretrained(folder: str, device=None) -> ImageClassifier:
        from safetensors.torch import load_file

        check_export_folder(folder, MODEL_TYPE)
        config = PADResNetConfig.from_pretrained(folder)
        stored = load_file(f"{folder}/model.safetensors")
        model, state = loadable(config, stored)
        model.load_state_dict(state, strict=True)
        model.config = config
        return model.to(device or "cpu").eval()


def loadable(config: PADResNetConfig, stored: Dict[str, Tensor]) -> Tuple[ImageClassifier, Dict[str, Tensor]]:
    """(the packed model, its state dict) from an export's tensors: mask bits become int32 positions."""
    masks, state = {}, dict(stored)
    for name, spec in config.dyconv.get("layers", {}).items():
        shape = torch.Size(spec["shape"])
        masks[name] = mask_from_bits(state.pop(f"{name}.pad.mask_bits", None), shape)[0]
    model = build_model(config, masks)
    own = model.state_dict()
    for name, mask in masks.items():
        state[f"{name}.pad.positions"] = positions_of(mask)
        key = f"{name}.pad.static_values"
        state.setdefault(key, own[key].new_zeros(0))
    for key, t in own.items():  # structure buffers a packed unit may keep (its shape), not data
        if key not in state and not t.is_floating_point():
            state[key] = t
    return model, state


def vision_export(ckpt, cfg, labels: Sequence[str], padnet: Dict) -> Tuple[PADResNetConfig, Dict[str, Tensor]]:
    """(config, tensors) of an image run's checkpoint; the tensors are loaded into the model once to check them."""
    from ..engine.image_task import vision_config

    v = vision_config(cfg)
    rep = ckpt.replicated
    stem = rep["resnet.stem.0.weight"]
    resnet = dict(depth=v.depth, conv=v.conv, num_kernels=v.num_kernels, small_input=stem.shape[-1] == 3,
                  in_channels=int(stem.shape[1]), num_classes=int(rep["resnet.fc.weight"].shape[0]), width=v.width,
                  lambda_mode="none" if v.conv == "dynamic" else v.lambda_mode, reduction=v.reduction)
    skeleton = build_resnet(**{k: resnet[k] for k in RESNET_KEYS})
    shapes = {f"resnet.{name}": layer.pad.weight_shape for name, layer in dyconv_layers(skeleton)}
    tensors, specs = {}, {}
    for layer, shape in shapes.items():
        weight = dyconv_weight(rep, layer, shape)
        specs[layer] = dict(weight.spec(resnet["lambda_mode"]))
        tensors[f"{layer}.values"] = torch.stack(weight.values)  # [K, n]: one mask for the K kernels
        tensors[f"{layer}.pad.phi"] = weight.phi
        if weight.static is not None:
            tensors[f"{layer}.pad.static_values"] = weight.static
        bits = weight.mask_bits()
        if bits is not None:
            tensors[f"{layer}.pad.mask_bits"] = bits
    owned = tuple(f"{layer}.{part}" for layer in shapes for part in ("weight", "values", "pad."))
    tensors.update({k: t for k, t in rep.items() if not k.startswith(owned)})
    names = [str(n) for n in labels] or [str(i) for i in range(resnet["num_classes"])]
    config = PADResNetConfig(resnet=resnet, dyconv={"layers": specs}, padnet=padnet,
                             id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model, state = loadable(config, tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt.tag_dir} does not fit the ResNet its run config describes (missing "
                          f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}): was config.yaml changed?")
    return config, tensors
