"""What only a GPU shows: the heads on CUDA against the float64 reference in fp32/bf16/fp16,
compiled against eager, bf16 row storage with its fused step, the loader's normalisation on
the device, and a 1-rank NCCL group. Skipped, with the reason, where torch sees no GPU;
`make gpu-check` runs them (`pytest -m cuda`).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sf2dist.heads import PartialFCHead, SphereFace2Head, make_head_sgd
from tests.dense_reference import margin_softmax_loss, sphereface2_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: torch sees none")]

CLASSES, DIM, BATCH = 3000, 64, 96
# relative tolerances (of the largest entry) per autocast precision: the cosine matmul runs in it
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return embeddings, labels


def _make(kind: str, **kwargs):
    if kind == "sphereface2":
        return SphereFace2Head(CLASSES, DIM, **kwargs)
    return PartialFCHead(CLASSES, DIM, margin=kind, **kwargs)


def _reference(kind: str, head, embeddings, labels):
    """Loss and gradients of the dense float64 reference at the head's weights, on the CPU."""
    emb = embeddings.double().requires_grad_(True)
    weight = head.weight.detach().double().cpu().requires_grad_(True)
    if kind == "sphereface2":
        bias = head.bias.detach().double().cpu().requires_grad_(True)
        loss = sphereface2_loss(emb, labels, weight, bias, alpha=head.alpha, r=head.r, m=head.m, t=head.t,
                                margin=head.margin, loss_weight=head.loss_weight)
    else:
        loss = margin_softmax_loss(emb, labels, weight, margin=head.margin, s=head.s, m=head.m)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double(), rtol=rtol, atol=rtol * scale, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sphereface2", "cosface", "arcface"])
def test_heads_on_cuda_match_the_float64_reference(kind, dtype):
    embeddings, labels = _batch()
    head = _make(kind).cuda()
    emb = embeddings.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = head(emb, labels.cuda())
    loss.backward()
    expected_loss, expected_emb_grad, expected_weight_grad = _reference(kind, head, embeddings, labels)
    rtol = TOLERANCE[dtype]
    _close(loss.detach(), expected_loss, rtol, f"{kind} loss")
    _close(emb.grad, expected_emb_grad, rtol, f"{kind} embedding gradient")
    _close(head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad, expected_weight_grad,
           rtol, f"{kind} weight gradient")
    # no row that has a float64 gradient lost it to half-precision underflow
    weight_grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
    lost = (weight_grad.abs().sum(1) == 0).cpu() & (expected_weight_grad.abs().sum(1) > 0)
    assert not lost.any(), f"{int(lost.sum())} rows got no gradient under {dtype}"


@pytest.mark.parametrize("kind", ["sphereface2", "cosface"])
def test_compiled_and_eager_elementwise_agree_on_cuda(kind):
    pytest.importorskip("triton", reason="torch.compile on CUDA needs Triton")
    embeddings, labels = _batch(1)
    results = []
    for compiled in (False, True):
        head = _make(kind, compile_elementwise=compiled).cuda()
        emb = embeddings.cuda().requires_grad_(True)
        loss = head(emb, labels.cuda())
        loss.backward()
        results.append((loss.detach(), emb.grad, head.weight.grad))
    for eager, compiled, what in zip(results[0], results[1], ("loss", "embedding gradient", "weight gradient")):
        _close(compiled, eager, 1e-5, f"{kind} {what}, compiled against eager")


def test_bfloat16_rows_with_the_fused_step_follow_float32_rows_on_cuda():
    embeddings, labels = _batch(2)
    weights = []
    for storage in (torch.float32, torch.bfloat16):
        head = SphereFace2Head(CLASSES, DIM, storage_dtype=storage).cuda()
        optimizer = make_head_sgd(head, head.parameters(), lr=0.5, momentum=0.9, fused_step=True)
        for _ in range(3):
            head(embeddings.cuda().requires_grad_(True), labels.cuda()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert head.weight.dtype == storage
        weights.append(head.weight.detach().float())
    moved = (weights[0] - SphereFace2Head(CLASSES, DIM).weight.detach().cuda()).abs().max()
    assert moved > 1e-3, "the step moved nothing: the comparison would test nothing"
    # bfloat16 keeps 8 bits of mantissa: rows of norm 1 agree to a few 1e-3 after three steps
    assert (weights[0] - weights[1]).abs().max() < 2e-2


def test_loader_normalises_on_the_device(tmp_path):
    from sf2dist.data import make_loader, synth

    data = synth.generate(tmp_path / "synth", identities=6, images_per_identity=4, holdout_identities=4, pairs=10,
                          size=32, seed=1, workers=0)
    options = dict(batch_size=8, rank=0, world_size=1, num_workers=1, seed=3, flip=False)
    on_cpu = list(make_loader(data / "train", **options))
    on_gpu = list(make_loader(data / "train", pin_memory=True, device="cuda", **options))
    assert len(on_cpu) == len(on_gpu)
    for (images, labels), (gpu_images, gpu_labels) in zip(on_cpu, on_gpu):
        assert gpu_images.is_cuda and gpu_labels.is_cuda and gpu_images.dtype == torch.float32
        assert torch.equal(gpu_images.cpu(), images) and torch.equal(gpu_labels.cpu(), labels)


def _nccl_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=1, device_id=torch.device("cuda", 0))
    try:
        value = torch.arange(4, dtype=torch.float32, device="cuda")
        dist.all_reduce(value)
        gathered = [torch.empty(4, device="cuda")]
        dist.all_gather(gathered, value)
        torch.save({"backend": dist.get_backend(), "sum": value.cpu(), "gathered": gathered[0].cpu()}, out)
    finally:
        dist.destroy_process_group()


def test_a_one_rank_nccl_group_runs_collectives(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "nccl.pt"
    mp.start_processes(_nccl_rank, args=(port, str(out)), nprocs=1, start_method="spawn")
    result = torch.load(out, weights_only=True)
    assert result["backend"] == "nccl"
    assert torch.equal(result["sum"], torch.arange(4.0)) and torch.equal(result["gathered"], torch.arange(4.0))
