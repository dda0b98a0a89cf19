"""Device-to-host reads per training step, counted on any machine (issue #24).

On a GPU every read of a device tensor's value by the host (`.item()`, `.tolist()`,
`bool(t)`, `float(t)`, `int(t)`, `nonzero()`, `unique()`, `.cpu()`, `.numpy()`, and the
functions that return a Python value: `torch.equal`, `torch.allclose`) waits until the device
has run everything queued before it, so the host stops queueing the next kernels. On a CPU
the same calls cost nothing, but they can still be counted: `ReadCounter` wraps them and
records where each came from (the first frame in sf2dist's, launch's or the tests' code), so a count
taken on a laptop says what a GPU would wait for, and where.

    torchrun --nproc_per_node=2 -m sf2dist.bench.host_reads --out reads.json --from-step 2 \\
        launch/train.py --config configs/demo_cpu.yaml --set run.max_steps=8 --set run.log_every=1000

runs launch/train.py with the counter on and writes, per rank, `reads.json.rank<R>`: the reads
made between the start of step `--from-step` and the start of the last step the run took,
divided by the steps in between (the loop's logging, checkpoints and evaluations included, so
make them rarer than that window to see the plain step), and every call site with its count.
Reads of host tensors are counted as well (a CPU cannot tell them apart); the loader's worker
processes are not, nor anything a wrapped call makes inside another.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# the Tensor methods that hand a value to the host, and the torch functions that do
TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "unique", "cpu", "numpy")
TORCH_READS = ("nonzero", "unique", "equal", "allclose")
_OURS = tuple(str(ROOT / part) + os.sep for part in ("sf2dist", "launch", "tests"))


class ReadCounter:
    """Counts host reads of tensors while installed (`with ReadCounter() as counter:`)."""

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()  # "file:line (read)": count
        self._inside = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def snapshot(self) -> Counter[str]:
        return Counter(self.sites)

    def _site(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(_OURS) and name != __file__:
                return f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}"
            frame = frame.f_back
        return "elsewhere"

    def _wrap(self, owner: object, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        def counted(*args, **kwargs):
            if getattr(counter._inside, "depth", 0):
                return original(*args, **kwargs)
            counter.sites[f"{counter._site()} ({name.strip('_')})"] += 1
            counter._inside.depth = 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside.depth = 0

        counted.__name__ = getattr(original, "__name__", name)
        counted.__doc__ = getattr(original, "__doc__", None)
        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def install(self) -> ReadCounter:
        for name in TENSOR_READS:
            self._wrap(torch.Tensor, name)
        for name in TORCH_READS:
            self._wrap(torch, name)
        return self

    def uninstall(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def __enter__(self) -> ReadCounter:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def per_step(first: Counter[str], last: Counter[str], steps: int) -> dict:
    """The reads between two snapshots `steps` steps apart: total per step and by call site."""
    sites = last - first
    return {"steps": steps, "reads": sum(sites.values()), "reads_per_step": sum(sites.values()) / steps if steps else None,
            "sites": dict(sites.most_common())}


@contextlib.contextmanager
def counting_steps(from_step: int) -> Iterator[dict]:
    """Count reads in every `Trainer.train_step` from step `from_step` on while the block runs;
    the yielded dict gets, on exit, `per_step`'s figures between the start of `from_step` and
    the start of the last step taken (or "error" when the run never reached `from_step`)."""
    from sf2dist.train.trainer import Trainer

    counter = ReadCounter().install()
    marks: dict[str, tuple[int, Counter[str]]] = {}
    original_step = Trainer.train_step

    def train_step(self, batches):
        step = self.state.step  # the step about to be taken
        if step >= from_step:
            marks.setdefault("first", (step, counter.snapshot()))
            marks["last"] = (step, counter.snapshot())
        return original_step(self, batches)

    Trainer.train_step = train_step
    record: dict = {}
    try:
        yield record
    finally:
        Trainer.train_step = original_step
        counter.uninstall()
        if "first" in marks:
            (first_step, first), (last_step, last) = marks["first"], marks["last"]
            record.update(from_step=first_step, to_step=last_step, **per_step(first, last, last_step - first_step))
        else:
            record["error"] = f"the run never reached step {from_step}"


def _count_training(script: str, script_args: list[str], out: Path, from_step: int) -> None:
    sys.argv = [script, *script_args]
    code = 0
    rank = int(os.environ.get("RANK", "0"))
    try:
        with counting_steps(from_step) as record:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    finally:
        Path(f"{out}.rank{rank}").write_text(json.dumps({"rank": rank, **record}, indent=1) + "\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="per-rank results go to OUT.rank<R> (JSON)")
    parser.add_argument("--from-step", type=int, default=2,
                        help="count from the start of this step (the ones before warm up; default %(default)s)")
    parser.add_argument("script", help="the training script, e.g. launch/train.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    _count_training(args.script, args.script_args, args.out, args.from_step)


if __name__ == "__main__":
    main()
