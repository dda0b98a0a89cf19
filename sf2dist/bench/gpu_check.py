"""`make gpu-check`: one command that tells whether a GPU machine runs sf2dist, and how fast.

Parts (each recorded in the report with its figures or its error; one failing part does not
stop the others):

- cuda_tests: `pytest -m cuda` (heads on CUDA against the reference in fp32/bf16/fp16,
  compiled against eager, bf16 storage, checkpoint resume on CUDA, the loader's on-device
  normalisation, a 1-rank NCCL group).
- host_syncs: host-device synchronisations per training step of every head variant (issue
  #24's: SphereFace2 separate and fused step, sampled at 0.1, the softmax margins, Partial FC
  at 0.1, DeepSpeed; bf16), counted with `torch.cuda.set_sync_debug_mode("warn")` over steps
  after a warm-up, on one GPU (the target: 1, the step's numbers). The same count on a CPU,
  by wrapping the reads, is tests/test_host_reads.py.
- end_to_end: images/s of a whole training step (loader, backbone in bf16, gathered
  embeddings, head, optimiser) on synthetic shards with 1M identities, for SphereFace2 (fused
  step, bf16 rows), the softmax baseline and Partial FC 0.1.
- head_efficiency: the head alone at 1M classes, step time over the time of its three matmuls
  at the same shapes, compiled and eager.
- max_classes: the largest class count whose SphereFace2 head (bf16 rows, fused step) takes a
  step on one GPU, found by doubling, with identities per GiB.
- scaling_bench: with 2+ GPUs, `launch/scaling_bench.py` over NCCL.

The pure parts (shard writing, the doubling search, the report text) run on a CPU and are
tested there; the rest needs CUDA.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sf2dist.imageio import encode_jpeg

ROOT = Path(__file__).resolve().parents[2]
MILLION = 1_000_000
HEAD_METHODS = ("sphereface2", "sphereface2_fstep", "softmax", "partial_fc_0.1", "sphereface2_0.1")
HOST_SYNC_VARIANTS = {  # name: config overrides on top of the shared ones (bf16, iresnet50)
    "sphereface2": {"head.type": "sphereface2"},
    "sphereface2 (fused step, bf16 rows)": {"head.type": "sphereface2", "head.step": "fused", "head.storage": "bfloat16"},
    "sphereface2 sampled 0.1": {"head.type": "sphereface2", "head.sample_rate": 0.1},
    "cosface": {"head.type": "partial_fc", "head.margin": "cosface"},
    "arcface": {"head.type": "partial_fc", "head.margin": "arcface"},
    "sphereface (A-Softmax margin)": {"head.type": "partial_fc", "head.margin": "sphereface"},
    "partial_fc_0.1": {"head.type": "partial_fc", "head.sample_rate": 0.1},
    "sphereface2, deepspeed": {"head.type": "sphereface2", "engine.type": "deepspeed"},
}
END_TO_END = {  # name: config overrides on top of the shared ones
    "sphereface2 (fused step, bf16 rows)": {"head.type": "sphereface2", "head.step": "fused", "head.storage": "bfloat16"},
    "softmax": {"head.type": "partial_fc", "head.sample_rate": 1.0},
    "partial_fc_0.1": {"head.type": "partial_fc", "head.sample_rate": 0.1},
}


def write_synthetic_shards(out_dir: Path, *, num_classes: int, num_samples: int, size: int = 112,
                           seed: int = 0) -> Path:
    """Shards of `num_samples` noise images whose labels spread over `num_classes` identities.

    For speed figures only (the pixels mean nothing): a 1M-identity head needs labels up to
    1M, not a million rendered faces.
    """
    from sf2dist.data.shards import ShardSetWriter, write_manifest

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_samples)
    labels[: min(num_classes, num_samples)] = np.arange(min(num_classes, num_samples))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    writer = ShardSetWriter(out_dir, 10_000)
    for n, label in enumerate(labels.tolist()):
        image = np.roll(base, shift=n % size, axis=1)  # distinct images without encoding 1M random ones
        writer.write(f"{n:08d}", encode_jpeg(image, quality=90), int(label))
    write_manifest(out_dir, num_classes=num_classes, image_size=(size, size), shards=writer.close(),
                   source={"kind": "gpu-check noise"}, counts={"written": num_samples})
    return out_dir


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> tuple[int, int | None]:
    """Double from `start` while `fits(n)`: (largest n that fit or 0, smallest that did not or None)."""
    good, n = 0, start
    while n <= limit:
        if not fits(n):
            return good, n
        good, n = n, n * 2
    return good, None


def count_host_syncs(step: Callable[[], None], steps: int) -> float:
    """Host-device synchronisations per call of `step`, as torch's sync debug mode reports them."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs) / steps


def training_config(data: Path, run_dir: Path, device: str, overrides: dict):
    from sf2dist.config import load_config

    values = {"data.train": str(data), "run.dir": str(run_dir), "run.max_steps": 1_000_000,
              "run.checkpoint_every": 0, "run.eval_every": 0, "eval.benchmarks": "[]", "logging.wandb_mode": "disabled",
              "logging.progress": False, "model.backbone": "iresnet50", "engine.device": device,
              "engine.precision": "bf16", "data.batch_size": 256, "data.num_workers": min(8, os.cpu_count() or 1),
              "optim.warmup_steps": 0, **overrides}
    return load_config([str(ROOT / "configs" / "base_gpu.yaml")], [f"{k}={v}" for k, v in values.items()])


def time_training(cfg, *, warmup: int, steps: int, count_syncs: bool = False) -> dict:
    """Images/s of whole training steps (one process), after `warmup` steps; optionally host syncs."""
    from sf2dist.train import Trainer

    trainer = Trainer(cfg)
    trainer.engine.train()
    batches = trainer._micro_batches()
    device = trainer.device
    for _ in range(warmup):
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"step_ms": 1e3 * statistics.median(times), "steps": steps,
              "images_per_s": cfg.data.batch_size / statistics.median(times)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if count_syncs:
            result["host_syncs_per_step"] = count_host_syncs(lambda: trainer.train_step(batches), steps=5)
    trainer.loader.close()
    del trainer, batches
    gc.collect()
    return result


def count_training_syncs(cfg, *, warmup: int, steps: int) -> dict:
    """Host syncs per whole training step (one process) after `warmup` steps."""
    from sf2dist.train import Trainer

    trainer = Trainer(cfg)
    trainer.engine.train()
    batches = trainer._micro_batches()
    for _ in range(warmup):
        trainer.train_step(batches)
    torch.cuda.synchronize()
    try:
        return {"host_syncs_per_step": count_host_syncs(lambda: trainer.train_step(batches), steps=steps),
                "steps": steps}
    finally:
        trainer.loader.close()
        del trainer, batches
        gc.collect()


def head_efficiency(method: str, num_classes: int, compiled: bool, device: torch.device) -> dict:
    from sf2dist.bench import scaling

    settings = scaling.BenchSettings(num_classes, 512, 256, warmup=3, steps=10, compile_elementwise=compiled)
    point = scaling.measure_point(method, settings, device)
    return {k: point[k] for k in ("step_ms", "matmul_ms", "head_efficiency", "images_per_s", "peak_mem_mib")}


def sphereface2_step_fits(num_classes: int, device: torch.device, batch: int = 256, dim: int = 512) -> bool:
    """Does a SphereFace2 head of `num_classes` rows (bf16 storage, fused SGD step) take a step here?"""
    from sf2dist.heads import SphereFace2Head, make_head_sgd

    head = optimizer = None
    try:
        head = SphereFace2Head(num_classes, dim, storage_dtype=torch.bfloat16).to(device)
        optimizer = make_head_sgd(head, head.parameters(), lr=0.01, momentum=0.9, fused_step=True)
        embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
        labels = torch.randint(0, num_classes, (batch,), device=device)
        head(embeddings, labels).backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del head, optimizer
        torch.cuda.empty_cache()


def run_cuda_tests(out_dir: Path) -> dict:
    junit = out_dir / "cuda-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", f"--junitxml={junit}", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "exit_status": proc.returncode, "tail": proc.stdout[-2000:]}


def markdown(report: dict) -> str:
    """The GPU section of docs/benchmarks.md from a report."""
    lines = ["## GPU check (`make gpu-check`)", "",
             f"Measured on {report['machine']}; {report['started']}; {report['seconds']:.0f} s in all."]
    parts = report["parts"]

    def failed(name):
        return parts.get(name, {}).get("error")

    tests = parts.get("cuda_tests", {})
    if failed("cuda_tests"):
        lines.append(f"\n- CUDA tests: did not run ({failed('cuda_tests')})")
    elif tests:
        lines.append(f"\n- CUDA tests (`pytest -m cuda`): {tests['passed']} passed, {tests['failures'] + tests['errors']} "
                     f"failed, {tests['skipped']} skipped" + (f": {', '.join(tests['failed'])}" if tests["failed"] else ""))
    for name, part in parts.get("end_to_end", {}).items():
        if isinstance(part, dict) and "images_per_s" in part:
            syncs = f", {part['host_syncs_per_step']:.1f} host syncs per step" if "host_syncs_per_step" in part else ""
            lines.append(f"- End to end, {name}: {part['images_per_s']:,.0f} images/s ({part['step_ms']:.1f} ms "
                         f"per step, peak {part.get('peak_memory_gib', float('nan')):.1f} GiB{syncs})")
        elif isinstance(part, dict):
            lines.append(f"- End to end, {name}: failed ({part.get('error')})")
    efficiency = parts.get("head_efficiency", {})
    if efficiency and not failed("head_efficiency"):
        lines += ["", "| head (1M classes, 512-d, 256 images) | compiled | step ms | matmul ms | step / matmul |",
                  "|---|---|---:|---:|---:|"]
        for key, row in efficiency.items():
            if "step_ms" in row:
                method, compiled = key.rsplit("/", 1)
                lines.append(f"| {method} | {compiled} | {row['step_ms']:.2f} | {row['matmul_ms']:.2f} | "
                             f"{row['head_efficiency']:.2f} |")
    syncs = parts.get("host_syncs", {})
    if syncs and not failed("host_syncs"):
        lines += ["", "| head variant (one GPU, bf16) | host syncs per step |", "|---|---:|"]
        for name, row in syncs.items():
            if isinstance(row, dict) and "host_syncs_per_step" in row:
                lines.append(f"| {name} | {row['host_syncs_per_step']:.1f} |")
            elif isinstance(row, dict) and "error" in row:
                lines.append(f"| {name} | failed: {row['error']} |")
    fit = parts.get("max_classes", {})
    if fit and not failed("max_classes"):
        lines.append(f"\nLargest SphereFace2 head (bf16 rows, fused step, 512-d, batch 256) that steps on one GPU, "
                     f"by doubling: {fit['largest']:,} classes ({fit['identities_per_gib']:,.0f} identities per GiB; "
                     f"{fit['first_failure'] or 'no failure'} did not fit).")
    errors = [f"{name}: {part['error']}" for name, part in parts.items() if isinstance(part, dict) and part.get("error")]
    if errors:
        lines += ["", "Parts that failed: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def run(out_dir: Path, docs: Path | None, parts: list[str], classes: int = MILLION) -> dict:
    from sf2dist.report import machine_description, write_section

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA device here (torch "
                         f"{torch.__version__}); run it on a GPU machine with a CUDA build of torch")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    report = {"machine": machine_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    begin = time.perf_counter()

    def part(name: str, fn: Callable[[], dict]) -> None:
        if name not in parts:
            return
        start = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            report["parts"][name] = fn()
        except Exception as err:  # recorded, and the next part runs
            report["parts"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        report["parts"][name]["seconds"] = time.perf_counter() - start
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"gpu-check: {name} done in {time.perf_counter() - start:.0f} s", flush=True)

    part("cuda_tests", lambda: run_cuda_tests(out_dir))

    def end_to_end() -> dict:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = write_synthetic_shards(Path(tmp) / "shards", num_classes=classes, num_samples=8192)
            for number, (name, overrides) in enumerate(END_TO_END.items()):
                cfg = training_config(data, Path(tmp) / f"run{number}", "cuda", overrides)
                try:
                    results[name] = time_training(cfg, warmup=5, steps=20, count_syncs=number == 0)
                except Exception as err:
                    results[name] = {"error": f"{type(err).__name__}: {err}"}
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        return results

    part("end_to_end", end_to_end)

    def host_syncs() -> dict:
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = write_synthetic_shards(Path(tmp) / "shards", num_classes=10_000, num_samples=2048)
            for number, (name, overrides) in enumerate(HOST_SYNC_VARIANTS.items()):
                cfg = training_config(data, Path(tmp) / f"run{number}", "cuda",
                                      {"data.batch_size": 64, "model.backbone": "iresnet18", **overrides})
                try:
                    rows[name] = count_training_syncs(cfg, warmup=3, steps=5)
                except Exception as err:
                    rows[name] = {"error": f"{type(err).__name__}: {err}"}
                torch.cuda.empty_cache()
        return rows

    part("host_syncs", host_syncs)

    def efficiency() -> dict:
        rows = {}
        for method in HEAD_METHODS:
            for compiled in (False, True):
                try:
                    rows[f"{method}/{'yes' if compiled else 'no'}"] = head_efficiency(method, classes, compiled, device)
                except Exception as err:
                    rows[f"{method}/{'yes' if compiled else 'no'}"] = {"error": f"{type(err).__name__}: {err}"}
                torch.cuda.empty_cache()
        return rows

    part("head_efficiency", efficiency)

    def max_classes() -> dict:
        total = torch.cuda.get_device_properties(device).total_memory
        largest, failure = largest_fitting(lambda n: sphereface2_step_fits(n, device), MILLION, 1 << 30)
        return {"largest": largest, "first_failure": failure, "gpu_memory_gib": total / 2**30,
                "identities_per_gib": largest / (total / 2**30)}

    part("max_classes", max_classes)

    def scaling_bench() -> dict:
        gpus = torch.cuda.device_count()
        if gpus < 2:
            return {"skipped": f"{gpus} GPU: the scaling bench needs 2 or more"}
        proc = subprocess.run([sys.executable, "launch/scaling_bench.py", "--out-dir", str(out_dir / "scaling"),
                               "--memory-classes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        return {"exit_status": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}

    part("scaling_bench", scaling_bench)
    report["seconds"] = time.perf_counter() - begin
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if docs is not None:
        write_section(docs, "gpu-check", markdown(report))
    return report
