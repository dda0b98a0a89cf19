"""The SphereFace (A-Softmax) margin of the sharded softmax head, normalised and as in 2017.

On 1, 2 and 3 gloo ranks in float64, loss and the gradients of embeddings and rows equal
tests/dense_reference.py's `a_softmax_loss` (written from the formula) on the concatenated
batch, for the reference and the fused implementation at chunk sizes that divide the shards
and that do not, with and without Partial FC's class sampling; the batches spread the true
classes' cosines over every branch k of psi (asserted). Also pinned: psi is continuous and
decreasing; lambda follows the trainer's step, through a resume; half-precision autocast keeps
the loss math in float32; the fused head never holds the logits; the config refuses what does
not fit; the scaling benchmark knows the method.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sf2dist.bench.scaling import METHODS, BenchSettings, measure_compute, parse_method, step_collectives
from sf2dist.config import ConfigError, load_config
from sf2dist.heads import LambdaSchedule, PartialFCHead, init_class_rows, sphereface_psi
from sf2dist.train.trainer import build_head
from tests import dense_reference
from tests.distributed import run_on_ranks
from tests.head_cases import (
    EMBEDDING_DIM, FUSED_CHUNK_SIZES, GRAD_LOSS, NUM_CLASSES, SPHEREFACE_CASES, AllocationTracker, run_fused_cases,
)

WORLD_SIZES = (1, 2, 3)
BATCH = 12
# rows of uneven norms (0.5 .. 2 by global class), so that the rows' normalisation counts
CLASS_SCALES = torch.linspace(0.5, 2.0, NUM_CLASSES, dtype=torch.float64)
# true-class cosines: a spread over (-1, 1) and both sides of the clamp at 1 - 1e-5
TARGET_COSINES = torch.cat([torch.linspace(-0.97, 0.97, BATCH - 2, dtype=torch.float64),
                            torch.tensor([1.0 - 1e-6, -1.0 + 1e-6], dtype=torch.float64)])
DENSE_TOL = dict(rtol=1e-8, atol=1e-10)  # float64: far below float32 rounding
FUSED_TOL = dict(rtol=1e-9, atol=1e-12)


def full_weight() -> torch.Tensor:
    """Every class's row as the heads hold them (seed 3, scaled by CLASS_SCALES), float64."""
    return init_class_rows(0, NUM_CLASSES, EMBEDDING_DIM, seed=3).double() * CLASS_SCALES.unsqueeze(1)


def global_batch(name: str, world_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Embeddings [12, D] at the cosines TARGET_COSINES to their class's row (norms 1 .. 8),
    labels [12] int64, per-rank sizes; the same batch on any number of ranks."""
    case = SPHEREFACE_CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    if case.get("labels", "random") == "random":
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    else:
        labels = torch.tensor([0, 1, 9])[torch.randint(0, 3, (BATCH,), generator=generator)]
    rows = F.normalize(full_weight(), dim=1)[labels]
    noise = torch.randn(BATCH, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    noise = F.normalize(noise - (noise * rows).sum(1, keepdim=True) * rows, dim=1)
    cos = TARGET_COSINES[torch.randperm(BATCH, generator=generator)].unsqueeze(1)
    norms = 1.0 + 7.0 * torch.rand(BATCH, 1, generator=generator, dtype=torch.float64)
    embeddings = norms * (cos * rows + (1.0 - cos**2).sqrt() * noise)
    if case.get("sizes", "even") == "even":
        sizes = [BATCH // world_size] * world_size
    else:
        sizes = [[12], [5, 7], [5, 0, 7]][world_size - 1]
    return embeddings, labels, sizes


def _run_case(name: str, rank: int, world_size: int, implementation: str, chunk_size) -> dict:
    case = SPHEREFACE_CASES[name]
    embeddings, labels, sizes = global_batch(name, world_size)
    start = sum(sizes[:rank])
    local = embeddings[start:start + sizes[rank]].clone().requires_grad_(True)
    head = PartialFCHead(NUM_CLASSES, EMBEDDING_DIM, seed=3, implementation=implementation, chunk_size=chunk_size,
                         **case["kwargs"]).double()
    with torch.no_grad():
        head.weight.mul_(CLASS_SCALES[head.class_start:head.class_stop].unsqueeze(1))
    head.schedule_step = case.get("step", 0)  # as the trainer sets it before each forward
    loss = head(local, labels[start:start + sizes[rank]])
    (GRAD_LOSS * loss).backward()
    return {"loss": head.global_loss(loss), "embedding_grad": local.grad, "weight_grad": head.weight.grad,
            "sampled": head.last_sampled_classes, "class_range": [head.class_start, head.class_stop],
            "lambda": head.blend_lambda}


def _run_all(rank: int, world_size: int) -> dict:
    """{case: {"reference": result, "<chunk size>": result, ...}} on this rank."""
    return run_fused_cases(rank, world_size, SPHEREFACE_CASES, _run_case)


@pytest.fixture(scope="module")
def rank_results():
    """{world_size: [per-rank {case: runs}]}; one spawn per world size for every case."""
    results = {1: [_run_all(0, 1)]}
    for world_size in WORLD_SIZES[1:]:
        results[world_size] = run_on_ranks(_run_all, world_size)
    return results


def dense(name: str, world_size: int, kept: torch.Tensor) -> dict:
    """The dense float64 loss and gradients of GRAD_LOSS * loss over the classes `kept`."""
    case = SPHEREFACE_CASES[name]
    kwargs = case["kwargs"]
    embeddings, labels, _ = global_batch(name, world_size)
    embeddings.requires_grad_(True)
    weight = full_weight().requires_grad_(True)
    m = kwargs.get("m", 1.5)
    if kwargs.get("feature_scale") == "norm":
        schedule = kwargs.get("lambda_schedule", LambdaSchedule())
        step = case.get("step", 0)
        # written out from the formula, not read from the head
        lam = max(schedule.minimum, schedule.base * (1.0 + schedule.gamma * step) ** (-schedule.power))
        loss = dense_reference.a_softmax_loss(embeddings, torch.searchsorted(kept, labels), weight[kept], m=m,
                                              lam=lam)
    else:
        loss = dense_reference.a_softmax_loss(embeddings, torch.searchsorted(kept, labels), weight[kept], m=m,
                                              s=kwargs.get("s", 30.0))
    (GRAD_LOSS * loss).backward()
    return {"loss": loss.detach(), "embedding_grad": embeddings.grad, "weight_grad": weight.grad}


def gathered(runs: list[dict], world_size: int) -> dict:
    """The ranks' results as one process's: embedding gradients / W (DDP averages them), rows in order."""
    return {"loss": runs[0]["loss"], "embedding_grad": torch.cat([r["embedding_grad"] for r in runs]) / world_size,
            "weight_grad": torch.cat([r["weight_grad"] for r in runs])}


def branches(name: str, world_size: int) -> set[int]:
    """The branches k of psi that the true classes of the case's batch fall in."""
    embeddings, labels, _ = global_batch(name, world_size)
    cos = (F.normalize(embeddings, dim=1) * F.normalize(full_weight(), dim=1)[labels]).sum(dim=1)
    m = SPHEREFACE_CASES[name]["kwargs"].get("m", 1.5)
    theta = torch.acos(cos.clamp(-1.0 + 1e-5, 1.0 - 1e-5))
    return set(torch.floor(theta * m / math.pi).long().tolist())


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(SPHEREFACE_CASES))
def test_sphereface_margin_matches_the_dense_reference(rank_results, name, world_size):
    m = SPHEREFACE_CASES[name]["kwargs"].get("m", 1.5)
    assert branches(name, world_size) == set(range(math.ceil(m))), "the batch misses a branch of psi"
    ranks = [result[name] for result in rank_results[world_size]]
    kept = torch.cat([r["reference"]["sampled"] for r in ranks])
    if "sample_rate" in SPHEREFACE_CASES[name]["kwargs"]:
        assert kept.numel() < NUM_CLASSES, "sampling kept every class: the case tests nothing"
    want = dense(name, world_size, kept)
    for implementation in ("reference", *map(str, FUSED_CHUNK_SIZES)):
        runs = [r[implementation] for r in ranks]
        where = f"{name}, {implementation}, {world_size} rank(s)"
        for run in runs:  # every rank returns the global loss and kept the same classes in every run
            torch.testing.assert_close(run["loss"], want["loss"], **DENSE_TOL, msg=lambda msg: f"loss, {where}: {msg}")
        assert all(torch.equal(r["sampled"], ranks[i]["reference"]["sampled"]) for i, r in enumerate(runs)), where
        got = gathered(runs, world_size)
        for key in ("embedding_grad", "weight_grad"):
            torch.testing.assert_close(got[key], want[key], **DENSE_TOL, msg=lambda msg, k=key: f"{k}, {where}: {msg}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fused_equals_the_reference_implementation(rank_results, world_size):
    """Chunks of 1, 2, 3 classes (dividing some of the shards of 11 classes on 1-3 ranks, not
    others) and the head's own choice, against implementation='reference' on the same ranks."""
    for name in SPHEREFACE_CASES:
        for rank, runs in enumerate(result[name] for result in rank_results[world_size]):
            for chunk_size in map(str, FUSED_CHUNK_SIZES):
                for key in ("loss", "embedding_grad", "weight_grad"):
                    torch.testing.assert_close(
                        runs[chunk_size][key], runs["reference"][key], **FUSED_TOL,
                        msg=lambda msg, k=key: f"{k}, {name}, chunk_size={chunk_size}, rank {rank}/{world_size}: {msg}")


@pytest.mark.parametrize("world_size", (2, 3))
def test_sampling_keeps_every_class_of_the_batch(rank_results, world_size):
    """Partial FC's sampled loss is the softmax over the kept classes (matched above to the dense
    loss over them); every class of the global batch is among them, whichever rank holds it."""
    for name in ("m1.5-sampled", "m4-sampled-uneven", "norm-m4-at-lambda-min-sampled-uneven"):
        _, labels, _ = global_batch(name, world_size)
        ranks = [result[name]["None"] for result in rank_results[world_size]]
        kept = torch.cat([r["sampled"] for r in ranks])
        assert set(labels.tolist()) <= set(kept.tolist()), name
        rate = SPHEREFACE_CASES[name]["kwargs"]["sample_rate"]
        for r in ranks:
            start, stop = r["class_range"]
            assert r["sampled"].numel() >= max(1, int(rate * (stop - start)))
            assert torch.equal(r["sampled"], r["sampled"].unique())


def test_negative_classes_are_drawn_uniformly():
    """The draw of the classes absent from the batch is uniform: over 2,000 steps each absent class
    is kept at the rate (slots left) / (absent classes), within 5 standard errors; the batch's own
    classes every time. Unbiased in the sense Partial FC has: no absent class is favoured."""
    head = PartialFCHead(60, 8, margin="sphereface", sample_rate=0.2, seed=7)
    labels = torch.tensor([3, 3, 17, 28, 41, 59])
    draws = 2000
    counts = torch.zeros(60)
    for _ in range(draws):
        counts[head.sample_classes(labels)] += 1
    present = torch.zeros(60, dtype=torch.bool)
    present[labels] = True
    assert bool((counts[present] == draws).all())
    p = (head.num_sample - int(present.sum())) / int((~present).sum())
    deviation = (counts[~present] - draws * p).abs() / math.sqrt(draws * p * (1 - p))
    assert float(deviation.max()) < 5.0, f"an absent class is kept {float(deviation.max()):.1f} standard errors off"


@pytest.mark.parametrize("m", (1.5, 2.0, 3.0, 4.0))
def test_psi_is_continuous_and_decreasing_on_zero_to_pi(m):
    theta = torch.linspace(0.0, math.pi, 200_001, dtype=torch.float64)
    psi = sphereface_psi(theta, m)
    step = float(theta[1] - theta[0])
    assert bool((psi.diff() < 0).all()), "psi is not strictly decreasing"
    # |d psi / d theta| = m |sin(m theta)| <= m: a jump anywhere (a wrong branch offset) would show
    assert float(psi.diff().abs().max()) <= m * step * (1 + 1e-9)
    for k in range(1, math.ceil(m)):  # left and right limits agree at each branch boundary
        edge = torch.tensor(k * math.pi / m, dtype=torch.float64)
        left, right = sphereface_psi(edge - 1e-12, m), sphereface_psi(edge + 1e-12, m)
        assert abs(float(left - right)) < 1e-9, f"jump at theta = {k} pi / {m}"
    assert float(psi[0]) == 1.0
    torch.testing.assert_close(psi, dense_reference.sphereface_psi(theta, m), rtol=0, atol=1e-12)
    assert float(sphereface_psi(torch.tensor(math.pi / 3), 4.0)) == pytest.approx(-1.5)  # k = 1: -cos(4 pi/3) - 2


def test_lambda_follows_the_formula_and_the_head_step():
    schedule = LambdaSchedule()
    assert schedule.at(0) == 1000.0
    assert schedule.at(1) == pytest.approx(1000.0 / 1.12, rel=1e-15)
    assert schedule.at(1000) == pytest.approx(1000.0 / 121.0, rel=1e-15)
    assert schedule.at(10**6) == 5.0  # at lambda_min
    head = PartialFCHead(20, 4, margin="sphereface", feature_scale="norm")
    head.schedule_step = 1000
    assert head.blend_lambda == pytest.approx(1000.0 / 121.0, rel=1e-15)
    assert PartialFCHead(20, 4, margin="sphereface").blend_lambda is None  # normalised: no blend
    with pytest.raises(ValueError, match="lambda schedule gamma must be a finite number >= 0, got -1"):
        LambdaSchedule(gamma=-1.0)


def _train_sphereface(rank: int, world_size: int, data: str, run_dir: str, until: int | None) -> dict:
    from sf2dist.train import Trainer
    from tests.test_train import DEMO, overrides

    cfg = load_config([DEMO], overrides(Path(data), Path(run_dir), **{
        "run.max_steps": 5, "eval.benchmarks": "[]", "head.type": "partial_fc", "head.margin": "sphereface",
        "head.m": 1.5, "head.feature_scale": "norm", "head.lambda_gamma": 0.5}))  # the demo sets m 0.1
    trainer = Trainer(cfg)
    seen = []  # (step, lambda) at each forward of the head
    trainer.head.register_forward_pre_hook(lambda head, args: seen.append((head.schedule_step, head.blend_lambda)))
    summary = trainer.run(until_step=until)
    return {"seen": seen, "step": summary["step"], "weight": trainer.head.full_weight().clone()}


def test_lambda_follows_the_trainer_through_a_resume(tmp_path):
    """A run stopped at step 3 and resumed from its checkpoint gives the head the lambda of steps
    3 and 4, and ends with the rows of an uninterrupted run, bit for bit."""
    from sf2dist.data import synth

    data = synth.generate(tmp_path / "data", identities=40, images_per_identity=4, holdout_identities=4, pairs=10,
                          size=32, seed=3, workers=0)
    first = run_on_ranks(_train_sphereface, 1, str(data), str(tmp_path / "split"), 3)[0]
    resumed = run_on_ranks(_train_sphereface, 1, str(data), str(tmp_path / "split"), None)[0]
    straight = run_on_ranks(_train_sphereface, 1, str(data), str(tmp_path / "straight"), None)[0]
    formula = [max(5.0, 1000.0 / (1.0 + 0.5 * step)) for step in range(5)]
    for run, steps in ((first, range(3)), (resumed, range(3, 5)), (straight, range(5))):  # resumed: from the checkpoint
        assert [step for step, _ in run["seen"]] == list(steps) and run["step"] == steps[-1] + 1
        assert [lam for _, lam in run["seen"]] == pytest.approx([formula[step] for step in steps], rel=1e-15)
    assert torch.equal(resumed["weight"], straight["weight"]), "the resumed run's rows differ from the straight run's"


def _half_run(autocast_dtype, implementation, **kwargs):
    generator = torch.Generator().manual_seed(0)
    head = PartialFCHead(40, 16, seed=5, margin="sphereface", implementation=implementation, chunk_size=7, **kwargs)
    embeddings = (4.0 * torch.randn(24, 16, generator=generator)).requires_grad_(True)
    labels = torch.randint(0, 40, (24,), generator=generator)
    head.schedule_step = 500
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = head(embeddings, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and embeddings.grad.dtype == torch.float32
    assert head.weight.grad.dtype == torch.float32
    return loss.detach(), embeddings.grad, head.weight.grad


@pytest.mark.parametrize("autocast_dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("kwargs", (dict(), dict(feature_scale="norm"), dict(m=4.0, sample_rate=0.5)),
                         ids=("normalised", "norm-2017", "m4-sampled"))
@pytest.mark.parametrize("implementation", ("fused", "reference"))
def test_half_precision_autocast_keeps_float32_loss_math(implementation, kwargs, autocast_dtype):
    """Loss and gradients in float32, close to the float32 run: the cosine matmul rounds to the
    half type (bf16: 2^-9 relative) and logits of size s = 30 carry that into the probabilities
    (measured: within 1.2e-2 of each tensor's largest entry, the loss within 4e-4)."""
    full = _half_run(None, implementation, **kwargs)
    half = _half_run(autocast_dtype, implementation, **kwargs)
    for got, want in zip(half, full):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("kwargs", (dict(), dict(feature_scale="norm", sample_rate=0.5), dict(m=4.0)),
                         ids=("normalised", "norm-2017-sampled", "m4"))
def test_fused_head_never_materialises_the_logits(kwargs):
    batch, dim, num_classes = 128, 16, 4096  # the logits (2 MiB) dwarf what the step needs
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, dim, generator=generator).requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    head = PartialFCHead(num_classes, dim, margin="sphereface", chunk_size=256, **kwargs)
    with AllocationTracker() as tracker:
        head(embeddings, labels).backward()
    assert tracker.largest_numel <= num_classes * dim, f"a tensor of {tracker.largest_numel} elements"
    assert tracker.peak_bytes < batch * num_classes * 4 / 2, f"peak {tracker.peak_bytes} bytes"


def test_head_defaults_and_refusals():
    assert (PartialFCHead(10, 4).s, PartialFCHead(10, 4, margin="arcface").s) == (64.0, 64.0)  # as before
    head = PartialFCHead(10, 4, margin="sphereface")
    assert (head.s, head.m, head.feature_scale) == (30.0, 1.5, "s")
    assert PartialFCHead(10, 4, margin="sphereface", feature_scale="norm").s is None
    with pytest.raises(ValueError, match="SphereFace margin m must be a real number >= 1.*got 0.5"):
        PartialFCHead(10, 4, margin="sphereface", m=0.5)
    with pytest.raises(ValueError, match="feature_scale='norm' is the original A-Softmax.*not 'arcface'"):
        PartialFCHead(10, 4, margin="arcface", feature_scale="norm")
    with pytest.raises(ValueError, match="leave s unset"):
        PartialFCHead(10, 4, margin="sphereface", feature_scale="norm", s=30.0)
    with pytest.raises(ValueError, match=r"feature_scale must be one of \('s', 'norm'\), got 'unit'"):
        PartialFCHead(10, 4, margin="sphereface", feature_scale="unit")


# -- config, trainer and benchmark --------------------------------------------------------------

def test_config_refuses_the_sphereface_margin_on_the_sphereface2_head():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["head.margin=sphereface"])
    message = str(err.value)
    assert "head.margin: 'sphereface' is not a margin of head.type sphereface2; expected one of C, A, M" in message
    assert "set head.type partial_fc" in message and "(from --set head.margin=sphereface)" in message


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["head.feature_scal=norm"], "unknown key 'head.feature_scal' in --set head.feature_scal=norm; did you mean "
                                 "'head.feature_scale'?"),
    (["head.lambda_gama=0.2"], "did you mean 'head.lambda_gamma'?"),
    (["head.lamda_min=1"], "did you mean 'head.lambda_min'?"),
    (["head.feature_scale=nrom"], "head.feature_scale: 'nrom' is not one of 's', 'norm'"),
    (["head.type=partial_fc", "head.margin=sphereface", "head.m=0.5"], "head.m: the sphereface margin needs m >= 1"),
    (["head.type=partial_fc", "head.feature_scale=norm"], "head.feature_scale: norm is the original A-Softmax"),
    (["head.type=partial_fc", "head.margin=sphereface", "head.feature_scale=norm", "head.s=30"],
     "head.s: feature_scale norm scales each logit by its feature's norm; leave head.s unset"),
    (["head.type=partial_fc", "head.margin=sphereface", "head.lambda_min=2"],
     "head.lambda_min: only applies to head.feature_scale norm"),
    (["head.type=partial_fc", "head.margin=sphereface", "head.feature_scale=norm", "head.lambda_base=0"],
     "head.lambda_base: must be positive, got 0.0"),
    (["head.type=partial_fc", "head.s=-1"], "head.s: must be positive, got -1.0"),
])
def test_config_refuses_typos_and_misfits_of_the_new_keys(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert fragment in str(err.value)


def test_build_head_passes_the_new_options():
    cfg = load_config(overrides=["head.type=partial_fc", "head.margin=sphereface"])
    head = build_head(cfg, 20)
    assert (head.margin, head.s, head.m, head.feature_scale) == ("sphereface", 30.0, 1.5, "s")
    cfg = load_config(overrides=["head.type=partial_fc", "head.margin=sphereface", "head.m=4",
                                 "head.feature_scale=norm", "head.lambda_base=100", "head.lambda_gamma=1",
                                 "head.lambda_power=2", "head.lambda_min=0.5"])
    head = build_head(cfg, 20)
    assert (head.m, head.s, head.lambda_schedule) == (4.0, None, LambdaSchedule(100.0, 1.0, 2.0, 0.5))
    head.schedule_step = 4
    assert head.blend_lambda == 4.0  # 100 / 5^2
    assert build_head(load_config(overrides=["head.type=partial_fc"]), 20).s == 64.0  # unset s: as before
    assert build_head(load_config(overrides=["head.type=partial_fc", "head.s=16"]), 20).s == 16.0


def test_scaling_benchmark_knows_the_method():
    assert "sphereface" in METHODS
    assert parse_method("sphereface") == ("sphereface", 1.0, False, False)
    assert parse_method("sphereface_0.1").sample_rate == 0.1
    assert step_collectives("sphereface", 2, 16, 32) == step_collectives("softmax", 2, 16, 32)
    with pytest.raises(ValueError, match="unknown method 'sphereface_fstep'"):
        parse_method("sphereface_fstep")
    settings = BenchSettings(num_classes=64, embedding_dim=8, batch_per_rank=4, warmup=0, steps=1)
    compute = measure_compute("sphereface", settings, 2, torch.device("cpu"))
    assert compute["step_s"] > 0 and compute["floor_s"] > 0
