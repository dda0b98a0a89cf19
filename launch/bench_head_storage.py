"""`make bench-head-storage`: what the fused head step and bfloat16 row storage do to accuracy.

Trains the CPU demo (configs/demo_cpu.yaml: synthetic identities, 2 gloo ranks) with the same
data and seeds, changing only how the SphereFace2 rows are stepped and stored:

  separate-fp32: float32 rows, SGD step after the backward (the default);
  fused-fp32:    float32 rows, SGD step fused into the head's forward (head.step fused);
  fused-bf16:    bfloat16 rows and momentum, float32 math, stochastic rounding (head.storage bfloat16);

once per seed (`--seeds`, run.seed: the initial weights, the data order and flips), and reports
the held-out verification accuracy of each run at every evaluation, the final loss and the wall
time, and the mean final accuracy per variant over the seeds, so that a difference between
variants can be set against the spread between seeds (printed, and written to
docs/benchmarks.md with --docs).

    .venv/bin/python launch/bench_head_storage.py --data data/demo --docs docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sf2dist.report import machine_description, write_section

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "separate-fp32": {"head.step": "separate", "head.storage": "float32"},
    "fused-fp32": {"head.step": "fused", "head.storage": "float32"},
    "fused-bf16": {"head.step": "fused", "head.storage": "bfloat16"},
}


def train(variant: str, seed: int, data: Path, out: Path, extra: list[str]) -> float:
    """Run one training; returns its wall time in seconds."""
    settings = [f"{key}={value}" for key, value in VARIANTS[variant].items()] + [f"run.seed={seed}"]
    settings += [f"data.train={data / 'train'}", f"eval.benchmarks=[{data / 'holdout.bin'}]", f"run.dir={out}", *extra]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo_cpu.yaml")]
    for setting in settings:
        command += ["--set", setting]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - start


def read_run(out: Path) -> dict:
    with open(out / "eval.csv") as f:
        evals = [row for row in csv.DictReader(f) if row["benchmark"] == "holdout"]
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    return {"evals": [(int(r["step"]), float(r["accuracy"]), float(r["accuracy_std"])) for r in evals],
            "final_loss": float(metrics[-1]["loss"])}


def to_markdown(results: dict, seeds: list[int], command: str) -> str:
    """`results[(variant, seed)]`: read_run's dict plus "seconds"."""
    first = next(iter(results.values()))
    steps = [step for step, _, _ in first["evals"]]
    header = "| head rows | seed | " + " | ".join(f"step {s}" for s in steps) + " | final loss | wall time |"
    lines = [
        "## Head storage: accuracy with the fused step and bfloat16 rows (`make bench-head-storage`)",
        "",
        "The CPU demo (configs/demo_cpu.yaml: 500 synthetic identities x 20 images, smallcnn, SphereFace2 "
        "m=0.1 r=30, 2 gloo ranks x 64 images, 10 epochs), trained with each seed (run.seed: initial weights, "
        "data order, flips) once per way of stepping and storing the class rows, nothing else changed. "
        "Held-out verification accuracy (3,000 pairs of 200 unseen identities, 10-fold mean ± std) at each "
        "evaluation:",
        "",
        header,
        "|" + "---|" * (len(steps) + 4),
    ]
    for (variant, seed), result in results.items():
        cells = " | ".join(f"{100 * acc:.2f} ± {100 * std:.2f}" for _, acc, std in result["evals"])
        lines.append(f"| {variant} | {seed} | {cells} | {result['final_loss']:.3f} | {result['seconds'] / 60:.1f} min |")
    means = []
    for variant in dict.fromkeys(v for v, _ in results):
        finals = [100 * results[(variant, seed)]["evals"][-1][1] for seed in seeds if (variant, seed) in results]
        means.append(f"{variant} {sum(finals) / len(finals):.2f} % (range {min(finals):.2f}-{max(finals):.2f})")
    lines += ["", f"Final accuracy, mean over seeds {', '.join(map(str, seeds))}: " + "; ".join(means) + ".",
              "", f"Machine: {machine_description()}.", f"Command: `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="sf2dist-synth output (train/, holdout.bin)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/head-storage"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1", help="comma-separated run.seed values (default 0,1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--docs", type=Path, help="markdown file whose 'head-storage' section receives the table")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    for needed in (args.data / "train" / "manifest.json", args.data / "holdout.bin"):
        if not needed.exists():
            parser.error(f"{needed} not found: generate the demo data first (make demo-data)")
    results = {}
    for variant in variants:
        for seed in seeds:
            out = args.out_dir / f"{variant}-seed{seed}"
            seconds = train(variant, seed, args.data, out, args.set)
            results[(variant, seed)] = {**read_run(out), "seconds": seconds}
    command = " ".join(["launch/bench_head_storage.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(results, seeds, command)
    print(markdown)
    if args.docs is not None:
        write_section(args.docs, "head-storage", markdown)
        print(f"wrote the 'head-storage' section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
