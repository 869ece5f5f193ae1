import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from models import ckpt_pickle
from models.loading import UnsafeCheckpointError, load_ckpt_state_dict
from models.tiny_checkpoints import LIGHTNING_CALLBACK, save_training_ckpt


def restricted_load(path):
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=ckpt_pickle)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-zip"])
def test_training_checkpoint_loads_with_lightning_as_inert_placeholders(tmp_path, legacy):
    path = tmp_path / "sd-v1-4.ckpt"
    save_training_ckpt({"model.diffusion_model.out.2.weight": torch.ones(4, 8, 3, 3)}, path, legacy=legacy)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(path, weights_only=True)  # what the worker used to do: the file was refused
    loaded = restricted_load(path)
    assert isinstance(loaded["global_step"], np.int64) and loaded["global_step"] == 470000
    (callback_cls,) = loaded["callbacks"]
    assert issubclass(callback_cls, ckpt_pickle.LightningPlaceholder)
    assert callback_cls.original == LIGHTNING_CALLBACK
    assert loaded["callbacks"][callback_cls]["dirpath"].endswith("checkpoints")
    assert not [name for name in sys.modules if "lightning" in name]  # never imported
    state = load_ckpt_state_dict(path)
    ema = "model_ema.diffusion_modelout2weight"
    assert set(state) >= {"model.diffusion_model.out.2.weight", ema, "betas"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-zip"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, legacy):
    # The payload is real: a plain unpickler runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_WritesMarker(proof)))
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    body = {"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "x": _WritesMarker(marker)}
    torch.save(body, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"names posix\.system") as refused:
        load_ckpt_state_dict(path)
    assert "nothing in it was run" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",  # a builtin that runs code
        b"\x80\x02c__builtin__\nexec\nX\x04\x00\x00\x00pass\x85R.",  # Python 2 spelling
        b"\x80\x02cos\nEvilStorage\n.",  # a 'Storage' name that is not torch's
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",  # encode beyond text
    ],
    ids=["eval", "py2-exec", "fake-storage", "codecs"],
)
def test_other_globals_are_refused(payload):
    with pytest.raises(pickle.UnpicklingError):
        ckpt_pickle.load(io.BytesIO(payload))


def test_reconstructor_only_rebuilds_placeholders():
    with pytest.raises(pickle.UnpicklingError, match="refused copyreg._reconstructor"):
        ckpt_pickle.allowed_global("copyreg", "_reconstructor")(dict, object, None)
    cls = ckpt_pickle.allowed_global("pytorch_lightning.trainer", "Trainer")
    assert isinstance(ckpt_pickle.allowed_global("copyreg", "_reconstructor")(cls, object, None), cls)
    assert ckpt_pickle.allowed_global("pytorch_lightning.trainer", "Trainer") is cls
