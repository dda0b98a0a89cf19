"""`launch/scaling_bench.py`: the interleaved round scheduler and its statistics, the link presets
and the fitted link, quick mode end to end on 2 gloo ranks, and the collective model."""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sf2dist.bench import scaling
from sf2dist.bench.scaling import COLUMNS, Link, memory_row, parse_method, step_collectives
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import scaling_bench  # noqa: E402

QUICK = ["--quick", "--methods", "sphereface2,softmax,partial_fc_0.5,sphereface2_0.5", "--memory-classes", "0"]


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ---------------------------------------------------------------------------- the round scheduler


@pytest.mark.parametrize("num_methods", range(1, 8))
def test_round_order_is_a_balanced_latin_square(num_methods):
    period = num_methods if num_methods % 2 == 0 else 2 * num_methods
    rounds = [scaling.round_order(num_methods, r) for r in range(2 * period)]
    for order in rounds:  # every method exactly once per round
        assert sorted(order) == list(range(num_methods))
    assert rounds[:period] == rounds[period:]  # a function of the round index alone
    # the order rotates: over M consecutive rounds each method leads once
    assert sorted(order[0] for order in rounds[:num_methods]) == list(range(num_methods))
    # over a period, every method holds every position equally often ...
    for position in range(num_methods):
        assert Counter(order[position] for order in rounds[:period]) == {m: period // num_methods
                                                                          for m in range(num_methods)}
    # ... and follows every other method equally often
    follows = Counter((a, b) for order in rounds[:period] for a, b in zip(order, order[1:]))
    if num_methods > 1:
        assert set(follows) == set(itertools.permutations(range(num_methods), 2))
        assert len(set(follows.values())) == 1
    with pytest.raises(ValueError, match="num_methods >= 1"):
        scaling.round_order(0, 0)


def _time_tiny_rounds(rank: int, world: int) -> dict:
    settings = scaling.BenchSettings(num_classes=64, embedding_dim=8, batch_per_rank=4, warmup=1, steps=4)
    methods = ["sphereface2", "softmax", "partial_fc_0.5"]
    heads = {m: scaling.make_head(m, settings) for m in methods}
    timed = scaling.time_rounds(heads, settings, torch.device("cpu"))
    return {"schedule": [list(s) for s in timed["schedule"]],
            "step_s": {m: timed["methods"][m]["step_s"] for m in methods},
            "comm_calls": {m: sum(k["calls"] for k in timed["methods"][m]["comm"].values()) for m in methods}}


def test_ranks_time_the_same_steps_in_the_same_order():
    ranks = run_on_ranks(_time_tiny_rounds, 2)
    methods = ["sphereface2", "softmax", "partial_fc_0.5"]
    expected = [[r, methods[i]] for r in range(4) for i in scaling.round_order(3, r + 1)]  # after 1 warm-up round
    assert ranks[0]["schedule"] == ranks[1]["schedule"] == expected
    # each round's figure is the slowest rank's: the same number on both ranks
    assert ranks[0]["step_s"] == ranks[1]["step_s"]
    for m in methods:
        assert len(ranks[0]["step_s"][m]) == 4 and min(ranks[0]["step_s"][m]) > 0
    assert ranks[0]["comm_calls"] == {"sphereface2": 5, "softmax": 6, "partial_fc_0.5": 6}


# ---------------------------------------------------------------------------- ratios and their spread


def test_median_of_per_round_ratios_not_ratio_of_medians():
    sphereface2_ms, softmax_ms = [1.0, 2.0, 3.0], [2.0, 2.0, 6.0]
    ratios = scaling.round_ratios(sphereface2_ms, softmax_ms)  # images/s ratio = softmax ms / sphereface2 ms
    assert ratios == [2.0, 1.0, 2.0]
    assert scaling.summarize_ratios(ratios).median == 2.0  # the ratio of the medians would be 1.0
    with pytest.raises(ValueError, match="same rounds"):
        scaling.round_ratios([1.0, 2.0], [1.0])


def test_quartiles_and_bootstrap_interval_on_known_numbers():
    assert scaling.quartiles(range(1, 12)) == (3.5, 6.0, 8.5)
    # Seven ratios: the bootstrap median falls at or below the smallest with probability
    # P(Binomial(7, 1/7) >= 4) ~ 0.010 and at or below the second with P(Binomial(7, 2/7) >= 4)
    # ~ 0.108, so the 5 % quantile is the second smallest; by symmetry the 95 % one the second largest.
    values = [0.9, 1.05, 1.1, 1.2, 1.3, 1.45, 1.7]
    tail = lambda p: sum(math.comb(7, k) * p**k * (1 - p) ** (7 - k) for k in range(4, 8))  # noqa: E731
    assert tail(1 / 7) < 0.05 < tail(2 / 7)
    low, high = scaling.bootstrap_median_interval(values)
    assert (low, high) == (1.05, 1.45)
    assert scaling.bootstrap_median_interval(values, seed=0) == (low, high)  # seeded: repeatable
    summary = scaling.summarize_ratios(values)
    assert summary == pytest.approx((1.2, 1.075, 1.375, 1.05, 1.45, 7))
    assert summary.distinguishable and summary.verdict() == "distinguishable from 1.0"
    straddling = scaling.summarize_ratios([0.8, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3])
    assert not straddling.distinguishable
    assert straddling.verdict() == "not distinguishable from 1.0 at this spread"
    assert scaling.summarize_ratios([0.7] * 10)[3:5] == (0.7, 0.7)


def _point(method: str, step_ms: list[float], world: int = 2) -> dict:
    return {"method": method, "world_size": world, "kind": "measured", "global_batch": 128 * world,
            "round_step_ms": step_ms, "round_floor_ms": [s / 2 for s in step_ms]}


def test_throughput_ratios_pool_runs_and_show_run_to_run_spread():
    runs = [[_point("sphereface2", [10.0, 10.0, 20.0]), _point("softmax", [12.0, 13.0, 24.0])],
            [_point("sphereface2", [10.0, 10.0, 10.0]), _point("softmax", [15.0, 15.0, 15.0])]]
    merged = scaling.merge_runs(runs)
    sf2 = next(p for p in merged if p["method"] == "sphereface2")
    assert sf2["rounds"] == 6 and sf2["step_ms"] == 10.0 and sf2["head_efficiency"] == 2.0
    assert sf2["images_per_s"] == pytest.approx(256 / 0.010)
    pooled = scaling.throughput_ratios(merged, "sphereface2", "softmax")[(2, "measured")]
    assert pooled.median == pytest.approx(1.4) and pooled.rounds == 6  # of 1.2, 1.3, 1.2, 1.5, 1.5, 1.5
    assert scaling.run_to_run(runs, "sphereface2", "softmax") == {(2, "measured"): [pytest.approx(1.2), 1.5]}
    line = scaling.describe_ratio("SphereFace2 / softmax", 2, "measured", pooled, [1.2, 1.5])
    assert line.startswith("SphereFace2 / softmax images/s at W=2 (measured): 1.40x, median of 6 rounds")
    assert "run to run (2 runs): min 1.20, median 1.35, max 1.50" in line


# ---------------------------------------------------------------------------- links


@pytest.mark.parametrize("name, gbs, latency_us", [
    ("h100-nvlink", 450.0, 2.0), ("a100-nvlink", 300.0, 2.0), ("ib-hdr", 25.0, 5.0), ("ib-ndr", 50.0, 5.0),
    ("ethernet-100g", 12.5, 20.0),
])
def test_each_preset_resolves_to_its_numbers(name, gbs, latency_us):
    link, source = scaling.resolve_link("inter", name, None, None)
    assert link == Link(gbs, latency_us) and "nominal" in source
    assert name in scaling.preset_help() and scaling.LINK_PRESETS[name].source in scaling.preset_help()
    overridden, source = scaling.resolve_link("inter", name, None, 9.0)  # a number replaces the preset's
    assert overridden == Link(gbs, 9.0) and "overridden" in source


def test_link_resolution_rules():
    assert scaling.resolve_link("intra", None, 100.0, 3.0)[0] == Link(100.0, 3.0)  # numbers alone still work
    with pytest.raises(ValueError, match="--project needs the intra-node link"):
        scaling.resolve_link("intra", None, 100.0, None)
    fitted = Link(1.5, 40.0)
    assert scaling.resolve_link("intra", "measured", None, None, fitted) == (fitted, "fitted to the collectives "
                                                                                     "timed in this run")
    with pytest.raises(ValueError, match="timed no collectives"):
        scaling.resolve_link("inter", "measured", None, None, None)
    with pytest.raises(ValueError, match="unknown link preset"):
        scaling.resolve_link("inter", "token-ring", None, None)


def test_measured_preset_fits_a_known_latency_and_bandwidth():
    truth = Link(bandwidth_gbs=3.0, latency_us=40.0)
    rng = np.random.default_rng(7)
    samples = [{"kind": kind, "bytes": nbytes, "world": world,
                "seconds": truth.seconds(kind, nbytes, world) * rng.uniform(0.95, 1.05)}
               for nbytes in scaling.PROBE_BYTES for kind in ("all_reduce", "all_gather") for world in (2, 4)]
    fitted = scaling.fit_link(samples)
    assert fitted.bandwidth_gbs == pytest.approx(3.0, rel=0.1)
    assert fitted.latency_us == pytest.approx(40.0, rel=0.1)
    exact = scaling.fit_link([dict(s, seconds=truth.seconds(s["kind"], s["bytes"], s["world"])) for s in samples])
    assert exact.bandwidth_gbs == pytest.approx(3.0) and exact.latency_us == pytest.approx(40.0)
    with pytest.raises(ValueError, match="at least 2 distinct sizes"):
        scaling.fit_link([s for s in samples if s["bytes"] == 1024])
    with pytest.raises(ValueError, match="do not take longer as they grow"):
        scaling.fit_link([dict(s, seconds=1e-3 / (1 + s["bytes"])) for s in samples])


def test_link_model():
    link = Link(bandwidth_gbs=100.0, latency_us=5.0)
    assert link.seconds("all_gather", 10**9, 1) == 0.0
    assert link.seconds("all_gather", 10**9, 4) == pytest.approx(3 * 5e-6 + 0.75 * 10**9 / 100e9)
    assert link.seconds("all_reduce", 10**9, 4) == pytest.approx(2 * link.seconds("all_gather", 10**9, 4))
    sf2 = [n for kind, n in step_collectives("sphereface2", 64, 128, 512) if kind == "all_reduce"]
    assert sf2 == [4]


def test_projection_check_compares_with_the_measured_iqr():
    measured = scaling.summarize_point(dict(_point("softmax", [9.0, 10.0, 11.0, 12.0]), kind="measured"))
    projected = scaling.summarize_point(dict(_point("softmax", [10.5] * 4), kind="projected"))
    far = scaling.summarize_point(dict(_point("sphereface2", [20.0] * 4), kind="projected"))
    near = scaling.summarize_point(dict(_point("sphereface2", [9.0, 10.0, 11.0, 12.0]), kind="measured"))
    checks = {c["method"]: c for c in scaling.projection_check([measured, projected, far, near])}
    assert checks["softmax"]["inside"] and checks["softmax"]["error"] == pytest.approx(0.0)
    assert not checks["sphereface2"]["inside"] and checks["sphereface2"]["error"] == pytest.approx(20 / 10.5 - 1)


# ---------------------------------------------------------------------------- the command line


def test_help_shows_a_default_for_every_option():
    text = scaling_bench.build_parser().format_help()
    options = text[text.index("options:"):]
    # one block per option: its line "  --name ..." and the indented lines under it
    blocks = re.split(r"\n(?=  -)", options.split("\n", 1)[1])
    assert len(blocks) >= 21
    for block in blocks:
        if not block.lstrip().startswith("-h, --help"):
            assert "default" in block, f"no default stated in: {block}"
    assert "h100-nvlink: 450 GB/s" in text and "ib-ndr: 50 GB/s" in text and "measured:" in text


def test_project_without_a_link_is_refused(capsys):
    with pytest.raises(SystemExit):
        scaling_bench.parse_args(["--project", "--intra", "h100-nvlink"])
    assert "--project needs the inter-node link: --inter with one of" in capsys.readouterr().err
    args = scaling_bench.parse_args(["--project", "--max-world", "64", "--intra", "h100-nvlink", "--inter", "ib-ndr"])
    assert (args.intra, args.inter, args.max_world) == ("h100-nvlink", "ib-ndr", 64)
    assert scaling_bench.parse_args(["--steps", "11", "--warmup", "0"]).rounds == 11  # the old names still work


def _check_outputs(out_dir: Path, world_sizes: set[int], methods: int = 4) -> list[dict]:
    with open(out_dir / "scaling.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "measured"]
    assert tuple(rows[0].keys()) == COLUMNS
    assert {int(r["world_size"]) for r in rows} == world_sizes
    assert (out_dir / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = [p for p in json.loads((out_dir / "scaling.json").read_text())["points"] if p["kind"] == "measured"]
    assert len(points) == len(rows) == methods * len(world_sizes)
    for p in points:
        assert p["step_ms"] > 0 and p["images_per_s"] > 0 and p["rounds"] == len(p["round_step_ms"]) >= 10
        assert p["step_ms_q1"] <= p["step_ms"] <= p["step_ms_q3"]
        assert p["head_efficiency"] > 0 and p["matmul_ms"] > 0
        # what comm.py recorded equals the model the projection uses
        model = step_collectives(p["method"], p["world_size"], p["batch_per_rank"], p["embedding_dim"])
        assert p["comm_calls"] == len(model)
        assert p["comm_mib"] * 2**20 == pytest.approx(sum(n for _, n in model))
    return points


def _legend_defines_every_header(text: str) -> int:
    """Every markdown table in `text` is followed by a "Columns:" legend with a "**header**: ..." line
    for each of its header cells; returns how many tables there were."""
    blocks = text.split("\n\n")
    tables = 0
    for index, block in enumerate(blocks):
        if not (block.startswith("| ") and block.split("\n")[1].startswith("|---")):
            continue
        tables += 1
        legend = next((b for b in blocks[index + 1:index + 3] if b.startswith("- **")), None)
        assert legend is not None and blocks[index + 1] == "Columns:", f"no legend under {block.splitlines()[0]}"
        headers = [cell.strip() for cell in block.split("\n")[0].strip("|").split("|")]
        defined = [line.split("**")[1] for line in legend.splitlines()]
        assert defined == headers, f"the legend defines {defined}, the table has {headers}"
    return tables


def test_every_column_is_defined_in_a_legend():
    point = {"method": "sphereface2", "world_size": 2, "kind": scaling.KIND_MEASURED, "classes_per_rank": 50,
             "step_ms": 2.0, "step_ms_q1": 1.0, "step_ms_q3": 3.0, "images_per_s": 10.0, "scaling_efficiency": 1.2,
             "head_efficiency": 1.5, "peak_mem_mib": None, "comm_calls": 5, "comm_mib": 1.0, "comm_ms": 0.5,
             "largest_all_reduce_bytes": 4}
    legend = scaling.table_legend([point])
    text = scaling.markdown_table([point]) + "\n\n" + legend
    assert _legend_defines_every_header(text) == 1
    assert "| 1.20 | 1.50 |" in text  # speed-up ÷ W, then step time ÷ matmul time
    # the names and definitions say which way is better and why the speed-up can pass 1.00
    assert ("**speed-up ÷ W**: images/s at this W over images/s of the same method and kind at W=1, "
            "divided by W") in legend
    assert "Not bounded by 1.00" in legend and "lower is better" in legend and "Not measured by this table" in legend
    assert scaling.KIND_PROJECTED_CPU not in legend  # explained only where such rows are
    assert f"{scaling.KIND_PROJECTED_CPU}: projected with a GPU link preset" in scaling.table_legend(
        [dict(point, kind=scaling.KIND_PROJECTED_CPU)])
    row = {"method": "sphereface2_fstep_bf16", "classes_per_rank": 1000, "embedding_dim": 8, "global_batch": 16,
           "peak_mem_mib": 1.0, "step_ms": 1.0}
    assert _legend_defines_every_header(scaling.memory_table([memory_row(row)]) + "\n\n" +
                                        scaling.memory_legend()) == 1


def test_the_published_scaling_tables_have_the_headers_and_legends_the_code_writes():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in ("scaling", "head-memory"):
        section = text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
        assert _legend_defines_every_header(section) >= 1
    scaling_section = text.split("<!-- scaling:begin -->")[1]
    assert "| " + " | ".join(h for h, _ in scaling.TABLE_COLUMNS) + " |" in scaling_section
    assert scaling.table_legend([{"kind": scaling.KIND_MEASURED}]) in scaling_section
    assert "| " + " | ".join(h for h, _ in scaling_bench.RATIO_COLUMNS) + " |" in scaling_section
    assert scaling.memory_legend() in text


def test_gpu_link_presets_over_cpu_compute_are_refused_unless_forced():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="--intra h100-nvlink and --inter ib-ndr: a GPU link preset over per-rank "
                                         "compute timed on this machine's CPU"):
        scaling.projection_kind("h100-nvlink", "ib-ndr", cpu)
    assert scaling.projection_kind("h100-nvlink", "ib-ndr", cpu, force=True) == "projected, CPU compute"
    assert scaling.projection_kind("h100-nvlink", "ib-ndr", cuda) == "projected"
    for intra, inter in (("measured", "ethernet-100g"), (None, None), ("ethernet-100g", "measured")):
        assert scaling.projection_kind(intra, inter, cpu) == "projected"  # a CPU cluster's links
    assert {name for name, preset in scaling.LINK_PRESETS.items() if preset.gpu} == {
        "h100-nvlink", "a100-nvlink", "ib-hdr", "ib-ndr"}


def test_project_with_a_gpu_preset_on_cpu_exits_before_measuring(tmp_path):
    proc = subprocess.run([sys.executable, "launch/scaling_bench.py", *QUICK, "--device", "cpu", "--project",
                           "--intra", "a100-nvlink", "--inter", "measured", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not any(tmp_path.iterdir())
    assert "--project with --intra a100-nvlink: a GPU link preset over per-rank compute timed on this machine's CPU" \
           in proc.stderr
    assert '--force-project writes the rows anyway, labelled "projected, CPU compute"' in proc.stderr


def test_quick_mode_on_two_gloo_ranks_repeated_and_projected(tmp_path):
    docs = tmp_path / "benchmarks.md"
    # a GPU preset over CPU compute: only with --force-project, and its rows say so
    out = _run([sys.executable, "launch/scaling_bench.py", *QUICK, "--world-sizes", "2", "--repeat", "2", "--no-point-memory",
                "--project", "--max-world", "4", "--ranks-per-node", "2", "--intra", "h100-nvlink",
                "--inter", "measured", "--force-project", "--out-dir", str(tmp_path), "--docs", str(docs)], ROOT)
    line = next(x for x in out.splitlines() if x.startswith("SphereFace2 / softmax images/s at W=2 (measured)"))
    assert "median of 24 rounds; IQR" in line and "90% interval" in line and "run to run (2 runs)" in line
    assert "distinguishable from 1.0" in line
    points = {p["method"]: p for p in _check_outputs(tmp_path, {2})}
    assert all(p["peak_mem_mib"] is None for p in points.values())  # --no-point-memory
    # SphereFace2's only all-reduce is the shared bias's gradient: 4 bytes, whatever the batch
    for method in ("sphereface2", "sphereface2_0.5"):  # sampled or not
        assert points[method]["all_reduce_calls"] == 1
        assert points[method]["largest_all_reduce_bytes"] == 4
    # the softmax head all-reduces row maxima, then row sums with true-class logits: [2, N] floats
    assert points["softmax"]["all_reduce_calls"] == 2
    assert points["softmax"]["largest_all_reduce_bytes"] == 2 * 2 * 16 * 4
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert len(result["runs"]) == 2 and result["collectives"]
    projected = [p for p in result["points"] if p["kind"] != "measured"]
    assert sorted({p["world_size"] for p in projected}) == [1, 2, 4]
    assert {p["kind"] for p in projected} == {"projected, CPU compute"}
    with open(tmp_path / "scaling.csv") as f:
        assert {r["kind"] for r in csv.DictReader(f)} == {"measured", "projected, CPU compute"}
    assert {c["method"] for c in result["projection_check"] if "method" in c} == set(points)
    assert "projection check W=2 sphereface2: projected, CPU compute" in out
    assert "SphereFace2 / softmax images/s at W=4 (projected, CPU compute)" in out
    text = docs.read_text()
    assert "| sphereface2 | 4 | projected, CPU compute | 500 |" in text
    assert "| SphereFace2 / softmax | 4 | projected, CPU compute |" in text
    assert "- **kind**: measured: timed with W ranks." in text
    assert "projected, CPU compute: projected with a GPU" in text
    assert "Forced (--force-project)" in text
    assert _legend_defines_every_header(text.split("<!-- scaling:begin -->")[1]) == 2
    assert "## Classifier-layer scaling" in text and "run to run" in text and "preset h100-nvlink" in text
    assert "fitted to the collectives timed in this run" in text and "Projection check" in text
    assert "distinguishable from 1.0 at this spread" in text.lower()
    assert "Command: `launch/scaling_bench.py --quick" in text
    assert (tmp_path / "scaling.png").exists()


def test_torchrun_points_and_collect(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "launch/scaling_bench.py", *QUICK, "--out-dir", str(tmp_path)], ROOT)
    written = json.loads((tmp_path / "points-w2.json").read_text())
    assert {p["method"] for p in written["points"]} == {"sphereface2", "softmax", "partial_fc_0.5", "sphereface2_0.5"}
    assert len(written["runs"]) == 1 and written["collectives"]
    out = _run([sys.executable, "launch/scaling_bench.py", "--collect", str(tmp_path), "--out-dir", str(tmp_path)], ROOT)
    assert "SphereFace2 / softmax images/s at W=2 (measured)" in out
    _check_outputs(tmp_path, {2})


def test_bad_method_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "launch/scaling_bench.py", "--quick", "--methods", "sphereface3",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown method 'sphereface3'" in proc.stderr


def test_method_names():
    assert parse_method("sphereface2") == ("sphereface2", 1.0, False, False)
    assert parse_method("sphereface2_0.1_fstep") == ("sphereface2", 0.1, True, False)
    assert parse_method("sphereface2_fstep_bf16") == ("sphereface2", 1.0, True, True)
    assert parse_method("partial_fc_0.1") == ("partial_fc", 0.1, False, False)
    for bad in ("softmax_fstep", "sphereface2_bf16", "partial_fc_0.1_fstep", "sphereface2_fstep_fstep"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_memory_row_arithmetic():
    point = {"method": "sphereface2_fstep_bf16", "classes_per_rank": 1_000_000, "embedding_dim": 512,
             "global_batch": 128, "peak_mem_mib": 2048.0, "step_ms": 1.0}
    row = memory_row(point)
    assert row["state_mib"] == pytest.approx(2 * 1_000_000 * 512 * 2 / 2**20)  # bfloat16 weights + momentum
    assert row["identities_per_gib"] == pytest.approx(500_000)
    assert row["overhead"] == pytest.approx(2048.0 / row["state_mib"] - 1)
    assert scaling.head_state_bytes(["sphereface2", "sphereface2_fstep_bf16"], 1000, 8) == 2 * 1000 * 8 * (4 + 2)


def test_head_memory_table(tmp_path):
    docs = tmp_path / "benchmarks.md"
    out = _run([sys.executable, "launch/scaling_bench.py", "--quick", "--world-sizes", "1", "--methods", "sphereface2",
                "--memory-classes", "5000", "--out-dir", str(tmp_path), "--docs", str(docs)], ROOT)
    assert "memory sphereface2_fstep_bf16, 5,000 classes" in out
    # the scaling table's point: its peak measured apart, the method alone in a fresh process
    (point,) = json.loads((tmp_path / "scaling.json").read_text())["points"]
    assert point["peak_mem_mib"] > 0 and "memory sphereface2 W=1: peak" in out
    text = docs.read_text()
    assert "## Head memory at a million local classes" in text
    for method, storage in (("sphereface2", "float32"), ("sphereface2_fstep", "float32"),
                            ("sphereface2_fstep_bf16", "bfloat16")):
        assert f"| {method} | {storage} |" in text


def test_negative_memory_classes_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "launch/scaling_bench.py", "--quick", "--memory-classes", "-5",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--memory-classes must be 0 (skip the table) or a positive class count" in proc.stderr
