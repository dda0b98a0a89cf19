"""Check a GPU machine: the CUDA tests, host syncs per step, end-to-end and head-only speed at
1M identities, the largest head one GPU holds, and (2+ GPUs) the NCCL scaling bench.

    make gpu-check                      # all parts; runs/gpu-check/report.json + docs/benchmarks.md
    python launch/gpu_check.py --parts cuda_tests,end_to_end

About 8 minutes on one H100/H200-class GPU. See sf2dist/bench/gpu_check.py for what each part does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("cuda_tests", "end_to_end", "host_syncs", "head_efficiency", "max_classes", "scaling_bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/gpu-check"), help="(default: %(default)s)")
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown file whose gpu-check section is rewritten (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS)
                        + " (default: all)")
    parser.add_argument("--classes", type=int, default=1_000_000, help="identities for the speed parts (default: %(default)s)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    from sf2dist.bench import gpu_check

    report = gpu_check.run(args.out_dir, args.docs, parts, classes=args.classes)
    print(gpu_check.markdown(report))
    print(f"wrote {args.out_dir / 'report.json'} and the gpu-check section of {args.docs}")
    failed = [name for name, part in report["parts"].items() if part.get("error")]
    tests = report["parts"].get("cuda_tests", {})
    return 1 if failed or tests.get("failures") or tests.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
