"""Configuration of an exported padnet-ds text model (``model_type: padnet_moe``).

Copied verbatim into every export folder and named in its ``config.json`` ``auto_map``, so
``AutoConfig.from_pretrained(OUT_DIR, trust_remote_code=True)`` loads it where padnet-ds is not
installed: it imports only transformers (and the standard library).

Fields beyond a ``PretrainedConfig``'s own (``id2label``, ``label2id``, ``problem_type``, ...):

- ``encoder``: the upcycled encoder's own config (``BertConfig.to_dict()`` and the like, with its
  ``model_type``): the base architecture.
- ``moe``: ``num_experts`` (E), ``k``, ``lambda_mode``, ``mask_scope`` and ``layers``, one entry
  per upcycled FFN, keyed by its module path in the encoder (``bert.encoder.layer.3``), each
  ``{"fc1": spec, "fc2": spec}`` with spec = ``{"shape": [out, in], "dynamic": [n_e per expert],
  "static": n_s, "bias": bool, "dynamic_ratio": r, "lambda_d": ..., "lambda_s": ...}``; ``{}``
  for a dense run.
- ``compose``: ``"load"`` (every expert's weight composed once, at load: fastest) or
  ``"forward"`` (composed per forward from the stored values: smallest memory);
  ``from_pretrained(OUT_DIR, compose="forward")`` overrides it.
- ``padnet``: where the export came from (run, checkpoint tag, dtype, tokenizer length, text
  columns), for people; the model does not read it.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

COMPOSE_MODES = ("load", "forward")


class PADNetConfig(PretrainedConfig):
    model_type = "padnet_moe"

    def __init__(self, encoder=None, moe=None, compose="load", padnet=None, **kwargs):
        if compose not in COMPOSE_MODES:
            raise ValueError(f"compose={compose!r} is not one of {COMPOSE_MODES}: 'load' composes every expert's "
                             "weight once (fastest), 'forward' per forward from the packed values (smallest memory)")
        self.encoder = dict(encoder or {})
        self.moe = dict(moe or {})
        self.compose = compose
        self.padnet = dict(padnet or {})
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's config, with this model's labels (they size the classifier head)."""
        values = dict(self.encoder)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("this padnet_moe config has no encoder.model_type: it is not a padnet-ds export "
                             "(re-export the run with `padnet-ds export RUN OUT_DIR`)")
        for key in ("id2label", "label2id", "num_labels", "problem_type", "architectures", "auto_map"):
            values.pop(key, None)
        return AutoConfig.for_model(model_type, **values, id2label=dict(self.id2label),
                                    label2id=dict(self.label2id), problem_type=self.problem_type)
