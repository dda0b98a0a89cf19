"""The classifier-layer scaling benchmark: SphereFace2 against the softmax baseline, side by side.

As in the SphereFace2 paper (Fig. 10, right), only the classifier layer is timed: each rank
feeds `batch_per_rank` random embeddings into the sharded head, which gathers them from every
rank; one step is forward, backward and an SGD step of the head. Classes are fixed in total,
so each rank holds C/W of them while the gathered batch grows to W * batch_per_rank: the work
per rank stays constant and ideal scaling is linear in W. What differs between methods is
what they communicate, which is recorded per step from `sf2dist.comm`.

Interleaved rounds: every method's head is built at once, and each round runs one step of
every method, in an order that changes from round to round (`round_order`, a balanced Latin
square derived from the round index, so all ranks agree without talking), each step behind a
barrier so that every rank times the same step of the same method. Whatever the machine does
for a while (another job, a frequency change) then falls on all methods alike, and a ratio
between two methods is taken round by round: the figure is the median of the per-round
ratios, with its interquartile range and a bootstrap 90 % interval (`summarize_ratios`).

Per point: the slowest rank's step time per round (median and IQR over rounds), images/s,
collective calls/bytes/time per step, and the step's cost over its matmuls: the median over
rounds of the step time over the time of the step's three matrix multiplies alone at the same
shapes, timed in the same round (`head_efficiency` in the CSV and JSON; lower is better).
`TABLE_COLUMNS` defines every column of the markdown table, and `table_legend` writes those
definitions under it. Peak memory per rank is measured apart, one method at a time
(`measure_point`: in fresh processes on CPU, before the rounds on CUDA), so that holding
several heads does not distort it.

`project()` extends the curve past the ranks at hand from per-rank compute measured at the
shard sizes C/W (also in interleaved rounds) plus a latency/bandwidth model of each
collective, with the link given by a named preset (`LINK_PRESETS`), by numbers, or fitted to
the collectives the run timed (`fit_link`); such points are labelled "projected" everywhere.
A GPU link preset over compute timed on a CPU is refused (`projection_kind`): it would give GPU
cluster figures from CPU step times. Forced, its points are labelled "projected, CPU compute".
"""
from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    "batch_per_rank", "global_batch", "embedding_dim", "rounds", "step_ms", "step_ms_q1", "step_ms_q3",
    "images_per_s", "scaling_efficiency", "matmul_ms", "head_efficiency", "peak_mem_mib", "comm_calls",
    "comm_mib", "comm_ms", "all_reduce_calls", "largest_all_reduce_bytes",
)
# the spread stated with every ratio: a bootstrap interval of the median at this level
INTERVAL_LEVEL = 0.9
# what a point is (its "kind"): timed at its world size; or one rank's compute timed here plus
# modelled collectives; or that with a GPU link preset over compute timed on a CPU (forced only)
KIND_MEASURED, KIND_PROJECTED, KIND_PROJECTED_CPU = "measured", "projected", "projected, CPU compute"


@dataclass(frozen=True)
class BenchSettings:
    num_classes: int
    embedding_dim: int = 512
    batch_per_rank: int = 128
    warmup: int = 2  # untimed rounds (one step of every method each) before the timed ones
    steps: int = 12  # timed rounds
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


def head_state_bytes(methods: list[str], num_classes: int, embedding_dim: int) -> int:
    """Weights + momentum of every method's head over all shards: what interleaved rounds hold at once."""
    return sum(2 * num_classes * embedding_dim * (2 if parse_method(m).bf16_storage else 4) for m in methods)


# ---------------------------------------------------------------------------- rounds: order and statistics


def round_order(num_methods: int, round_index: int) -> list[int]:
    """The order (method indices) in which round `round_index` runs one step of each method.

    A balanced Latin square (Williams design): row k is 0, 1, M-1, 2, M-2, ... shifted by k,
    so the first method rotates through all of them; for odd M the mirrored rows follow. Over a
    full period (M rounds, 2M for odd M) every method holds every position equally often and
    follows every other method equally often, so neither a position in the round nor the method
    run just before favours one of them. A function of the round index alone: every rank
    derives the same order.
    """
    if num_methods < 1 or round_index < 0:
        raise ValueError(f"need num_methods >= 1 and round_index >= 0, got {num_methods} and {round_index}")
    base = [0] + [(j + 1) // 2 if j % 2 else num_methods - j // 2 for j in range(1, num_methods)]
    period = num_methods if num_methods % 2 == 0 else 2 * num_methods
    row = round_index % period
    order = [(b + row) % num_methods for b in base]
    if row >= num_methods:  # odd M: the mirrored half
        order = [(b + row - num_methods) % num_methods for b in base][::-1]
    return order


def quartiles(values) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linear interpolation between order statistics."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q1), float(median), float(q3)


def bootstrap_median_interval(values, level: float = INTERVAL_LEVEL, resamples: int = 5000,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of `values` (rounds resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return float(low), float(high)


def round_ratios(numerator_step_ms, denominator_step_ms) -> list[float]:
    """images/s of the numerator over images/s of the denominator, round by round (same batch,
    so the denominator's step time over the numerator's)."""
    if len(numerator_step_ms) != len(denominator_step_ms):
        raise ValueError(f"the two methods have {len(numerator_step_ms)} and {len(denominator_step_ms)} rounds; "
                         "a per-round ratio needs them timed in the same rounds")
    return [d / n for n, d in zip(numerator_step_ms, denominator_step_ms)]


class RatioSummary(NamedTuple):
    median: float  # of the per-round ratios
    q1: float
    q3: float
    low: float  # bootstrap interval of the median at INTERVAL_LEVEL
    high: float
    rounds: int

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 1.0."""
        return self.low > 1.0 or self.high < 1.0

    def verdict(self) -> str:
        return "distinguishable from 1.0" if self.distinguishable else "not distinguishable from 1.0 at this spread"


def summarize_ratios(ratios, seed: int = 0) -> RatioSummary:
    q1, median, q3 = quartiles(ratios)
    low, high = bootstrap_median_interval(ratios, seed=seed)
    return RatioSummary(median, q1, q3, low, high, len(ratios))


# ---------------------------------------------------------------------------- measurement


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
    (valid in a fresh process only, which is how `measure_point` is run for memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


class _MatmulFloor:
    """The three matmuls of a step, cos = E W^T, dE = G W, dW = G^T E, at [rows, columns]; the
    buffers are allocated once at the most columns and viewed contiguously at fewer."""

    def __init__(self, rows: int, max_columns: int, dim: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.embeddings = torch.randn(rows, dim, device=device)
        self.weight = torch.randn(max_columns, dim, device=device)
        self.grad = torch.randn(rows * max_columns, device=device)

    def seconds(self, columns: int) -> float:
        weight = self.weight[:columns]
        grad = self.grad[: self.rows * columns].view(self.rows, columns)
        _sync(self.device)
        start = time.perf_counter()
        self.embeddings @ weight.t()
        grad @ weight
        grad.t() @ self.embeddings
        _sync(self.device)
        return time.perf_counter() - start


def _columns(head: ShardedHead) -> int:
    """Class columns of the head's last step (sampled heads use fewer than they hold)."""
    if isinstance(head, PartialFCHead):
        return head.last_step_columns
    if head.sample_rate < 1.0:
        return head.last_sampled_rows.numel()
    return head.num_local_classes


def _timed_step(head: ShardedHead, optimizer, embeddings: torch.Tensor, labels: torch.Tensor,
                device: torch.device) -> float:
    """Seconds of one training step of the head: forward, backward, optimizer step; its
    collectives are left in `comm.stats`."""
    comm.stats.reset()
    _sync(device)
    start = time.perf_counter()
    head(embeddings, labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    embeddings.grad = None
    _sync(device)
    return time.perf_counter() - start


def time_rounds(heads: dict[str, ShardedHead], settings: BenchSettings, device: torch.device, *,
                barrier: bool = True, floors: bool = True) -> dict:
    """Time `settings.warmup` + `settings.steps` interleaved rounds of every head in `heads`.

    Each round runs one step (forward, backward, SGD with momentum as training does) of every
    method in `round_order`, all on the same labels; with `barrier`, every step (and its
    matmul floor) starts behind a barrier, so the ranks time the same step of the same method.
    With `floors`, the step's three matmuls at its shapes are timed right after it (once a round
    for the methods over all classes, whose shapes are the same).
    Returns {"schedule": [(round, method), ...] of the timed steps, "methods": {method: {
    "step_s", "floor_s", "comm_s": per timed round (the slowest rank's), "comm": the last
    step's collectives, "largest_all_reduce": bytes}}}.
    """
    methods = list(heads)
    group = heads[methods[0]].process_group
    rank, world = comm.rank_and_world(group)
    generator = torch.Generator().manual_seed(1234 + rank)
    embeddings = torch.randn(settings.batch_per_rank, settings.embedding_dim, generator=generator)
    embeddings = embeddings.to(device).requires_grad_(True)
    label_batches = [torch.randint(0, settings.num_classes, (settings.batch_per_rank,), generator=generator).to(device)
                     for _ in range(4)]
    # what training uses: SGD with momentum (row-sparse when sampled, in the forward for _fstep)
    optimizers = {m: make_head_sgd(h, h.parameters(), lr=0.01, momentum=0.9, fused_step=parse_method(m).fused_step)
                  for m, h in heads.items()}
    floor = None
    if floors:
        floor = _MatmulFloor(world * settings.batch_per_rank, max(h.num_local_classes for h in heads.values()),
                             settings.embedding_dim, device)
    times = torch.zeros(settings.steps, len(methods), 3, dtype=torch.float64)  # step, floor, comm seconds
    last_comm, largest, schedule = {}, dict.fromkeys(methods, 0), []
    for round_index in range(settings.warmup + settings.steps):
        timed = round_index - settings.warmup
        labels = label_batches[round_index % len(label_batches)]
        round_floors: dict[str, float] = {}
        for index in round_order(len(methods), round_index):
            method = methods[index]
            if barrier:
                comm.barrier(group)
            step_s = _timed_step(heads[method], optimizers[method], embeddings, labels, device)
            step_comm, step_log = comm.stats.snapshot(), list(comm.stats.log)
            # the methods over all classes share their floor's shapes: timed once a round, after the first
            # of them; a key that is the same on every rank, so that all ranks meet at the same barriers
            floor_key = method if parse_method(method).sample_rate < 1.0 else "all classes"
            if floor is not None and floor_key not in round_floors:
                if barrier:
                    comm.barrier(group)
                round_floors[floor_key] = floor.seconds(_columns(heads[method]))
            floor_s = round_floors.get(floor_key, 0.0)
            if timed < 0:
                continue
            comm_s = sum(kind["seconds"] for kind in step_comm.values())
            times[timed, index] = torch.tensor([step_s, floor_s, comm_s], dtype=torch.float64)
            last_comm[method] = step_comm
            largest[method] = max([largest[method]] + [n for kind, n in step_log if kind == "all_reduce"])
            schedule.append((timed, method))
    if world > 1:  # the slowest rank sets the pace of every step: keep the largest time per round
        times = comm.all_gather_variable(times.reshape(1, -1).to(device), group).max(dim=0).values
        times = times.cpu().reshape(settings.steps, len(methods), 3)
    return {"schedule": schedule, "methods": {
        m: {"step_s": times[:, i, 0].tolist(), "floor_s": times[:, i, 1].tolist(), "comm_s": times[:, i, 2].tolist(),
            "comm": last_comm[m], "largest_all_reduce": largest[m]}
        for i, m in enumerate(methods)}}


def _measured_point(method: str, world: int, settings: BenchSettings, device: torch.device, timed: dict,
                    peak_bytes: float | None) -> dict:
    last = timed["comm"]
    return _point(
        method, world, "measured", settings, device, round_step_s=timed["step_s"], round_floor_s=timed["floor_s"],
        peak_bytes=peak_bytes, comm_calls=sum(int(k["calls"]) for k in last.values()),
        comm_bytes=sum(int(k["bytes"]) for k in last.values()), comm_s=statistics.median(timed["comm_s"]),
        all_reduce_calls=int(last.get("all_reduce", {}).get("calls", 0)),
        largest_all_reduce=timed["largest_all_reduce"],
    )


def measure_world(methods: list[str], settings: BenchSettings, device: torch.device) -> dict:
    """Every method at this world size in interleaved rounds; every rank of the default group calls this.

    Peak memory: on CUDA each method is first measured alone (`measure_point`, exact within one
    process); on CPU the points' peak stays None, as only a fresh process measures its own RSS.
    Returns {"points": one per method, "collectives": the collectives `time_collectives` timed
    afterwards (W > 1), for `fit_link`, "schedule": the timed steps in order}.
    """
    _, world = comm.rank_and_world()
    if device.type == "cpu":
        torch.set_num_threads(settings.threads_per_rank)
    peaks = {}
    if device.type == "cuda":
        memory_settings = replace(settings, warmup=1, steps=1)
        peaks = {m: measure_point(m, memory_settings, device)["peak_mem_mib"] * 2**20 for m in methods}
    heads = {method: make_head(method, settings).to(device) for method in methods}
    timed = time_rounds(heads, settings, device)
    points = [_measured_point(m, world, settings, device, timed["methods"][m], peaks.get(m)) for m in methods]
    del heads
    samples = time_collectives(device) if world > 1 else []
    return {"points": points, "collectives": samples, "schedule": timed["schedule"]}


def measure_point(method: str, settings: BenchSettings, device: torch.device) -> dict:
    """One method alone at this world size, with its peak memory per rank; every rank calls this.

    Run in fresh processes on CPU (the peak RSS is the process's own since it started). The
    matmul floors are timed after the steps and the memory reading, so their buffers stay out
    of the peak; the head efficiency pairs step i with floor run i.
    """
    _, world = comm.rank_and_world()
    if device.type == "cpu":
        torch.set_num_threads(settings.threads_per_rank)
    baseline = _reset_peak_memory(device)
    head = make_head(method, settings).to(device)
    timed = time_rounds({method: head}, settings, device, floors=False)["methods"][method]
    peak = float(_peak_memory(device, baseline))
    columns = _columns(head)
    floor = _MatmulFloor(world * settings.batch_per_rank, columns, settings.embedding_dim, device)
    floor.seconds(columns)  # warm-up
    floor_s = torch.tensor([floor.seconds(columns) for _ in range(settings.steps)], dtype=torch.float64)
    floor_s = comm.all_gather_variable(floor_s.reshape(1, -1).to(device)).max(dim=0).values.tolist()
    peak = comm.all_gather_variable(torch.tensor([[peak]], dtype=torch.float64, device=device)).max().item()
    return _measured_point(method, world, settings, device, dict(timed, floor_s=floor_s), peak)


# collective sizes `time_collectives` times: 4 B to 4 MiB, every factor of 16
PROBE_BYTES = tuple(4 * 16**k for k in range(6))


def time_collectives(device: torch.device, sizes: tuple[int, ...] = PROBE_BYTES, repeats: int = 5) -> list[dict]:
    """Time all-reduces and all-gathers of each size through `sf2dist.comm` (each behind a barrier);
    returns one {"kind", "bytes", "world", "seconds"} per size and kind: the median of `repeats`."""
    _, world = comm.rank_and_world()
    samples, synced = [], comm.stats.sync_cuda_for_timing
    comm.stats.sync_cuda_for_timing = True  # a CUDA collective's time, not its launch's
    for nbytes in sizes:
        for kind in ("all_reduce", "all_gather"):
            numel = max(1, nbytes // 4 // (world if kind == "all_gather" else 1))
            tensor = torch.ones(numel, device=device)
            seconds, recorded = [], 0
            for _ in range(repeats + 1):
                comm.barrier()
                comm.stats.reset()
                if kind == "all_reduce":
                    comm.all_reduce(tensor)
                else:
                    comm.all_gather(tensor, [numel] * world)
                record = comm.stats.snapshot()[kind]
                seconds.append(record["seconds"])
                recorded = int(record["bytes"])
            samples.append({"kind": kind, "bytes": recorded, "world": world,
                            "seconds": statistics.median(seconds[1:])})
    comm.stats.sync_cuda_for_timing = synced
    # every rank timed its own calls; the slowest rank's figure is what a step waits for
    local = torch.tensor([[s["seconds"] for s in samples]], dtype=torch.float64, device=device)
    for sample, seconds in zip(samples, comm.all_gather_variable(local).max(dim=0).values.tolist()):
        sample["seconds"] = seconds
    return samples


def _point(method, world, kind, settings, device, *, round_step_s, round_floor_s, peak_bytes, comm_calls,
           comm_bytes, comm_s, all_reduce_calls, largest_all_reduce) -> dict:
    start, stop = class_range(settings.num_classes, 0, world)
    backend = "none" if world == 1 else ("nccl" if device.type == "cuda" else "gloo")
    point = {
        "method": method, "world_size": world, "kind": kind, "device": _device_name(device),
        "backend": backend if kind == "measured" else "model", "num_classes": settings.num_classes,
        "classes_per_rank": stop - start, "batch_per_rank": settings.batch_per_rank,
        "global_batch": world * settings.batch_per_rank, "embedding_dim": settings.embedding_dim,
        "scaling_efficiency": None, "peak_mem_mib": None if peak_bytes is None else peak_bytes / 2**20,
        "comm_calls": comm_calls, "comm_mib": comm_bytes / 2**20, "comm_ms": 1e3 * comm_s,
        "all_reduce_calls": all_reduce_calls, "largest_all_reduce_bytes": largest_all_reduce,
        "round_step_ms": [1e3 * s for s in round_step_s], "round_floor_ms": [1e3 * s for s in round_floor_s],
    }
    return summarize_point(point)


def summarize_point(point: dict) -> dict:
    """Fill a point's summary columns from its per-round step and floor times (in place; returns it)."""
    q1, median, q3 = quartiles(point["round_step_ms"])
    point.update(rounds=len(point["round_step_ms"]), step_ms=median, step_ms_q1=q1, step_ms_q3=q3,
                 images_per_s=1e3 * point["global_batch"] / median,
                 matmul_ms=statistics.median(point["round_floor_ms"]),
                 head_efficiency=statistics.median(s / f for s, f in zip(point["round_step_ms"], point["round_floor_ms"])))
    return point


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} thread(s)"


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """One point per (method, world size, kind) with the rounds of every run pooled (in run order,
    so per-round pairs between methods stay paired); memory and collectives from the first run."""
    merged: dict[tuple, dict] = {}
    for points in runs:
        for p in points:
            key = (p["method"], p["world_size"], p["kind"])
            if key not in merged:
                merged[key] = dict(p, round_step_ms=list(p["round_step_ms"]), round_floor_ms=list(p["round_floor_ms"]))
            else:
                merged[key]["round_step_ms"] += p["round_step_ms"]
                merged[key]["round_floor_ms"] += p["round_floor_ms"]
    return [summarize_point(p) for p in merged.values()]


# ---------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Link:
    """Per-rank link of a ring collective: bandwidth in GB/s (one direction), latency per hop in microseconds."""

    bandwidth_gbs: float
    latency_us: float

    def seconds(self, kind: str, nbytes: int, world: int) -> float:
        """Ring algorithm time: all-gather/reduce-scatter move (W-1)/W of the full buffer once,
        an all-reduce twice; each of the W-1 (or 2(W-1)) hops pays the latency."""
        if world == 1:
            return 0.0
        hops = _hops(kind, world)
        return hops * self.latency_us * 1e-6 + hops / world * nbytes / (self.bandwidth_gbs * 1e9)


def _hops(kind: str, world: int) -> int:
    return 2 * (world - 1) if kind == "all_reduce" else world - 1


class LinkPreset(NamedTuple):
    link: Link
    source: str
    gpu: bool  # a GPU cluster's link: projecting over it from compute timed on a CPU is refused


# Nominal figures from vendor specifications, not measurements: bandwidth is the line rate in one
# direction per rank (real collectives reach less), latency an assumed round figure per ring hop
# (no specification states one for a collective).
LINK_PRESETS = {
    "h100-nvlink": LinkPreset(Link(450.0, 2.0), "H100 SXM NVLink 4: 900 GB/s per GPU counting both directions "
                                                "(NVIDIA H100 datasheet), so 450 GB/s each way", gpu=True),
    "a100-nvlink": LinkPreset(Link(300.0, 2.0), "A100 SXM NVLink 3: 600 GB/s per GPU counting both directions "
                                                "(NVIDIA A100 datasheet), so 300 GB/s each way", gpu=True),
    "ib-hdr": LinkPreset(Link(25.0, 5.0), "InfiniBand HDR: 200 Gb/s per port, one port per GPU as in a DGX A100",
                         gpu=True),
    "ib-ndr": LinkPreset(Link(50.0, 5.0), "InfiniBand NDR: 400 Gb/s per port, one port per GPU as in a DGX H100",
                         gpu=True),
    "ethernet-100g": LinkPreset(Link(12.5, 20.0), "100 Gb Ethernet line rate, one port per rank, through a TCP stack "
                                                  "(hence the higher latency)", gpu=False),
}
MEASURED = "measured"  # the preset fitted to the collectives timed in the same run


def preset_help() -> str:
    """The presets, their numbers and sources, for --help."""
    lines = [f"{name}: {p.link.bandwidth_gbs:g} GB/s, {p.link.latency_us:g} us ({p.source})"
             for name, p in LINK_PRESETS.items()]
    return "; ".join(lines) + (f"; {MEASURED}: latency and bandwidth fitted by least squares to the all-reduces and "
                               "all-gathers this run timed at each measured world size above 1")


FORCE_FLAG = "--force-project"


def projection_kind(intra: str | None, inter: str | None, compute_device: torch.device, force: bool = False) -> str:
    """The kind of the projected points, given the link presets named (`intra`, `inter`; None where
    numbers were given instead) and the device the per-rank compute is timed on.

    A GPU link preset (NVLink, InfiniBand: `LinkPreset.gpu`) over compute timed on a CPU would give
    a GPU cluster's images/s from CPU step times, which is neither this machine's scaling nor a GPU
    cluster's: refused with a ValueError unless `force`, and then `KIND_PROJECTED_CPU`.
    """
    gpu = [f"--{which} {name}" for which, name in (("intra", intra), ("inter", inter))
           if name in LINK_PRESETS and LINK_PRESETS[name].gpu]
    if not gpu or compute_device.type == "cuda":
        return KIND_PROJECTED
    if force:
        return KIND_PROJECTED_CPU
    cpu_links = ", ".join([MEASURED, *(n for n, p in LINK_PRESETS.items() if not p.gpu)])
    raise ValueError(
        f"--project with {' and '.join(gpu)}: a GPU link preset over per-rank compute timed on this machine's "
        f"{compute_device.type.upper()} would print a GPU cluster's images/s made of CPU step times, figures of "
        f"neither this machine nor a GPU cluster. Project on GPUs (--device cuda), or model a CPU "
        f"cluster's link ({cpu_links}, or --intra-gbs/--intra-latency-us and --inter-gbs/--inter-latency-us); "
        f"{FORCE_FLAG} writes the rows anyway, labelled \"{KIND_PROJECTED_CPU}\"")


def resolve_link(which: str, preset: str | None, bandwidth_gbs: float | None, latency_us: float | None,
                 measured: Link | None = None) -> tuple[Link, str]:
    """The link for one side of the projection (`which`: "intra" or "inter") and where its numbers came from.

    A preset gives both numbers; `bandwidth_gbs` / `latency_us` (when given) replace its figure.
    Without a preset both numbers are needed. `measured` is the link fitted to this run's collectives.
    """
    if preset is None:
        if bandwidth_gbs is None or latency_us is None:
            raise ValueError(f"--project needs the {which}-node link: --{which} with a preset "
                             f"({', '.join([*LINK_PRESETS, MEASURED])}) or both --{which}-gbs and --{which}-latency-us")
        base, source = Link(bandwidth_gbs, latency_us), "given on the command line"
    elif preset == MEASURED:
        if measured is None:
            raise ValueError(f"--{which} {MEASURED}: this run timed no collectives to fit a link to; "
                             "measure a world size above 1 (--world-sizes 1,2) or name a preset")
        base, source = measured, "fitted to the collectives timed in this run"
    elif preset in LINK_PRESETS:
        base, source = LINK_PRESETS[preset].link, f"preset {preset}, nominal: {LINK_PRESETS[preset].source}"
    else:
        raise ValueError(f"--{which} {preset!r}: unknown link preset; expected one of "
                         f"{', '.join([*LINK_PRESETS, MEASURED])}")
    link = Link(base.bandwidth_gbs if bandwidth_gbs is None else bandwidth_gbs,
                base.latency_us if latency_us is None else latency_us)
    if link.bandwidth_gbs <= 0 or link.latency_us < 0:
        raise ValueError(f"--{which}: need bandwidth > 0 GB/s and latency >= 0 us, got {link}")
    if preset is not None and link != base:
        source += " (overridden on the command line)"
    return link, source


def fit_link(samples: list[dict]) -> Link:
    """Latency and bandwidth of the ring model (`Link.seconds`) fitted to timed collectives.

    `samples`: {"kind", "bytes", "world", "seconds"} each, as `time_collectives` returns them.
    Least squares on the relative error (the sizes span orders of magnitude), with both
    parameters kept non-negative; a clear error when the samples cannot determine them.
    """
    usable = [s for s in samples if s["world"] > 1]
    sizes = {s["bytes"] for s in usable}
    if len(sizes) < 2:
        raise ValueError(f"fitting a link needs collectives of at least 2 distinct sizes at a world size above 1; "
                         f"this run timed {len(sizes)} ({len(samples)} collectives in all)")
    per_hop = {n: statistics.median(s["seconds"] / _hops(s["kind"], s["world"]) for s in usable if s["bytes"] == n)
               for n in (min(sizes), max(sizes))}
    if per_hop[max(sizes)] <= per_hop[min(sizes)]:
        raise ValueError(f"fitting a link: the timed collectives do not take longer as they grow ({min(sizes)} B: "
                         f"{1e6 * per_hop[min(sizes)]:.1f} us per hop, {max(sizes)} B: {1e6 * per_hop[max(sizes)]:.1f} "
                         "us), so no bandwidth can be fitted; name a preset instead")
    hops = np.array([_hops(s["kind"], s["world"]) for s in usable], dtype=np.float64)
    design = np.stack([hops * 1e-6, hops / np.array([s["world"] for s in usable]) *
                       np.array([s["bytes"] for s in usable], dtype=np.float64) * 1e-9], axis=1)
    seconds = np.array([s["seconds"] for s in usable], dtype=np.float64)
    weighted, target = design / seconds[:, None], np.ones_like(seconds)  # relative residuals
    latency_us, inverse_gbs = np.linalg.lstsq(weighted, target, rcond=None)[0]
    if latency_us < 0:  # latency too small to see at these sizes: bandwidth alone
        latency_us = 0.0
        inverse_gbs = float(np.linalg.lstsq(weighted[:, 1:], target, rcond=None)[0][0])
    if inverse_gbs <= 0:
        raise ValueError(f"fitting a link: no positive bandwidth fits the timed collectives (sizes {sorted(sizes)} "
                         "bytes); name a preset instead")
    return Link(1.0 / float(inverse_gbs), float(latency_us))


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


def measure_compute_rounds(methods: list[str], settings: BenchSettings, world: int,
                           device: torch.device) -> dict[str, dict]:
    """One rank's compute at world size `world`, in this single process, every method in
    interleaved rounds: heads holding the C/W classes of rank 0 and a gathered batch of
    W * batch_per_rank rows, no communication. {method: {"step_s": [...], "floor_s": [...]}} per round."""
    start, stop = class_range(settings.num_classes, 0, world)
    local = BenchSettings(stop - start, settings.embedding_dim, world * settings.batch_per_rank,
                          settings.warmup, settings.steps, settings.threads_per_rank, settings.compile_elementwise)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads_per_rank)
    heads = {}
    for method in methods:
        heads[method] = make_head(method, local).to(device)
        if isinstance(heads[method], PartialFCHead):  # sample as the W-rank shard would: its rate of its classes
            heads[method].num_sample = max(1, int(heads[method].sample_rate * (stop - start)))
    timed = time_rounds(heads, local, device, barrier=False)["methods"]
    return {m: {"step_s": timed[m]["step_s"], "floor_s": timed[m]["floor_s"]} for m in methods}


def measure_compute(method: str, settings: BenchSettings, world: int, device: torch.device) -> dict:
    """`measure_compute_rounds` for one method: median step and floor seconds."""
    rounds = measure_compute_rounds([method], settings, world, device)[method]
    return {"step_s": statistics.median(rounds["step_s"]), "floor_s": statistics.median(rounds["floor_s"])}


def project(method: str, settings: BenchSettings, world: int, compute: dict, intra: Link, inter: Link,
            ranks_per_node: int, kind: str = KIND_PROJECTED) -> dict:
    """A projected point: per-rank compute measured per round (`measure_compute_rounds`) plus the
    modelled collectives of one step; `kind` as `projection_kind` gives it."""
    link = intra if world <= ranks_per_node else inter
    calls = step_collectives(method, world, settings.batch_per_rank, settings.embedding_dim)
    comm_s = sum(link.seconds(kind, nbytes, world) for kind, nbytes in calls)
    all_reduces = [n for kind, n in calls if kind == "all_reduce"]
    return _point(
        method, world, kind, settings, torch.device("cpu"),
        round_step_s=[s + comm_s for s in compute["step_s"]], round_floor_s=compute["floor_s"], peak_bytes=None,
        comm_calls=len(calls), comm_bytes=sum(n for _, n in calls), comm_s=comm_s,
        all_reduce_calls=len(all_reduces), largest_all_reduce=max(all_reduces, default=0),
    )


def projection_check(points: list[dict], world: int = 2) -> list[dict]:
    """Does the projection of a world size that was also measured land within the measured spread?

    Per method with both a measured and a projected point at `world`: the projected median step
    time against the measured rounds' interquartile range.
    """
    by_key = {(p["method"], p["world_size"], p["kind"]): p for p in points}
    checks = []
    for (method, w, kind), projected in by_key.items():
        measured = by_key.get((method, w, KIND_MEASURED))
        if kind == KIND_MEASURED or w != world or measured is None:
            continue
        checks.append({
            "method": method, "world_size": world, "kind": kind, "projected_ms": projected["step_ms"],
            "measured_ms": measured["step_ms"], "measured_q1": measured["step_ms_q1"],
            "measured_q3": measured["step_ms_q3"],
            "inside": measured["step_ms_q1"] <= projected["step_ms"] <= measured["step_ms_q3"],
            "error": projected["step_ms"] / measured["step_ms"] - 1.0,
        })
    return checks


# ---------------------------------------------------------------------------- outputs


def add_scaling_efficiency(points: list[dict]) -> None:
    """images/s at W over W times images/s at W=1, for the same method and kind of point (the
    table's "speed-up ÷ W"; None without a W=1 point)."""
    single = {(p["method"], p["kind"]): p["images_per_s"] for p in points if p["world_size"] == 1}
    for p in points:
        base = single.get((p["method"], p["kind"]))
        p["scaling_efficiency"] = None if base is None else p["images_per_s"] / (p["world_size"] * base)


def write_outputs(points: list[dict], out_dir: Path, settings: BenchSettings, note: str,
                  extra: dict | None = None) -> dict[str, Path]:
    """CSV (summary columns), JSON (the points with their rounds, and `extra`) and PNG; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_scaling_efficiency(points)
    paths = {"csv": out_dir / "scaling.csv", "json": out_dir / "scaling.json", "png": out_dir / "scaling.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    paths["json"].write_text(json.dumps({"settings": asdict(settings), "note": note, "points": points,
                                         **(extra or {})}, indent=1))
    plot(points, paths["png"], settings)
    return paths


def plot(points: list[dict], path: Path, settings: BenchSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for method in dict.fromkeys(p["method"] for p in points):
        for kind, style in ((KIND_MEASURED, "-o"), (KIND_PROJECTED, "--s"), (KIND_PROJECTED_CPU, ":^")):
            series = sorted((p["world_size"], p["images_per_s"], p["global_batch"] * 1e3 / p["step_ms_q3"],
                             p["global_batch"] * 1e3 / p["step_ms_q1"])
                            for p in points if p["method"] == method and p["kind"] == kind)
            if not series:
                continue
            sizes, ips, low, high = (np.array(v) for v in zip(*series))
            line = ax.errorbar(sizes, ips, yerr=[ips - low, high - ips], fmt=style, capsize=3, markersize=4,
                               label=f"{method} ({kind})", color=colors.get(method))
            colors.setdefault(method, line.lines[0].get_color())
        base = next((p["images_per_s"] for p in points if p["method"] == method and p["world_size"] == 1), None)
        if base is not None:
            sizes = sorted({p["world_size"] for p in points})
            ax.plot(sizes, [base * w for w in sizes], ":", color=colors.get(method), alpha=0.6, label=f"{method} ideal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("images / s (classifier layer)")
    ax.set_title(f"{settings.num_classes:,} identities, {settings.embedding_dim}-d, {settings.batch_per_rank} images/rank; "
                 "median and IQR over rounds", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The scaling table's columns with their definitions: `markdown_table` writes the headers,
# `table_legend` the definitions under the table, so the docs say what every column is.
TABLE_COLUMNS = (
    ("method", "the head and how it is stepped (`parse_method`): sphereface2 is SphereFace2 over all classes with "
               "the SGD step after the backward, _fstep with the step fused into the forward (`head.step: fused`); "
               "softmax is the sharded softmax with the CosFace margin, sphereface the same with the SphereFace "
               "margin; partial_fc_<rate> and sphereface2_<rate> sample that fraction of each rank's classes."),
    ("W", "world size: ranks, each one GPU or one CPU thread (the note above says which)."),
    ("kind", f"{KIND_MEASURED}: timed with W ranks. {KIND_PROJECTED}: not measured at this W; one rank's compute "
             "timed in one process at this W's shapes (C/W classes, a gathered batch of W x images per rank) plus "
             "the collectives' time from the link model named in the note."),
    ("classes/rank", "C/W, the classes rank 0 holds."),
    ("step ms, median (IQR)", "one training step of the head (forward, backward, SGD with momentum) as the slowest "
                              "rank timed it; the median and interquartile range over the timed rounds."),
    ("images/s", "the global batch (W x images per rank) over the median step time; higher is better."),
    ("speed-up ÷ W", "images/s at this W over images/s of the same method and kind at W=1, divided by W; 1.00 is "
                     "linear scaling, higher is better, – without a W=1 row. Not bounded by 1.00: each rank's "
                     "matmuls stay the same size (C/W classes x W x images per rank), but the work proportional to "
                     "a rank's classes alone (the SGD step over its [C/W, D] weights and momentum, class sampling, "
                     "the weights' memory traffic) shrinks with W, so a rank can step faster than at W=1."),
    ("step time ÷ matmul time", "the step time over the time of the step's three matrix multiplies alone "
                                "(cos = E W^T, dE = G W, dW = G^T E) at the same shapes, timed in the same round "
                                "(for sampled methods at the sampled classes); the median over rounds. 1.00: the "
                                "step costs only its matmuls; lower is better. The softmax heads need a fourth "
                                "matmul (the logits again, after the all-reduced normaliser), so their floor is 4/3 "
                                "of this one. Below 1.00 is timing noise (the two are timed apart). "
                                "`head_efficiency` in scaling.csv."),
    ("peak MiB/rank", "peak memory of a rank running its method alone, measured apart from the rounds (one warm-up "
                      "and one timed step): on CPU the resident memory of a fresh process above what it held "
                      "before, on CUDA the memory torch allocated; – where not measured (projected rows, "
                      "--no-point-memory)."),
    ("collectives/step", "collective calls in one step, as `sf2dist.comm` records them (projected: the calls the "
                         "model counts)."),
    ("comm MiB/step", "bytes those calls carry, as `sf2dist.comm` records them."),
    ("comm ms/step", "time spent in those calls, waiting for the other ranks included, the slowest rank's, median "
                     "over rounds; projected rows: the link model's time, not measured."),
    ("largest all-reduce", "the largest all-reduce of a step: SphereFace2's is the shared bias's gradient (4 B); "
                           "the softmax heads all-reduce [2, W x images per rank] floats."),
)
NOT_MEASURED = ("Not measured by this table: only the classifier layer is timed (random embeddings in, no backbone "
                "forward or backward, no backbone gradient all-reduce, no data loading), so its images/s are not "
                "training throughput; projected rows are a model whose only measured part is one rank's compute.")


def markdown_table(points: list[dict]) -> str:
    """The scaling table, one row per point; `table_legend` defines its columns."""
    lines = ["| " + " | ".join(header for header, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for p in points:
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {p['method']} | {p['world_size']} | {p['kind']} | {p['classes_per_rank']:,} | "
            f"{p['step_ms']:.1f} ({p['step_ms_q1']:.1f}–{p['step_ms_q3']:.1f}) | "
            f"{p['images_per_s']:,.0f} | {fmt(p['scaling_efficiency'], '.2f')} | {p['head_efficiency']:.2f} | "
            f"{fmt(p['peak_mem_mib'], ',.0f')} | {p['comm_calls']} | {p['comm_mib']:.2f} | {p['comm_ms']:.1f} | "
            f"{p['largest_all_reduce_bytes']:,} B |"
        )
    return "\n".join(lines)


def table_legend(points: list[dict]) -> str:
    """What every column of `markdown_table(points)` is, and what the table does not measure."""
    lines = ["Columns:", ""]
    for header, text in TABLE_COLUMNS:
        if header == "kind" and any(p["kind"] == KIND_PROJECTED_CPU for p in points):
            text += (f" {KIND_PROJECTED_CPU}: projected with a GPU link preset over compute timed on a CPU, written "
                     f"only under {FORCE_FLAG}: CPU step times with a GPU cluster's links, the figure of no machine.")
        lines.append(f"- **{header}**: {text}")
    return "\n".join([*lines, "", NOT_MEASURED])


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


MEMORY_COLUMNS = (
    ("method", "as in the scaling table: _fstep steps the rows inside the forward, _bf16 stores them in bfloat16."),
    ("storage", "the dtype of the class rows and their momentum."),
    ("optimizer step", "separate: SGD after the backward, over the [C, D] weight gradient; fused: each chunk's rows "
                       "stepped as the forward forms their gradient."),
    ("classes/rank", "the classes the one rank holds."),
    ("images/step", "the batch of the step."),
    ("weights + momentum MiB", "2 x classes x D x bytes per value: what the head's rows and momentum take, the "
                               "floor of any SGD-with-momentum head."),
    ("peak MiB", "the measured peak during forward, backward and optimizer step, above what the process held "
                 "before the head was built (the section's first paragraph says which memory)."),
    ("peak over weights + momentum", "peak MiB over weights + momentum MiB, minus 1: what the step adds on top of "
                                     "the floor; lower is better."),
    ("identities per GiB of peak", "classes/rank over peak GiB, in millions: how many identities a GiB holds "
                                   "while training; higher is better."),
    ("step ms", "the median time of one step, the method alone (no other head held)."),
)


def memory_table(rows: list[dict]) -> str:
    """The head-memory table; `memory_legend` defines its columns."""
    lines = ["| " + " | ".join(header for header, _ in MEMORY_COLUMNS) + " |", "|" + "---|" * len(MEMORY_COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['storage']} | {r['step']} | {r['classes_per_rank']:,} | {r['global_batch']} | "
            f"{r['state_mib']:,.0f} | {r['peak_mib']:,.0f} | {100 * r['overhead']:+.1f}% | "
            f"{r['identities_per_gib'] / 1e6:.2f}M | {r['step_ms']:,.0f} |")
    return "\n".join(lines)


def memory_legend() -> str:
    return "\n".join(["Columns:", "", *(f"- **{header}**: {text}" for header, text in MEMORY_COLUMNS)])


def throughput_ratios(points: list[dict], numerator: str = "sphereface2",
                      denominator: str = "softmax") -> dict[tuple[int, str], RatioSummary]:
    """{(world_size, kind): images/s of `numerator` over `denominator`, per round, summarised}."""
    by_key = {(p["method"], p["world_size"], p["kind"]): p for p in points}
    return {
        (w, kind): summarize_ratios(round_ratios(p["round_step_ms"], by_key[(denominator, w, kind)]["round_step_ms"]))
        for (method, w, kind), p in sorted(by_key.items(), key=lambda item: (item[0][1], item[0][2]))
        if method == numerator and (denominator, w, kind) in by_key
    }


def run_to_run(runs: list[list[dict]], numerator: str, denominator: str) -> dict[tuple[int, str], list[float]]:
    """{(world_size, kind): the median ratio of each run, in run order} (for `--repeat`)."""
    medians: dict[tuple[int, str], list[float]] = {}
    for points in runs:
        for key, summary in throughput_ratios(points, numerator, denominator).items():
            medians.setdefault(key, []).append(summary.median)
    return medians


def describe_ratio(name: str, world: int, kind: str, summary: RatioSummary, run_medians: list[float] | None = None) -> str:
    """One printed line per ratio: median, IQR, interval, verdict, and the run-to-run spread."""
    line = (f"{name} images/s at W={world} ({kind}): {summary.median:.2f}x, median of {summary.rounds} rounds; "
            f"IQR {summary.q1:.2f}-{summary.q3:.2f}, {100 * INTERVAL_LEVEL:.0f}% interval "
            f"{summary.low:.2f}-{summary.high:.2f}: {summary.verdict()}")
    if run_medians and len(run_medians) > 1:
        line += (f"; run to run ({len(run_medians)} runs): min {min(run_medians):.2f}, "
                 f"median {statistics.median(run_medians):.2f}, max {max(run_medians):.2f}")
    return line
