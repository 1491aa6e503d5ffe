"""The model card states eval metrics only when they are of the checkpoint it was exported from."""
import pytest

from padnet_ds.export.card import model_card
from padnet_ds.export.configuration_padnet import PADNetConfig

SIZES = {"folder_bytes": 3 << 20, "model_bytes": 2 << 20, "expert_bytes": 1 << 20,
         "fully_dynamic_expert_bytes": 2 << 20, "expert_bytes_ratio": 0.5}


@pytest.mark.parametrize("summary_step", [12, 20])
def test_card_reports_eval_metrics_of_the_exported_step_only(summary_step):
    config = PADNetConfig(padnet={"step": 12, "dtype": "fp32", "task": "text"})
    summary = {"eval": {"accuracy": 0.8123}, "best_eval": {"accuracy": 0.8456}, "steps": summary_step}
    card = model_card(config, summary, SIZES, source="run/checkpoints/step12")
    assert "(step 12)" in card and "0.500 of a fully dynamic model's 2.00 MiB" in card
    if summary_step == 12:
        assert "| accuracy | 0.8123 | 0.8456 |" in card
    else:
        assert "0.8123" not in card and "eval metrics are of step 20, not of this checkpoint" in card
