"""Checkpoints put optimiser state and RNG streams back on the devices that use them.

Every tensor of a head's optimiser state goes to its parameter's device on load, 0-dim ones
too (the SphereFace2 bias's momentum, the Adam moments of a scalar), all but `step`, as
`torch.optim.Optimizer.load_state_dict` does; each rank's head file holds its CUDA RNG states
next to its CPU one. On a CPU the "meta" device stands in for a second device; the CUDA cases
run where torch sees a GPU and are skipped, with the reason, elsewhere.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sf2dist.config import load_config
from sf2dist.train import checkpoint
from tests.test_train import DEMO, overrides, tiny_data  # noqa: F401  (tiny_data is a fixture)

NO_GPU = "needs an NVIDIA GPU: torch sees none"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason=NO_GPU)])]


# -- the placement rule -------------------------------------------------------------------------
def test_every_state_tensor_but_step_moves_to_the_param_device_0_dim_ones_too():
    param = nn.Parameter(torch.empty((), device="meta"))  # a scalar, as the SphereFace2 bias
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    step = torch.tensor(7.0)
    saved = {"momentum_buffer": torch.tensor(0.25), "exp_avg": torch.zeros(3), "count": torch.tensor(2),
             "step": step, "note": 3}
    placed = checkpoint.state_on_param(saved, param, optimizer)
    assert placed.keys() == saved.keys()
    for key in ("momentum_buffer", "exp_avg", "count"):
        assert placed[key].device.type == "meta", key
        assert placed[key].shape == saved[key].shape, key
    assert placed["count"].dtype == torch.int64  # integer state keeps its dtype
    assert placed["step"] is step  # as saved: torch keeps it on the CPU
    assert placed["note"] == 3


def test_floating_state_takes_the_param_dtype_0_dim_ones_too():
    param = nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.AdamW([param])
    saved = {"exp_avg": torch.tensor(0.5), "exp_avg_sq": torch.tensor(0.125), "step": torch.tensor(4.0)}
    placed = checkpoint.state_on_param(saved, param, optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        assert placed[key].dtype == torch.float64, key
        assert placed[key].item() == saved[key].item(), key
    assert placed["step"].dtype == torch.float32


def test_step_goes_to_the_device_as_float32_in_a_capturable_group():
    param = nn.Parameter(torch.empty((), device="meta"))
    optimizer = torch.optim.Adam([param], capturable=True)  # its kernels read `step` on the device
    placed = checkpoint.state_on_param({"step": torch.tensor(4, dtype=torch.int64)}, param, optimizer)
    assert placed["step"].device.type == "meta" and placed["step"].dtype == torch.float32


# -- CUDA RNG states, by device index -----------------------------------------------------------
def test_cuda_rng_states_are_restored_by_device_index(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state.item())))
    checkpoint._restore_cuda_rng_states([torch.tensor(10), torch.tensor(11), torch.tensor(12)])
    assert restored == [(0, 10), (1, 11)]  # saved with 3 devices visible, resumed with 2
    restored.clear()
    checkpoint._restore_cuda_rng_states([torch.tensor(10)])
    assert restored == [(0, 10)]  # saved with 1 visible: device 1 keeps its seeded state
    restored.clear()
    checkpoint._restore_cuda_rng_states([])  # a CPU run's checkpoint, or one from before CUDA states were saved
    assert restored == []


def test_no_cuda_rng_state_is_saved_by_a_process_that_never_initialised_cuda(monkeypatch):
    def initialise(*args):
        raise AssertionError("CUDA initialised to save its RNG state")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", initialise)
    assert checkpoint._cuda_rng_states() == []


# -- a trainer saved and resumed ----------------------------------------------------------------
def _config(data, run_dir, device: str, optimizer: str = "sgd"):
    return load_config([DEMO], overrides(data, run_dir, **{
        "run.max_steps": 4, "eval.benchmarks": "[]", "engine.device": device, "optim.name": optimizer}))


def _head_optimizer_state(trainer) -> dict:
    return {name: {key: value.clone() for key, value in trainer.head_optimizer.state[param].items()}
            for name, param in trainer.head.named_parameters()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("device", DEVICES)
def test_resume_puts_head_optimizer_state_on_the_param_device_and_restores_the_rng(
        tiny_data, tmp_path, device, optimizer):
    from sf2dist.train import Trainer

    cfg = _config(tiny_data, tmp_path / "run", device, optimizer)
    trainer = Trainer(cfg)
    trainer.run(until_step=2)
    saved_state = _head_optimizer_state(trainer)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else []
    trainer.save_checkpoint()
    torch.rand(8)  # move the streams on: the resume must bring them back
    if device == "cuda":
        torch.rand(8, device="cuda")

    resumed = Trainer(cfg)
    resumed._resume()
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    for index, state in enumerate(cuda_rng):
        assert torch.equal(torch.cuda.get_rng_state(index), state), f"CUDA RNG of device {index}"
    params = dict(resumed.head.named_parameters())
    assert params["bias"].ndim == 0
    for name, expected in saved_state.items():
        state = resumed.head_optimizer.state[params[name]]
        assert state.keys() == expected.keys(), name
        for key, value in state.items():
            # `step` where torch's optimizer keeps it (the CPU unless fused or capturable), the rest with the param
            where = expected[key].device if key == "step" else params[name].device
            assert value.device == where, f"{name} {key} on {value.device}, expected {where}"
            assert value.dtype == expected[key].dtype, f"{name} {key}"
            assert torch.equal(value.cpu(), expected[key].cpu()), f"{name} {key}"
    resumed.cfg.run.resume = False  # resumed already: run() goes on from here, through an optimizer step
    assert resumed.run(until_step=3)["step"] == 3
    assert torch.isfinite(resumed.head.bias).item()


def test_a_checkpoint_without_cuda_rng_states_still_resumes(tiny_data, tmp_path):
    """As written before the CUDA RNG states were saved: the CPU stream and the bias momentum come back."""
    from sf2dist.train import Trainer

    cfg = _config(tiny_data, tmp_path / "run", "cpu")
    trainer = Trainer(cfg)
    trainer.run(until_step=2)
    (saved,) = checkpoint.checkpoint_dirs(tmp_path / "run")
    head_file = saved / "head-00000.pt"
    part = torch.load(head_file, weights_only=True)
    assert part["cuda_rng"] == []  # CUDA never initialised in this process: nothing to keep
    del part["cuda_rng"]
    torch.save(part, head_file)
    bias_momentum = trainer.head_optimizer.state[trainer.head.bias]["momentum_buffer"].clone()
    torch.rand(8)

    resumed = Trainer(cfg)
    resumed._resume()
    assert resumed.state.step == 2
    assert torch.equal(torch.get_rng_state(), part["rng"])
    assert torch.equal(resumed.head_optimizer.state[resumed.head.bias]["momentum_buffer"], bias_momentum)
