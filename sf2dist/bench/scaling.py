"""The classifier-layer scaling benchmark: SphereFace2 against the softmax baseline, side by side.

As in the SphereFace2 paper (Fig. 10, right), only the classifier layer is timed: each rank
feeds `batch_per_rank` random embeddings into the sharded head, which gathers them from every
rank; one step is forward, backward and an SGD step of the head. Classes are fixed in total,
so each rank holds C/W of them while the gathered batch grows to W * batch_per_rank: the work
per rank stays constant and ideal scaling is linear in W. What differs between methods is
what they communicate, which is recorded per step from `sf2dist.comm`.

Per point: median step time over the timed steps (the slowest rank's), images/s, peak memory
per rank, collective calls/bytes/time per step, and the head efficiency: step time divided by
the time of the step's three matrix multiplies alone at the same shapes.

`project()` extends the curve past the ranks at hand from per-rank compute measured at the
shard sizes C/W plus a latency/bandwidth model of each collective; such points are labelled
"projected" in every output.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from sf2dist import comm
from sf2dist.heads import PartialFCHead, ShardedHead, SphereFace2Head, make_head_sgd
from sf2dist.parallel import class_range

METHODS = ("sphereface2", "sphereface2_fstep", "softmax", "sphereface", "partial_fc_0.1", "sphereface2_0.1")
# the head-memory table at 1M local classes: SphereFace2 with a separate SGD step, with the step
# fused into the forward, and with that and bfloat16 storage
MEMORY_METHODS = ("sphereface2", "sphereface2_fstep", "sphereface2_fstep_bf16")
COLUMNS = (
    "method", "world_size", "kind", "device", "backend", "num_classes", "classes_per_rank",
    "batch_per_rank", "global_batch", "embedding_dim", "step_ms", "images_per_s",
    "scaling_efficiency", "matmul_ms", "head_efficiency", "peak_mem_mib", "comm_calls",
    "comm_mib", "comm_ms", "all_reduce_calls", "largest_all_reduce_bytes",
)


@dataclass(frozen=True)
class BenchSettings:
    num_classes: int
    embedding_dim: int = 512
    batch_per_rank: int = 128
    warmup: int = 3
    steps: int = 10
    threads_per_rank: int = 1  # CPU ranks: one core each, the analogue of one GPU each
    compile_elementwise: bool | None = None  # the heads' choice (None: compiled on CUDA with Triton)

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.embedding_dim < 1 or self.batch_per_rank < 1:
            raise ValueError(f"benchmark shapes must be positive: {self}")
        if self.warmup < 0 or self.steps < 1:
            raise ValueError(f"need warmup >= 0 and steps >= 1, got {self.warmup} and {self.steps}")


class Method(NamedTuple):
    head: str  # sphereface2 | softmax | partial_fc (both CosFace) | sphereface (the softmax head, A-Softmax margin)
    sample_rate: float
    fused_step: bool = False  # SphereFace2: rows stepped inside the forward (FusedStepSGD)
    bf16_storage: bool = False  # SphereFace2 with the fused step: rows and momentum in bfloat16


def parse_method(method: str) -> Method:
    """What a method name means; a bad name is an error.

    `sphereface2[_<rate>][_fstep[_bf16]]`: SphereFace2, all classes or a sampled fraction
    (row-sparse SGD), optionally with the SGD step fused into the forward and bfloat16 rows;
    `softmax`: the sharded softmax over all classes; `partial_fc_<rate>`: Partial FC (both with the
    CosFace margin); `sphereface[_<rate>]`: the same sharded softmax with the SphereFace (A-Softmax)
    margin, normalised features, s = 30, m = 1.5, over all classes or Partial FC's sample.
    """
    name, fused_step, bf16 = method, False, False
    if name.endswith("_bf16"):
        name, bf16 = name.removesuffix("_bf16"), True
    if name.endswith("_fstep"):
        name, fused_step = name.removesuffix("_fstep"), True
    if name in ("sphereface2", "softmax", "sphereface"):
        parsed = Method(name, 1.0, fused_step, bf16)
    else:
        parsed = None
        for head in ("sphereface2", "partial_fc", "sphereface"):
            if name.startswith(head + "_"):
                try:
                    rate = float(name.removeprefix(head + "_"))
                except ValueError:
                    break
                if 0.0 < rate <= 1.0:
                    parsed = Method(head, rate, fused_step, bf16)
    if parsed is None or (parsed.head != "sphereface2" and fused_step) or (bf16 and not fused_step):
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}, sphereface2_<rate>, "
                         f"partial_fc_<rate> or sphereface_<rate> with a rate in (0, 1], or a SphereFace2 "
                         f"method with _fstep or _fstep_bf16 appended")
    return parsed


def make_head(method: str, settings: BenchSettings, group=None) -> ShardedHead:
    spec = parse_method(method)
    if spec.head == "sphereface2":
        storage = torch.bfloat16 if spec.bf16_storage else torch.float32
        return SphereFace2Head(settings.num_classes, settings.embedding_dim, sample_rate=spec.sample_rate,
                               process_group=group, storage_dtype=storage,
                               compile_elementwise=settings.compile_elementwise)
    margin = "sphereface" if spec.head == "sphereface" else "cosface"
    return PartialFCHead(settings.num_classes, settings.embedding_dim, margin=margin, sample_rate=spec.sample_rate,
                         process_group=group, compile_elementwise=settings.compile_elementwise)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline to subtract."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return _rss_bytes()


def _peak_memory(device: torch.device, baseline: int) -> int:
    """CUDA: peak allocated bytes since the reset. CPU: peak RSS of this process above baseline
    (each benchmark point runs in fresh processes, so the peak belongs to that point)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


def _time_steps(method, head, settings, device, num_steps, barrier=True):
    """Median step seconds, the collectives of one step, and the matmul columns of the head."""
    rank, _ = comm.rank_and_world(head.process_group)
    generator = torch.Generator().manual_seed(1234 + rank)
    embeddings = torch.randn(settings.batch_per_rank, settings.embedding_dim, generator=generator)
    embeddings = embeddings.to(device).requires_grad_(True)
    label_batches = [torch.randint(0, settings.num_classes, (settings.batch_per_rank,), generator=generator).to(device)
                     for _ in range(4)]
    # what training uses: SGD with momentum (row-sparse when sampled, in the forward for _fstep)
    optimizer = make_head_sgd(head, head.parameters(), lr=0.01, momentum=0.9, fused_step=parse_method(method).fused_step)
    times, step_stats, columns = [], [], head.num_local_classes
    for step in range(settings.warmup + num_steps):
        if barrier:
            comm.barrier(head.process_group)
        comm.stats.reset()
        _sync(device)
        start = time.perf_counter()
        loss = head(embeddings, label_batches[step % len(label_batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None
        _sync(device)
        if step >= settings.warmup:
            times.append(time.perf_counter() - start)
            step_stats.append(comm.stats.snapshot())
            if isinstance(head, PartialFCHead):
                columns = head.last_sampled_classes.numel()
            elif head.sample_rate < 1.0:
                columns = head.last_sampled_rows.numel()
    return statistics.median(times), step_stats, columns


def matmul_floor_seconds(rows: int, columns: int, dim: int, steps: int, device: torch.device) -> float:
    """Median time of a step's three matmuls at these shapes: cos = E W^T, dE = G W, dW = G^T E."""
    embeddings = torch.randn(rows, dim, device=device)
    weight = torch.randn(columns, dim, device=device)
    grad = torch.randn(rows, columns, device=device)
    times = []
    for _ in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        embeddings @ weight.t()
        grad @ weight
        grad.t() @ embeddings
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure_point(method: str, settings: BenchSettings, device: torch.device) -> dict:
    """Measure one (method, world size) point; every rank of the default group calls this."""
    rank, world = comm.rank_and_world()
    if device.type == "cpu":
        torch.set_num_threads(settings.threads_per_rank)
    baseline = _reset_peak_memory(device)
    head = make_head(method, settings).to(device)
    step_s, step_stats, columns = _time_steps(method, head, settings, device, settings.steps)
    peak = _peak_memory(device, baseline)
    global_batch = world * settings.batch_per_rank
    floor_s = matmul_floor_seconds(global_batch, columns, settings.embedding_dim, settings.steps, device)
    comm_s = statistics.mean(sum(kind["seconds"] for kind in s.values()) for s in step_stats)
    # The slowest rank sets the pace: gather each rank's figures and keep the largest.
    local = torch.tensor([[step_s, floor_s, float(peak), comm_s]], dtype=torch.float64, device=device)
    step_s, floor_s, peak, comm_s = comm.all_gather_variable(local).max(dim=0).values.tolist()
    last = step_stats[-1]
    return _point(
        method, world, "measured", settings, device, step_s=step_s, floor_s=floor_s, peak_bytes=peak,
        comm_calls=sum(int(k["calls"]) for k in last.values()),
        comm_bytes=sum(int(k["bytes"]) for k in last.values()), comm_s=comm_s,
        all_reduce_calls=int(last.get("all_reduce", {}).get("calls", 0)),
        largest_all_reduce=max((n for kind, n in comm.stats.log if kind == "all_reduce"), default=0),
    )


def _point(method, world, kind, settings, device, *, step_s, floor_s, peak_bytes, comm_calls,
           comm_bytes, comm_s, all_reduce_calls, largest_all_reduce) -> dict:
    start, stop = class_range(settings.num_classes, 0, world)
    backend = "none" if world == 1 else ("nccl" if device.type == "cuda" else "gloo")
    global_batch = world * settings.batch_per_rank
    return {
        "method": method, "world_size": world, "kind": kind, "device": _device_name(device),
        "backend": backend if kind == "measured" else "model", "num_classes": settings.num_classes,
        "classes_per_rank": stop - start, "batch_per_rank": settings.batch_per_rank,
        "global_batch": global_batch, "embedding_dim": settings.embedding_dim,
        "step_ms": 1e3 * step_s, "images_per_s": global_batch / step_s, "scaling_efficiency": None,
        "matmul_ms": 1e3 * floor_s, "head_efficiency": step_s / floor_s,
        "peak_mem_mib": None if peak_bytes is None else peak_bytes / 2**20,
        "comm_calls": comm_calls, "comm_mib": comm_bytes / 2**20, "comm_ms": 1e3 * comm_s,
        "all_reduce_calls": all_reduce_calls, "largest_all_reduce_bytes": largest_all_reduce,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} thread(s)"


# ---------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Link:
    """Per-rank link of a ring collective: bandwidth in GB/s, latency per hop in microseconds."""

    bandwidth_gbs: float
    latency_us: float

    def seconds(self, kind: str, nbytes: int, world: int) -> float:
        """Ring algorithm time: all-gather/reduce-scatter move (W-1)/W of the full buffer once,
        an all-reduce twice; each of the W-1 (or 2(W-1)) hops pays the latency."""
        if world == 1:
            return 0.0
        hops = 2 * (world - 1) if kind == "all_reduce" else world - 1
        return hops * self.latency_us * 1e-6 + hops / world * nbytes / (self.bandwidth_gbs * 1e9)


def step_collectives(method: str, world: int, batch_per_rank: int, dim: int, elem_bytes: int = 4) -> list[tuple[str, int]]:
    """The (kind, bytes) of every collective in one head step, as `sf2dist.comm` records them."""
    if world == 1:
        return []
    rows = world * batch_per_rank
    calls = [("all_gather", 8 * world), ("all_gather", rows * dim * elem_bytes), ("all_gather", rows * 8)]
    if parse_method(method).head == "sphereface2":
        calls.append(("all_reduce", elem_bytes))  # the shared bias's gradient
    else:
        calls += [("all_reduce", rows * elem_bytes), ("all_reduce", 2 * rows * elem_bytes)]
    calls.append(("reduce_scatter", rows * dim * elem_bytes))
    return calls


def measure_compute(method: str, settings: BenchSettings, world: int, device: torch.device) -> dict:
    """One rank's compute at world size `world`, in this single process: a head holding the
    C/W classes of rank 0 and a gathered batch of W * batch_per_rank rows, no communication."""
    start, stop = class_range(settings.num_classes, 0, world)
    local = BenchSettings(stop - start, settings.embedding_dim, world * settings.batch_per_rank,
                          settings.warmup, settings.steps, settings.threads_per_rank)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads_per_rank)
    head = make_head(method, local).to(device)
    if isinstance(head, PartialFCHead):  # sample as the W-rank shard would: its rate of its classes
        head.num_sample = max(1, int(head.sample_rate * (stop - start)))
    step_s, _, columns = _time_steps(method, head, local, device, settings.steps, barrier=False)
    floor_s = matmul_floor_seconds(local.batch_per_rank, columns, settings.embedding_dim, settings.steps, device)
    return {"step_s": step_s, "floor_s": floor_s}


def project(method: str, settings: BenchSettings, world: int, compute: dict, intra: Link, inter: Link,
            ranks_per_node: int) -> dict:
    """A projected point: measured per-rank compute plus the modelled collectives of one step."""
    link = intra if world <= ranks_per_node else inter
    calls = step_collectives(method, world, settings.batch_per_rank, settings.embedding_dim)
    comm_s = sum(link.seconds(kind, nbytes, world) for kind, nbytes in calls)
    all_reduces = [n for kind, n in calls if kind == "all_reduce"]
    return _point(
        method, world, "projected", settings, torch.device("cpu"), step_s=compute["step_s"] + comm_s,
        floor_s=compute["floor_s"], peak_bytes=None, comm_calls=len(calls),
        comm_bytes=sum(n for _, n in calls), comm_s=comm_s, all_reduce_calls=len(all_reduces),
        largest_all_reduce=max(all_reduces, default=0),
    )


# ---------------------------------------------------------------------------- outputs


def add_scaling_efficiency(points: list[dict]) -> None:
    """images/s at W over W times images/s at W=1, for the same method and kind of point."""
    single = {(p["method"], p["kind"]): p["images_per_s"] for p in points if p["world_size"] == 1}
    for p in points:
        base = single.get((p["method"], p["kind"]))
        p["scaling_efficiency"] = None if base is None else p["images_per_s"] / (p["world_size"] * base)


def write_outputs(points: list[dict], out_dir: Path, settings: BenchSettings, note: str) -> dict[str, Path]:
    """CSV, JSON and PNG of the points; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_scaling_efficiency(points)
    paths = {"csv": out_dir / "scaling.csv", "json": out_dir / "scaling.json", "png": out_dir / "scaling.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(points)
    paths["json"].write_text(json.dumps({"settings": asdict(settings), "note": note, "points": points}, indent=2))
    plot(points, paths["png"], settings)
    return paths


def plot(points: list[dict], path: Path, settings: BenchSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for method in dict.fromkeys(p["method"] for p in points):
        for kind, style in (("measured", "-o"), ("projected", "--s")):
            series = sorted((p["world_size"], p["images_per_s"]) for p in points if p["method"] == method and p["kind"] == kind)
            if not series:
                continue
            line = ax.plot(*zip(*series), style, label=f"{method} ({kind})", color=colors.get(method))[0]
            colors.setdefault(method, line.get_color())
        base = next((p["images_per_s"] for p in points if p["method"] == method and p["world_size"] == 1), None)
        if base is not None:
            sizes = sorted({p["world_size"] for p in points})
            ax.plot(sizes, [base * w for w in sizes], ":", color=colors.get(method), alpha=0.6, label=f"{method} ideal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("images / s (classifier layer)")
    ax.set_title(f"{settings.num_classes:,} identities, {settings.embedding_dim}-d, {settings.batch_per_rank} images/rank")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(points: list[dict]) -> str:
    header = ("| method | W | kind | classes/rank | step ms | images/s | scaling eff. | head eff. | "
              "peak MiB/rank | collectives/step | comm MiB/step | comm ms/step | largest all-reduce |")
    lines = [header, "|" + "---|" * 13]
    for p in points:
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {p['method']} | {p['world_size']} | {p['kind']} | {p['classes_per_rank']:,} | {p['step_ms']:.1f} | "
            f"{p['images_per_s']:,.0f} | {fmt(p['scaling_efficiency'], '.2f')} | {p['head_efficiency']:.2f} | "
            f"{fmt(p['peak_mem_mib'], ',.0f')} | {p['comm_calls']} | {p['comm_mib']:.2f} | {p['comm_ms']:.1f} | "
            f"{p['largest_all_reduce_bytes']:,} B |"
        )
    return "\n".join(lines)


def memory_row(point: dict) -> dict:
    """The head-memory figures of a point: peak against weights + momentum, identities per GiB."""
    spec = parse_method(point["method"])
    bytes_per_value = 2 if spec.bf16_storage else 4
    state_mib = 2 * point["classes_per_rank"] * point["embedding_dim"] * bytes_per_value / 2**20
    peak_mib = point["peak_mem_mib"]
    return {
        "method": point["method"], "classes_per_rank": point["classes_per_rank"],
        "global_batch": point["global_batch"], "storage": "bfloat16" if spec.bf16_storage else "float32",
        "step": "fused into the forward" if spec.fused_step else "separate SGD step",
        "state_mib": state_mib, "peak_mib": peak_mib, "overhead": peak_mib / state_mib - 1.0,
        "identities_per_gib": point["classes_per_rank"] / (peak_mib / 1024), "step_ms": point["step_ms"],
    }


def memory_table(rows: list[dict]) -> str:
    lines = ["| method | storage | optimizer step | classes/rank | images/step | weights + momentum MiB | "
             "peak MiB | peak over weights + momentum | identities per GiB of peak | step ms |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['storage']} | {r['step']} | {r['classes_per_rank']:,} | {r['global_batch']} | "
            f"{r['state_mib']:,.0f} | {r['peak_mib']:,.0f} | {100 * r['overhead']:+.1f}% | "
            f"{r['identities_per_gib'] / 1e6:.2f}M | {r['step_ms']:,.0f} |")
    return "\n".join(lines)


def throughput_ratios(points: list[dict], numerator: str = "sphereface2", denominator: str = "softmax") -> dict:
    """{(world_size, kind): images/s of `numerator` / images/s of `denominator`}."""
    by_key = {(p["method"], p["world_size"], p["kind"]): p["images_per_s"] for p in points}
    return {
        (w, kind): by_key[(numerator, w, kind)] / by_key[(denominator, w, kind)]
        for (method, w, kind) in by_key
        if method == numerator and (denominator, w, kind) in by_key
    }

