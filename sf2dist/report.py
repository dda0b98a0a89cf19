"""Benchmark reporting: the machine a figure was measured on, and sections of docs/benchmarks.md.

Every benchmark owns one section of `docs/benchmarks.md`, delimited by HTML comments, and
rewrites only that section, so benchmarks can be re-run independently.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine_description() -> str:
    """One line naming the hardware and software a figure was measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)


def write_section(path: str | os.PathLike, name: str, markdown: str) -> None:
    """Replace (or append) the section `name` of the markdown file at `path`."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured figures; each section names the machine it ran on.\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
