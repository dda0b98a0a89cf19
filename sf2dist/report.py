"""Benchmark reporting: the machine a figure was measured on, and sections of docs/benchmarks.md.

Every benchmark owns one section of `docs/benchmarks.md`, delimited by HTML comments, and
rewrites only that section, so benchmarks can be re-run independently.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path

import torch


def machine_description(disk_of: str | os.PathLike | None = None) -> str:
    """One line naming the hardware and software a figure was measured with; with `disk_of`, also
    the disk that holds that path (device, driver or model, file system, free space)."""
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
    if disk_of is not None:
        parts.append(_disk_description(Path(disk_of)))
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)


def _disk_description(path: Path) -> str:
    """The file system holding `path`, e.g. `disk /dev/vda (virtio_blk), ext4, 79 GB free` (Linux;
    what /proc and /sys do not tell is left out)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    device, fs_type, mount = "", "", Path("/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                point = Path(fields[1].replace("\\040", " "))
                if (path == point or point in path.parents) and len(point.parts) >= len(mount.parts):
                    device, fs_type, mount = fields[0], fields[2], point
    except (OSError, IndexError):
        pass
    kind = ""
    block = Path("/sys/class/block") / Path(device).name
    if device.startswith("/dev/") and block.exists():
        if (block / "partition").exists():  # a partition: the model and driver are its disk's
            block = block.resolve().parent
        model = block / "device" / "model"
        driver = block / "device" / "driver"
        if model.exists():
            kind = model.read_text().strip()
        elif driver.exists():
            kind = driver.resolve().name
    name = f"disk {device or mount}" + (f" ({kind})" if kind else "")
    free = shutil.disk_usage(path).free / 1e9
    return ", ".join(part for part in (name, fs_type, f"{free:.0f} GB free") if part)


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
