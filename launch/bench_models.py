"""`make bench-models`: every registered network on this CPU, exported to ONNX and checked.

Per network (sf2dist.bench.models; names that build the same network for inference, such as
vit_b and vit_b_dp005_mask_005, once): parameters, PyTorch and onnxruntime forward time per image
(batch 8, all cores, median of 5 runs after a warm-up), the export's largest |difference| from
PyTorch, the file's size (with its .onnx.data sidecar for weights over 1.5 GiB), and whether
insightface's model zoo loads the file as its recognition model. The ViT-L and ViT-H take
minutes each and about 4x their weights in memory (vit_h: some 12 GB) while exporting.

    .venv/bin/python launch/bench_models.py --only r18,mbf,vit_t      # prints the table
    .venv/bin/python launch/bench_models.py --out docs/benchmarks.md   # every network, and writes its section
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from sf2dist.bench.models import SECTION, eval_twins, measure_network, to_markdown
from sf2dist.export import missing_onnx_packages
from sf2dist.models import list_backbones
from sf2dist.report import machine_description, write_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="comma-separated networks to run (default: every one of list_backbones())")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed forward (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure, after a warm-up (default 5)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="the ONNX files go to a temporary directory in it, deleted after each network "
                             f"(default {tempfile.gettempdir()}; vit_h's takes 3 GB)")
    parser.add_argument("--out", type=Path, help=f"markdown file whose '{SECTION}' section receives the table "
                                                 "(default: none, print only)")
    args = parser.parse_args(argv)
    names = list_backbones() if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [name for name in names if name not in list_backbones()]
    if unknown or not names:
        parser.error(f"--only names no registered network ({', '.join(unknown) or 'empty'}); "
                     f"choose from {', '.join(list_backbones())}")
    if args.batch_size < 2 or args.repeats < 1:
        parser.error(f"--batch-size must be at least 2 and --repeats at least 1, got {args.batch_size} and "
                     f"{args.repeats}")
    missing = missing_onnx_packages()
    if missing:
        parser.error(f"the ONNX export needs {', '.join(missing)}, not installed here; "
                     "pip install -e '.[export]' installs them")

    start = time.perf_counter()
    rows = []
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-models-") as scratch:
        for name, twins in eval_twins(names).items():
            row = measure_network(name, Path(scratch), batch_size=args.batch_size, repeats=args.repeats)
            row = dataclasses.replace(row, twins=tuple(twins))
            rows.append(row)
            onnx = (f"export failed: {row.onnx_error}" if row.onnx_error else
                    f"ONNX {row.onnx_ms_per_image:.2f} ms/image, max diff {row.max_abs_error:.1e}, "
                    f"file {row.onnx_bytes / 1e6:,.1f} MB{' (external data)' if row.external_data else ''}, "
                    f"insightface: {'recognition model' if row.insightface.recognition else row.insightface.reason}")
            print(f"{name} ({row.parameters / 1e6:.2f}M parameters, {row.input_size}x{row.input_size}): "
                  f"PyTorch {row.torch_ms_per_image:.2f} ms/image; {onnx}", flush=True)
    command = " ".join(["launch/bench_models.py", *(sys.argv[1:] if argv is None else argv)])
    markdown = to_markdown(rows, batch_size=args.batch_size, repeats=args.repeats, machine=machine_description(),
                           command=command, seconds=time.perf_counter() - start)
    print(markdown)
    if args.out is not None:
        write_section(args.out, SECTION, markdown)
        print(f"wrote the '{SECTION}' section of {args.out}")
    failed = [row.name for row in rows if row.onnx_error]
    if failed:
        print(f"bench_models: the ONNX export of {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
