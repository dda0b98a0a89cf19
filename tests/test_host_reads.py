"""At most one device-to-host read per training step, for every head (issue #24).

On a GPU each read of a device tensor's value stalls the host until the device has caught up.
`sf2dist.bench.host_reads` counts the reads on a CPU; here launch/train.py runs under torchrun
with 2 ranks for each head variant, and a step may make one read: the step's numbers (global
loss, gradient norm, stop flags, the head's input checks), which decide whether it is taken.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sf2dist.bench.host_reads import ReadCounter, counting_steps
from sf2dist.config import load_config
from tests.distributed import run_on_ranks
from tests.test_train import DEMO, ROOT, overrides, tiny_data  # noqa: F401  (tiny_data is a fixture)

SOFTMAX = {"head.type": "partial_fc", "head.m": "null"}
VARIANTS = {  # name: config overrides of a tiny run of demo_cpu.yaml
    "sphereface2": {},
    "sphereface2-fused-step-logging-every-step": {"head.step": "fused", "run.log_every": 1},
    "sphereface2-sampled-0.1": {"head.sample_rate": 0.1},
    "cosface": {**SOFTMAX, "head.margin": "cosface"},
    "arcface": {**SOFTMAX, "head.margin": "arcface"},
    "sphereface-margin": {**SOFTMAX, "head.margin": "sphereface"},
    "partial-fc-0.1-bf16": {**SOFTMAX, "head.margin": "cosface", "head.sample_rate": 0.1, "engine.precision": "bf16"},
    "sphereface2-deepspeed-bf16": {"engine.type": "deepspeed", "engine.precision": "bf16"},
    "cosface-deepspeed": {**SOFTMAX, "head.margin": "cosface", "engine.type": "deepspeed"},
}
STEPS, FROM_STEP = 8, 2  # counted over steps 2..7: the first steps set things up once


def test_the_counter_counts_each_read_once_where_our_code_makes_it():
    x = torch.arange(4.0)
    with ReadCounter() as counter:
        x.sum().item()
        bool(x.any())
        f"{x[0]:.1f}"  # formatting a 0-dim tensor reads it (Tensor.__format__ calls item)
        x.tolist()
        torch.nonzero(x)
    assert counter.total == 5, counter.sites
    assert all(site.startswith("tests/test_host_reads.py:") for site in counter.sites), counter.sites
    x.sum().item()  # uninstalled: no longer counted
    assert counter.total == 5


def _settings(data: Path, run_dir: Path, name: str) -> list[str]:
    return overrides(data, run_dir, **{"eval.benchmarks": "[]", "run.max_steps": STEPS, "run.log_every": 1000,
                                       "run.checkpoint_every": 0, "data.num_workers": 1, **VARIANTS[name]})


def _check(name: str, rank: int, record: dict) -> None:
    assert record.get("steps") == STEPS - 1 - FROM_STEP, record
    # the step's numbers are read (the skip agreement): none counted would mean the counter saw nothing
    assert record["sites"], f"{name}, rank {rank}: no read counted: is the counter installed?"
    sites = ", ".join(f"{site} x{count}" for site, count in record["sites"].items())
    assert record["reads_per_step"] <= 1.0, (
        f"{name}, rank {rank}: {record['reads_per_step']:.2f} device-to-host reads per step; at most 1 (the step's "
        f"numbers). Reads over {record['steps']} steps: {sites}")


def test_launch_train_py_under_torchrun_reads_the_device_once_per_step(tiny_data, tmp_path):
    """The count as a user takes it (README): launch/train.py under torchrun, 2 ranks."""
    out = tmp_path / "reads.json"
    args = [arg for value in _settings(tiny_data, tmp_path / "run", "sphereface2") for arg in ("--set", value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "sf2dist.bench.host_reads", "--out", str(out), "--from-step", str(FROM_STEP),
               str(ROOT / "launch" / "train.py"), "--config", DEMO, *args]
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        _check("sphereface2 (launch/train.py)", rank, json.loads(out.with_name(f"reads.json.rank{rank}").read_text()))


def _count_worker(rank: int, world_size: int, data: str, run_root: str, names: list[str]) -> dict:
    from sf2dist.train import Trainer

    records = {}
    for name in names:
        cfg = load_config([DEMO], _settings(Path(data), Path(run_root) / name, name))
        with counting_steps(FROM_STEP) as record:
            trainer = Trainer(cfg)
            trainer.run()
        trainer.loader.close()
        records[name] = dict(record)
    return records


def test_every_head_variant_reads_the_device_once_per_step(tiny_data, tmp_path):
    """The same count for every head, engine and precision: 2 ranks, the trainer's own loop
    (in-process, so that one process group serves every variant)."""
    names = list(VARIANTS)
    ranks = run_on_ranks(_count_worker, 2, str(tiny_data), str(tmp_path), names)
    for rank, records in enumerate(ranks):
        for name in names:
            _check(name, rank, records[name])


def _bad_input_worker(rank: int, world_size: int, data: str, run_dir: str, kind: str) -> dict:
    from sf2dist.train import Trainer

    cfg = load_config([DEMO], overrides(Path(data), Path(run_dir), **{"run.max_steps": 6, "eval.benchmarks": "[]"}))
    trainer = Trainer(cfg)
    forward = trainer.head.forward

    def poisoned(embeddings, labels):  # rank 1's batch index 2 goes bad at step 3
        if rank == 1 and trainer.state.step == 3:
            labels, embeddings = labels.clone(), embeddings.clone()
            if kind == "label":
                labels[2] = 999
            else:
                embeddings[2] = float("nan")
        return forward(embeddings, labels)

    trainer.head.forward = poisoned
    batches = trainer._micro_batches()
    try:
        while True:  # the run's loop, one step at a time, keeping the rows from before each step
            # (a forward renormalises the rows in place: that much happens before the check)
            before = torch.nn.functional.normalize(trainer.head.full_weight(), dim=1), trainer.head.bias.detach().clone()
            trainer.train_step(batches)
            trainer.state.step += 1
    except ValueError as err:
        after = trainer.head.full_weight(), trainer.head.bias.detach()
        return {"error": str(err), "step": trainer.state.step,
                "unchanged": all(torch.equal(b, a) for b, a in zip(before, after))}
    finally:
        trainer.loader.close()


@pytest.mark.parametrize("kind", ("label", "embedding"))
def test_a_bad_input_found_on_the_device_stops_the_step_with_its_place(tiny_data, tmp_path, kind):
    ranks = run_on_ranks(_bad_input_worker, 2, str(tiny_data), str(tmp_path / "run"), kind)
    expected = ("label 999 at batch index 2 on rank 1 is outside [0, 40)" if kind == "label"
                else "embedding at batch index 2 on rank 1 is not finite")
    for rank in ranks:
        assert expected in rank["error"] and rank["step"] == 3, rank
        assert rank["unchanged"], "the step with the bad input was taken"


def test_a_batch_of_another_size_is_refused_before_the_head(tiny_data, tmp_path):
    from sf2dist.train import Trainer

    cfg = load_config([DEMO], overrides(tiny_data, tmp_path / "run", **{"run.max_steps": 2, "eval.benchmarks": "[]"}))
    trainer = Trainer(cfg)
    images, labels = next(iter(trainer.loader))
    with pytest.raises(RuntimeError, match="rank 0 got a batch of 5 images; every rank's batches must hold "
                                           "data.batch_size=16"):
        trainer.train_step(iter([(images[:5], labels[:5])]))
    trainer.loader.close()
