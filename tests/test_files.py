"""padnet_ds.files: safe_load refuses anything but plain checkpoint contents, before it runs; read_text names lines."""
import pickle
import random

import pytest
import torch

from padnet_ds.errors import CheckpointError, DataError
from padnet_ds.files import atomic_torch_save, read_text, safe_load


class WritesAMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")`` (any callable would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(path, marker, inside_torch_file: bool):
    payload = {"module": {"w": torch.ones(2)}, "x": WritesAMarker(marker)}
    if inside_torch_file:
        torch.save(payload, path)  # the zip format torch and DeepSpeed write, with the payload in data.pkl
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's own protocol
    return path


@pytest.mark.parametrize("inside_torch_file", [True, False])
def test_a_crafted_pickle_is_refused_naming_the_file_and_its_payload_never_runs(tmp_path, inside_torch_file):
    marker = tmp_path / "payload-ran"
    path = crafted(tmp_path / "mp_rank_00_model_states.pt", marker, inside_torch_file)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} holds pickled content .*nothing in it ran"):
        safe_load(path)
    assert not marker.exists()
    try:  # the same file through the unsafe path: the payload runs (a raw pickle then fails the magic number)
        torch.load(path, weights_only=False)
    except RuntimeError:
        pass
    assert marker.exists(), "the payload is live, so the refusal above is what kept it from running"


RANDOM = random.Random(17)  # seeded: the first random byte decides which of torch's errors fires


@pytest.mark.parametrize("content", [RANDOM.randbytes(4096), RANDOM.randbytes(4096), b"",
                                     b"PK\x03\x04" + RANDOM.randbytes(100)])
def test_random_bytes_empty_or_truncated_files_are_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "padnet_rng_rank1.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is damaged or not a torch checkpoint"):
        safe_load(path)


def test_a_truncated_real_checkpoint_file_is_named(tmp_path):
    path = atomic_torch_save({"w": torch.randn(64, 64)}, tmp_path / "layer_0_expert_1_mp_rank_00_model_states.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="layer_0_expert_1_mp_rank_00_model_states.pt is damaged"):
        safe_load(path)
    with pytest.raises(CheckpointError, match="missing"):
        safe_load(tmp_path / "nope.pt")


def test_plain_contents_and_deepspeeds_value_records_load(tmp_path):
    from padnet_ds import _env  # noqa: F401
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"t": torch.arange(3), "nested": [1, 2.5, None, "x", (3, 4)], "scaler": LossScaler(2.0),
             "stage": ZeroStageEnum.gradients, "where": fragment_address(numel=4, start=8)}
    got = safe_load(atomic_torch_save(state, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert torch.equal(got["t"], state["t"]) and got["nested"] == state["nested"]
    assert got["scaler"].cur_scale == 2.0 and got["stage"] is ZeroStageEnum.gradients
    assert (got["where"].numel, got["where"].start) == (4, 8)


def test_read_text_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\n\ufeffok,1\n".encode() + b"caf\xe9,0\n")
    with pytest.raises(DataError, match=r"train.csv, line 3: not UTF-8 text \(byte 0xe9"):
        read_text(path)
    path.write_bytes("\ufefftext,label\nok,1\n".encode())
    assert read_text(path) == "text,label\nok,1\n"  # the byte-order mark is dropped
