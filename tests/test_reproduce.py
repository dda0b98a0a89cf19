"""launch/reproduce.py: selection on validation only (never on the seen pairs), final runs on test,
results.json, tables (mean ± std from known per-run numbers), training curves and the convergence
table, plots, docs sections, resume, failures, profiles; and one real tiny training and test
evaluation through the command line."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from sf2dist.reproduce import PlanError, Reproduction, build_experiments, load_plan, report
from sf2dist.reproduce.plan import run_spec
from sf2dist.reproduce.runner import CURVE_POINTS, SubprocessExecutor, choose, read_curve, seen_score, thin, val_score

ROOT = Path(__file__).resolve().parents[1]

# Test-set numbers per (head type, seed): SphereFace2 82.00 ± 2.83 %, CosFace 70.50 ± 0.71 %.
TEST_ACCURACY = {("sphereface2", 0): 0.80, ("sphereface2", 1): 0.84, ("partial_fc", 0): 0.70, ("partial_fc", 1): 0.71}
TEST_FOLD_STD = {0: 0.02, 1: 0.04}
TEST_TAR_1E4 = {("sphereface2", 0): 0.5, ("sphereface2", 1): 0.6, ("partial_fc", 0): 0.3, ("partial_fc", 1): 0.3}


class FakeTraining:
    """Stands in for launch/train.py and sf2dist-eval: metrics are functions of the setting and seed.

    Validation prefers SphereFace2 with m 0.2 and CosFace with m 0.1, the seen pairs the other
    point (so a choice that read them would differ); the test numbers are the tables above. Every
    call is recorded; `fail` names runs whose training fails once.
    """

    def __init__(self, plan, fail: tuple[str, ...] = ()):
        self.plan, self.fail, self.calls = plan, set(fail), []

    def head_type(self, settings: dict) -> str:
        return settings.get("head.type", self.plan.base["head"]["type"])

    def __call__(self, task, run_dir: Path, slot: int) -> dict:
        settings, seed = task.run.settings, task.run.seed
        self.calls.append(task)
        run_dir.mkdir(parents=True, exist_ok=True)
        fields: dict = {"run_dir": str(run_dir)}
        if task.train:
            if task.run.id in self.fail:
                self.fail.discard(task.run.id)
                return {**fields, "train": {"status": "failed", "error": "simulated crash"}}
            (run_dir / "status.json").write_text(json.dumps({"state": "finished", "step": 3}))
            m = settings.get("head.m", self.plan.base["head"]["m"])
            score = 0.6 + m if self.head_type(settings) == "sphereface2" else 0.9 - m
            fields["train"] = {"status": "finished", "seconds": 2.0}
            fields["val"] = {"val": {"accuracy": score, "accuracy_std": 0.01}}
            fields["seen"] = {"seen": {"accuracy": 1.5 - score, "accuracy_std": 0.01}}
            fields["curve"] = {"loss": [[1, 2.0], [2, 1.5], [3, 1.0 + seed]],
                               "eval": {"val": [[3, score]], "seen": [[3, 1.5 - score]]}}
        if task.test:
            key = (self.head_type(settings), seed)
            fields["test"] = {
                "test": {"kind": "pairs", "accuracy": TEST_ACCURACY[key], "accuracy_std": TEST_FOLD_STD[seed],
                         "tar_at_far": {"1e-03": 0.9}},
                "test_templates": {"kind": "ijb", "tar_at_far": {"1e-03": 0.8, "1e-04": TEST_TAR_1E4[key],
                                                                 "1e-05": None}},
            }
            fields["test_eval"] = {"status": "finished", "seconds": 1.0}
        return fields


@pytest.fixture
def plan(tmp_path):
    return load_plan("tiny", data_root=str(tmp_path / "data"))


def reproduction(plan, out: Path, **fake_options) -> tuple[Reproduction, FakeTraining]:
    fake = FakeTraining(plan, **fake_options)
    return Reproduction(plan, build_experiments(plan, num_classes=8), out, execute=fake, log=lambda _: None), fake


def test_hyper_parameters_are_chosen_on_validation_and_only_final_runs_see_the_test_set(plan, tmp_path):
    repro, fake = reproduction(plan, tmp_path / "out")
    outcome = repro.run("losses")
    assert not outcome.failed and not outcome.undecided
    rows = repro.store.data["rows"]
    assert rows["losses/sphereface2-C"]["setting"]["head.m"] == 0.2  # validation 0.8 against 0.7
    assert rows["losses/cosface"]["setting"]["head.m"] == 0.1  # validation 0.8 against 0.7
    final = {run for row in rows.values() for run in row["final_runs"]}
    candidates = [c["run"] for row in rows.values() for c in row["candidates"]]
    assert len(candidates) == 4 and len(final) == 4  # 2 losses x 2 points; 2 losses x 2 seeds
    tested = [task.run.id for task in fake.calls if task.test]
    assert sorted(tested) == sorted(final)  # never a candidate that was not chosen
    for key, row in rows.items():  # a row's test evaluations come after all of its selection runs
        selection = [c["run"] for c in row["candidates"]]
        last_selection = max(i for i, t in enumerate(fake.calls) if t.train and t.run.id in selection)
        first_test = min(i for i, t in enumerate(fake.calls) if t.test and t.run.id in row["final_runs"])
        assert last_selection < first_test, key
    # every training evaluates the validation set and the seen pairs of its training identities, never test
    assert plan.seen == (str(Path(plan.data_root) / "seen.bin"),)
    executor = SubprocessExecutor(plan)
    for run_id, record in repro.store.data["runs"].items():
        command = " ".join(executor.train_command(run_spec(plan, record["settings"], record["seed"]), Path("r")))
        assert f'eval.benchmarks=["{plan.val[0]}", "{plan.seen[0]}"]' in command
        assert not any(path in command for path in plan.test)
        assert record["config"]["eval"]["benchmarks"] == [*plan.val, *plan.seen]
    # the losing candidate on validation has the better seen-pair accuracy: the choice did not read it
    chosen, other = sorted((repro.store.run(c["run"]) for c in rows["losses/sphereface2-C"]["candidates"]),
                           key=lambda record: record["settings"].get("head.m") != 0.2)
    assert seen_score(other) > seen_score(chosen) and val_score(other) < val_score(chosen)
    # the choice reads validation metrics only: better test numbers for a losing candidate change nothing
    loser = next(c for c in rows["losses/sphereface2-C"]["candidates"] if c["settings"].get("head.m") != 0.2)
    repro.store.data["runs"][loser["run"]]["test"] = {"test": {"kind": "pairs", "accuracy": 1.0, "accuracy_std": 0}}
    assert repro.chosen("losses/sphereface2-C")["head.m"] == 0.2
    assert choose([0.5, None, 0.7, 0.7]) == 2 and choose([None, None]) is None


def test_selection_reads_validation_and_never_the_seen_pairs():
    better_seen = {"val": {"val": {"accuracy": 0.70}}, "seen": {"seen": {"accuracy": 0.99}}}
    better_val = {"val": {"val": {"accuracy": 0.72}}, "seen": {"seen": {"accuracy": 0.80}}}
    only_seen = {"seen": {"seen": {"accuracy": 1.0}}}  # no validation metrics: not a candidate
    records = [better_seen, better_val, only_seen]
    assert [val_score(r) for r in records] == [0.70, 0.72, None]
    assert choose([val_score(r) for r in records]) == 1
    assert seen_score(better_seen) == 0.99 and seen_score({"val": better_val["val"]}) is None
    two_sets = {"val": {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.8}}, "seen": {"s": {"accuracy": 0.1}}}
    assert val_score(two_sets) == pytest.approx(0.7)  # the mean over the validation pair sets


def test_curves_are_read_from_the_run_s_csv_files(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,epoch,loss,lr\n"
        "10,0,5.0,0.1\n20,0,4.0,0.1\n30,0,nan,0.1\n"
        "20,0,4.5,0.1\n30,0,3.0,0.1\n40,0,2.5,0.1\n")  # resumed after step 10: steps 20 and 30 again
    (tmp_path / "eval.csv").write_text(
        "step,benchmark,accuracy,accuracy_std,best_accuracy,eer,auc\n"
        "20,val,0.61,0.01,,,\n20,seen,0.70,0.01,,,\n40,val,0.65,0.01,,,\n40,seen,0.90,0.02,,,\n"
        "40,test_templates,,,,,0.9\n")  # a benchmark without pair accuracy has no curve
    curve = read_curve(tmp_path)
    assert curve == {"loss": [[10, 5.0], [20, 4.5], [30, 3.0], [40, 2.5]],
                     "eval": {"seen": [[20, 0.70], [40, 0.90]], "val": [[20, 0.61], [40, 0.65]]}}
    (tmp_path / "metrics.csv").write_text("step,loss\n10,inf\n")
    assert read_curve(tmp_path)["loss"] == [[10, None]]  # results.json is strict JSON
    # long runs: at most CURVE_POINTS points, evenly spaced, the first and the last kept
    points = [[step, 1.0 / step] for step in range(1, 1201)]
    thinned = thin(points)
    assert len(thinned) == CURVE_POINTS == 500 and thinned[0] == [1, 1.0] and thinned[-1] == points[-1]
    gaps = {b[0] - a[0] for a, b in zip(thinned, thinned[1:])}
    assert gaps <= {2, 3}  # 1199 steps over 499 gaps
    assert thin(points[:499]) == points[:499] and thin([]) == []


def convergence_results() -> tuple[dict, object]:
    """A results dict of two losses, two seeds each, with known curves and end-of-training accuracies."""
    from sf2dist.reproduce.plan import Experiment, Row

    experiment = Experiment("losses", "Loss comparison", (Row("sphereface2-C", "sphereface2-C"),
                                                          Row("cosface", "cosface")))
    loss = {  # 21 logged steps 0..200 of 10; seed 1 a constant offset
        "sphereface2-C": lambda step: 2.0 - step / 100,  # 2.0 at 0, 1.0 at 100, 0.5 at 150, 0.0 at 200
        "cosface": lambda step: 8.0 if step <= 150 else 4.0,
    }
    runs, rows = {}, {}
    for name, curve in loss.items():
        rows[f"losses/{name}"] = {"final_runs": [f"{name}-0", f"{name}-1"]}
        for seed in (0, 1):
            runs[f"{name}-{seed}"] = {
                "seed": seed,
                "val": {"val": {"accuracy": 0.80 + 0.02 * seed}},
                "seen": {"seen": {"accuracy": 0.95 + 0.01 * seed}},
                "curve": {"loss": [[step, curve(step) + seed] for step in range(0, 201, 10)],
                          "eval": {"val": [[100, 0.7], [200, 0.80 + 0.02 * seed]],
                                   "seen": [[100, 0.9], [200, 0.95 + 0.01 * seed]]}},
            }
    results = {"runs": runs, "rows": rows, "benchmarks": {"val": ["d/val.bin"], "seen": ["d/seen.bin"],
                                                          "test": ["d/test.bin"]}}
    return results, experiment


def test_the_convergence_table_from_known_curves(tmp_path):
    results, experiment = convergence_results()
    rows = {row.key: row for row in report.convergence(results, experiment)}
    sf2 = rows["losses/sphereface2-C"]
    # seed 0: loss 1.0 at 50 % (step 100), 0.5 at 75 % (step 150), mean over steps >= 190 (0.1, 0.0) = 0.05;
    # seed 1 adds 1 to each; the last quarter: (0.05 - 0.5) / 0.5 = -90 % and (1.05 - 1.5) / 1.5 = -30 %
    assert sf2.loss[0.5].values == (1.0, 2.0) and sf2.loss[0.75].values == (0.5, 1.5)
    assert sf2.loss[1.0].values == (pytest.approx(0.05), pytest.approx(1.05))
    assert sf2.last_quarter.values == (pytest.approx(-0.9), pytest.approx(-0.3))
    assert sf2.seen.values == pytest.approx((0.95, 0.96)) and sf2.val.values == pytest.approx((0.80, 0.82))
    assert sf2.seeds == (0, 1)
    assert sf2.val_curves == {"val": ((100, 0.7), (200, 0.8))} and sf2.seen_curves["seen"][0] == (100, 0.9)
    table = report.convergence_table(list(rows.values()), experiment)
    assert ("| loss | seeds | training loss at 50 % | at 75 % | at 100 % (last 5 %) | change over the last quarter % | "
            "seen-pair accuracy % (training identities) | val accuracy % |") in table
    assert "| sphereface2-C | 2 | 1.5 | 1 | 0.55 | -60.0 ± 42.4 | 95.50 ± 0.71 | 81.00 ± 1.41 |" in table
    # cosface: 8 (9) up to step 150, 4 (5) after: -50 % and -44.4 % over the last quarter
    assert "| cosface | 2 | 8.5 | 8.5 | 4.5 | -47.2 ± 3.9 | 95.50 ± 0.71 | 81.00 ± 1.41 |" in table
    # a run without a stored curve still gives its accuracies; a row without finished runs gives dashes
    del results["runs"]["cosface-1"]["curve"]
    results["rows"]["losses/cosface"]["final_runs"].append("missing")
    cosface = report.convergence(results, experiment)[1]
    assert cosface.loss[0.5].values == (8.0,) and cosface.val.n == 2
    results["rows"]["losses/cosface"]["final_runs"] = []
    assert "| cosface | 0 | – | – | – | – | – | – |" in report.convergence_table(
        report.convergence(results, experiment), experiment)
    # the noise experiment's rows share a loss's label: the table names each row's noise ratio
    from sf2dist.reproduce.plan import Experiment, Row
    noisy = Experiment("noise", "Label noise", (Row("sphereface2-C@0.2", "sphereface2-C", group="0.2"),))
    results["rows"]["noise/sphereface2-C@0.2"] = results["rows"]["losses/sphereface2-C"]
    assert "| sphereface2-C, 20 % noise | 2 | 1.5 | 1 | 0.55 |" in report.convergence_table(
        report.convergence(results, noisy), noisy)
    section = report.convergence_section(results, experiment, plot_link="c.png")
    assert "`d/seen.bin`" in section and "![Loss comparison: training curves](c.png)" in section
    assert "converged" not in section.lower()  # the numbers speak; the reader interprets
    path = report.plot_convergence(report.convergence(*convergence_results()), experiment, tmp_path / "c.png")
    assert path.stat().st_size > 10_000


def test_results_json_and_tables_carry_mean_and_std_over_seeds(plan, tmp_path):
    repro, _ = reproduction(plan, tmp_path / "out")
    repro.run("losses")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["format"] == "sf2dist-reproduce/1" and results["benchmarks"]["test"] == list(plan.test)
    for record in results["runs"].values():
        assert {"settings", "seed", "config", "run_dir", "train", "val"} <= set(record)
        assert record["config"]["run"]["seed"] == record["seed"]
    invocation = results["experiments"]["losses"]["invocations"][-1]
    assert invocation["trained"] == 6 and invocation["tested"] == 4  # 4 selection runs + 2 more seeds; 4 final
    # a re-run finds every run done: the page still gives the wall time of the invocation that trained
    invocation["wall_seconds"] = 600.0
    repro.store.set("experiments", "losses", results["experiments"]["losses"])
    repro.run("losses")
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [i["trained"] for i in again["experiments"]["losses"]["invocations"]] == [6, 0]
    text = report.section(again, repro.experiments["losses"], plot_link="x.png", command="c", machine="m")
    assert ("Wall time of the last invocation that ran anything: 10.0 min (6 runs trained, 4 evaluated on test, "
            "0 failed, ") in text and "; 1 later invocation(s) found nothing left to run)" in text

    summaries = {s.key: s for s in report.summarize(results, repro.experiments["losses"])}
    sf2, cosface = summaries["losses/sphereface2-C"], summaries["losses/cosface"]
    assert sf2.accuracy.values == (0.80, 0.84) and sf2.seeds == (0, 1)
    assert sf2.accuracy.mean == pytest.approx(0.82) and sf2.accuracy.std == pytest.approx(statistics.stdev([0.8, 0.84]))
    assert sf2.fold_std.mean == pytest.approx(0.03)
    assert sf2.tar["1e-04"].mean == pytest.approx(0.55) and sf2.tar["1e-05"].n == 0
    table = report.losses_table(list(summaries.values()), repro.experiments["losses"])
    assert "| sphereface2-C | m 0.2 | 2 | 82.00 ± 2.83 | 3.00 ± 1.41 | 80.00 ± 0.00 | 55.00 ± 7.07 | – |" in table
    # per seed -10 and -13 points: mean -11.50, 90 % interval -11.50 ± t(0.95, 1) 2.12 / sqrt(2), below 0,
    # the paper's direction (its Table 5: CosFace 93.89 %, 0.39 below SphereFace2's 94.28 %; Table 6's
    # TAR@1e-4 88.61 %, 2.70 below); TAR -20 and -30: the interval holds 0
    assert "| cosface | m 0.1, s 30 | 2 | 70.50 ± 0.71 |" in table
    assert "| -11.50 [-20.97, -2.03] | -25.00 [-56.57, +6.57] | 93.89 (-0.39) | 88.61 (-2.70) | yes |" in table
    assert "| reference | – | 94.28 | 91.31 | – |" in table  # SphereFace2's row: the paper's figures alone
    diff = report.paired(cosface.accuracy_by_seed, sf2.accuracy_by_seed)
    assert diff.seeds == (0, 1) and diff.mean == pytest.approx(-0.115) and diff.sign == -1


def test_the_paired_interval_on_known_numbers():
    # Shared seed effects: the rows' seed spreads overlap (unpaired: no call), the per-seed
    # differences are all positive and tight (paired: +1.67 points, interval above 0)
    row, reference = {0: 0.80, 1: 0.84, 2: 0.90}, {0: 0.79, 1: 0.82, 2: 0.88}
    assert abs(statistics.fmean(row.values()) - statistics.fmean(reference.values())) < (
        statistics.stdev(row.values()) + statistics.stdev(reference.values()))
    diff = report.paired(row, reference)
    low, high = diff.interval  # 0.01667 ± 2.920 * 0.005774 / sqrt(3)
    assert (low, high) == (pytest.approx(0.016667 - 0.009733, abs=1e-5), pytest.approx(0.016667 + 0.009733, abs=1e-5))
    assert diff.sign == 1 and report.paired_agreement(diff, 1) == "yes"
    assert report.paired_agreement(diff, -1) == "**no** (reversed)"
    # The reverse: the means differ by more than the two spreads (unpaired: a difference), but seed by
    # seed the gap swings from +4 to +12 points: with two seeds the interval holds 0
    row, reference = {0: 0.80, 1: 0.84}, {0: 0.76, 1: 0.72}
    assert abs(statistics.fmean(row.values()) - statistics.fmean(reference.values())) > (
        statistics.stdev(row.values()) + statistics.stdev(reference.values()))
    diff = report.paired(row, reference)
    assert diff.sign == 0 and report.paired_agreement(diff, 1) == "not resolved (interval holds 0)"
    assert report.paired_text(diff) == "+8.00 [-17.26, +33.26]"
    # only the seeds both rows have count; one seed: a mean, no call
    one = report.paired({0: 0.8, 3: 0.9}, {0: 0.7, 1: 0.6})
    assert one.seeds == (0,) and one.interval is None and report.paired_text(one) == "+10.00 (1 seed)"
    assert report.paired_agreement(one, 1) == "n/a" and report.paired_agreement(one, None) == "–"
    assert report.t95(1) == 6.314 and report.t95(4) == 2.132 and report.t95(22) == 1.725 and report.t95(500) == 1.645


def test_the_paper_column_comes_from_the_projects_record_of_the_paper():
    from sf2dist.reproduce import paper

    assert paper.combined("losses", "cosface") == 93.89 and paper.combined("losses", "sphereface2-M") == 94.28
    assert paper.combined("ablation", "margin") == 93.87 and paper.combined("ablation", "naive") is None
    assert paper.tar("losses", "sphereface2-C", "1e-05") == 85.40 and paper.tar("losses", "softmax", "1e-04") is None
    # directions from the figures where both rows have one, from the text where they do not
    assert paper.direction("losses", "softmax", "sphereface2-C") == -1
    assert paper.direction("ablation", "mining", "balance-tuned") == 1
    assert paper.direction("ablation", "balance-tuned", "naive") == 1  # text: the naive loss fails to converge
    assert paper.direction("ablation", "balance", "naive") == 1  # ... where λ = (K−1)/K trains (74.49 %)
    assert paper.direction("losses", "sphereface2-A", "sphereface2-C") is None  # one SphereFace2 row in the paper
    assert paper.direction("noise", "cosface@0.5", "sphereface2-C@0.5") == -1


def test_rerunning_skips_finished_runs_and_retrains_only_what_is_missing(plan, tmp_path):
    first, _ = reproduction(plan, tmp_path / "out")
    first.run("losses")
    again, fake = reproduction(plan, tmp_path / "out")
    outcome = again.run("losses")
    assert fake.calls == [] and outcome.trained == 0
    lost = again.store.data["rows"]["losses/cosface"]["final_runs"][1]
    (Path(again.store.run(lost)["run_dir"]) / "status.json").unlink()  # as if the training never finished
    third, fake = reproduction(plan, tmp_path / "out")
    third.run("losses")
    assert [(t.run.id, t.train, t.test) for t in fake.calls] == [(lost, True, True)]


def test_a_failed_run_is_reported_kept_out_and_retried_by_the_next_invocation(plan, tmp_path):
    cosface_m02 = run_spec(plan, {"head.type": "partial_fc", "head.margin": "cosface", "head.s": 30, "head.m": 0.2}, 0)
    repro, _ = reproduction(plan, tmp_path / "out", fail=(cosface_m02.id,))
    outcome = repro.run("losses")
    assert outcome.failed == [cosface_m02.id] and not outcome.undecided  # chosen among the candidates that trained
    assert repro.store.run(cosface_m02.id)["train"]["error"] == "simulated crash"
    retry, fake = reproduction(plan, tmp_path / "out")
    retry.run("losses")
    assert [t.run.id for t in fake.calls] == [cosface_m02.id]


def test_ablation_rows_build_on_each_other_and_noise_reuses_the_loss_runs(plan, tmp_path):
    repro, fake = reproduction(plan, tmp_path / "out")
    repro.run("losses")
    repro.run("ablation")
    rows = repro.store.data["rows"]
    assert rows["ablation/naive"]["setting"] == {"head.type": "sphereface2", "head.margin": "C", "head.alpha": 0.5,
                                                 "head.r": 1.0, "head.m": 0.0, "head.t": 1.0}
    assert rows["ablation/balance"]["setting"]["head.alpha"] == pytest.approx(7 / 8)  # (K - 1) / K, K = 8
    # each row against the one above it in the paper's Table 2: tuned λ against λ = (K−1)/K (its 74.49 -> 78.03)
    references = {row.name: row.reference for row in repro.experiments["ablation"].rows}
    assert references == {"naive": None, "balance": "naive", "balance-tuned": "balance", "mining": "balance-tuned",
                          "margin": "mining", "adjustment": "margin"}
    assert rows["ablation/adjustment"]["setting"] == {"head.type": "sphereface2", "head.margin": "C",
                                                      "head.alpha": 0.7, "head.r": 30, "head.m": 0.1, "head.t": 3}
    fake.calls.clear()
    repro.run("noise")
    trained = {t.run.id for t in fake.calls if t.train}
    assert len(trained) == 4  # 2 losses x 2 seeds at ratio 0.5; ratio 0 is the losses experiment's runs
    assert all(repro.store.run(run)["settings"]["data.label_noise"] == 0.5 for run in trained)
    for loss in ("sphereface2-C", "cosface"):
        assert rows[f"noise/{loss}@0"]["final_runs"] == rows[f"losses/{loss}"]["final_runs"]
    table = report.noise_table(report.summarize(repro.store.data, repro.experiments["noise"]),
                               repro.experiments["noise"])
    assert "| 0 % | 82.00 ± 2.83 | 70.50 ± 0.71 | -11.50 [-20.97, -2.03] | sphereface2-C highest | yes | – | – |" \
        in table
    # the paper's claim is the slope: CosFace's gap to SphereFace2 at 50 % noise against the same seed's gap
    # without noise (-10 and -13 points): -15 and -19 points at 50 %, a change of -5 and -6 points, mean -5.50,
    # 90 % interval -5.50 ± t(0.95, 1) 6.314 * 0.707 / sqrt(2) = [-8.66, -2.34]: SphereFace2 degrades more slowly
    for run_id in rows["noise/cosface@0.5"]["final_runs"]:
        record = repro.store.run(run_id)
        record["test"]["test"]["accuracy"] = {0: 0.65, 1: 0.65}[record["seed"]]
    table = report.noise_table(report.summarize(repro.store.data, repro.experiments["noise"]),
                               repro.experiments["noise"])
    assert "change of that Δ since 0 % noise [90 % CI] | sphereface2-C degrades more slowly (the paper) |" in table
    assert "| 50 % | 82.00 ± 2.83 | 65.00 ± 0.00 | -17.00 [-29.63, -4.37] | sphereface2-C highest | yes | " \
           "-5.50 [-8.66, -2.34] | yes |" in table


def test_plots_and_docs_sections(plan, tmp_path):
    repro, _ = reproduction(plan, tmp_path / "out")
    docs = tmp_path / "docs" / "results.md"
    for name in ("losses", "ablation", "noise"):
        repro.run(name)
        for _ in range(2):  # rewriting a section replaces it
            report.write_docs(repro.store.data, repro.experiments[name], docs, command="make reproduce",
                              machine="test machine")
        assert (docs.parent / f"results_{name}.png").stat().st_size > 10_000
        convergence_png = "results_convergence.png" if name == "losses" else f"results_{name}_convergence.png"
        assert (docs.parent / convergence_png).stat().st_size > 10_000
        assert report.plot(report.summarize(repro.store.data, repro.experiments[name]), repro.experiments[name],
                           tmp_path / f"{name}.png").exists()
    text = docs.read_text()
    for name in ("losses", "ablation", "noise"):
        assert text.count(f"<!-- reproduce-{name}:begin -->") == 1
        assert f"![" in text and f"results_{name}.png" in text
    assert "Command: `make reproduce`. Machine: test machine." in text
    assert text.count("#### How the final runs trained") == 3 and "(results_convergence.png)" in text
    # the fake runs: seen accuracy 1.5 - validation, the chosen SphereFace2-C (m 0.2) 80 % val and 70 % seen;
    # losses 2.0, 1.5, 1 + seed at steps 1-3: step 1 nearest 50 % (the earlier on a tie), step 2 75 %, step 3 100 %
    assert "| sphereface2-C | 2 | 2 | 1.5 | 1.5 | 0.0 ± 47.1 | 70.00 ± 0.00 | 80.00 ± 0.00 |" in text
    assert "arXiv:2108.01513" in text and "not yet checked" not in text and "quoted" not in text
    # every table carries the paper's figure for its rows (the ablation's Table 2: margin 93.87 %, 4.22 above mining)
    assert "| 93.87 (+4.22) |" in text and "| 93.89 (-0.39) |" in text
    report.write_setup(plan, docs, command="make reproduce", machine="test machine")
    setup = docs.read_text().split("<!-- reproduce-setup:begin -->")[1]
    assert "8 training identities x 4 images" in setup and "24 impostor comparisons" in setup
    assert "Seeds 0, 1 (the first chooses the hyper-parameters, on validation only)" in setup


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p["losses"].update({"cosface": [{"head.m": 0.1}]}), "same size"),
    (lambda p: p["losses"].update({"circleloss": p["losses"]["cosface"]}), "unknown"),
    (lambda p: p["noise"].update({"losses": ["arcface"]}), "no grid under losses"),
    (lambda p: p["ablation"].pop("mining"), "ablation needs exactly"),
    (lambda p: p.update({"data": {"train": "t", "val": ["a.bin"], "test": ["a.bin"]}}), "both a validation and a test"),
    (lambda p: p.update({"data": {"train": "t", "val": ["a.bin"], "test": ["b.bin"], "seen": ["b.bin"]}}),
     "both a test and a seen .training-identity. benchmark"),
    (lambda p: p.update({"data": {"train": "t", "val": ["a.bin"], "test": ["b.bin"], "seen": "c.bin"}}),
     "seen must be a list"),
    (lambda p: p.update({"colour": "blue"}), "unknown keys"),
])
def test_plan_errors_name_the_problem(tmp_path, edit, message):
    import yaml

    source = ROOT / "configs" / "reproduce" / "tiny.yaml"
    raw = yaml.safe_load(source.read_text())
    raw["train_config"] = str(ROOT / "configs" / "reproduce" / "tiny_train.yaml")
    edit(raw)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PlanError, match=message):
        load_plan(str(path))


def test_profiles_quick_among_them_and_optional_seen_pairs_of_explicit_data(tmp_path):
    import yaml

    quick = load_plan("quick", data_root=str(tmp_path / "data"))
    assert quick.name == "quick" and quick.train_config.name == "quick_train.yaml"
    assert quick.base["run"]["max_steps"] == 500 and quick.openset.train_identities == 1000
    assert quick.seen == (f"{tmp_path / 'data'}/seen.bin",) and quick.fingerprint()["seen"] == list(quick.seen)
    with pytest.raises(PlanError, match=r"known profiles: .*\bquick\b"):
        load_plan("no-such-profile")
    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "tiny.yaml").read_text())
    raw["train_config"] = str(ROOT / "configs" / "reproduce" / "tiny_train.yaml")
    raw["data"] = {"train": "t", "val": ["a.bin"], "test": ["b.bin"]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    without = load_plan(str(path))
    assert without.seen == () and without.fingerprint()["seen"] == []
    raw["data"]["seen"] = ["s.bin"]
    path.write_text(yaml.safe_dump(raw))
    assert load_plan(str(path)).seen == ("s.bin",)
    assert load_plan(str(path)).fingerprint() != without.fingerprint()  # results of one are not the other's


def test_a_bad_setting_fails_before_any_training(plan, tmp_path):
    import dataclasses

    broken = dataclasses.replace(plan, losses={**plan.losses, "cosface": ({"head.s": -1.0}, {"head.s": 30.0})})
    repro = Reproduction(broken, build_experiments(broken, 8), tmp_path / "out", execute=FakeTraining(broken),
                         log=lambda _: None)
    with pytest.raises(PlanError, match="head.s: must be positive"):
        repro.run("losses")
    assert repro.store.data["runs"] == {}


def test_real_tiny_training_and_test_evaluation_through_the_command_line(tmp_path, capsys):
    """One real run: launch/train.py (3 steps) and sf2dist-eval in subprocesses, then a rerun that skips it."""
    import importlib.util

    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "tiny.yaml").read_text())
    raw.update(train_config=str(ROOT / "configs" / "reproduce" / "tiny_train.yaml"), seeds=[0],
               losses={"sphereface2-C": [{"head.m": 0.1}]}, noise={"losses": ["sphereface2-C"], "ratios": [0.0]})
    raw["data"]["openset"]["out"] = str(tmp_path / "data")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(raw))
    spec = importlib.util.spec_from_file_location("reproduce_cli", ROOT / "launch" / "reproduce.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--profile", str(plan_path), "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "results.md")]

    assert cli.main([*args, "--experiment", "losses"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (run_id,) = results["runs"]
    record = results["runs"][run_id]
    run_dir = Path(record["run_dir"])
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert set(record["val"]) == {"val"} and 0.0 <= record["val"]["val"]["accuracy"] <= 1.0
    assert set(record["seen"]) == {"seen"} and 0.0 <= record["seen"]["seen"]["accuracy"] <= 1.0
    # the curve: the loss of every logged step (3), both pair sets at the evaluation of step 2 (eval_every) and the end
    assert [step for step, _ in record["curve"]["loss"]] == [1, 2, 3]
    assert {name: [step for step, _ in points] for name, points in record["curve"]["eval"].items()} == {
        "seen": [2, 3], "val": [2, 3]}
    assert record["curve"]["eval"]["seen"][-1][1] == record["seen"]["seen"]["accuracy"]
    assert set(record["test"]) == {"test", "test_templates"}
    assert record["test"]["test_templates"]["num_templates"] == 8
    trained_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert trained_config["eval"]["benchmarks"] == [str(tmp_path / "data" / "val.bin"),
                                                    str(tmp_path / "data" / "seen.bin")]  # never the test set
    docs = (tmp_path / "results.md").read_text()
    assert "<!-- reproduce-setup:begin -->" in docs and "<!-- reproduce-losses:begin -->" in docs
    assert "| sphereface2-C | 1 |" in docs.split("#### How the final runs trained")[1]
    assert (tmp_path / "results_convergence.png").exists() and (tmp_path / "out" / "losses_convergence.png").exists()

    # rerun, and the noise experiment at ratio 0: the same training, nothing to run
    assert cli.main([*args, "--experiment", "noise"]) == 0
    assert cli.main([*args, "--experiment", "losses"]) == 0
    assert (run_dir / "reproduce-train.log").read_text().count("\n# ") == 1
    assert (run_dir / "reproduce-test.log").read_text().count("\n# ") == 1
    assert "0 trained, 0 tested" in capsys.readouterr().out


def test_only_the_published_run_rewrites_the_published_results_page():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_cli", ROOT / "launch" / "reproduce.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    def page(*argv):
        return cli.docs_page(cli.build_parser().parse_args(list(argv)))

    assert page() == Path("docs/results.md")  # make reproduce
    assert page("--profile", "tiny") is None  # a throw-away profile
    assert page("--out", "elsewhere") is None  # the published profile into another output
    assert page("--profile", "tiny", "--docs", "mine.md") == Path("mine.md")
    assert page("--no-docs") is None


def test_headers_name_the_folds_the_accuracy_was_taken_over(plan, tmp_path):
    repro, _ = reproduction(plan, tmp_path / "out")
    repro.run("losses")
    repro.run("ablation")
    results = repro.store.data
    assert plan.openset.folds == 2 and results["fingerprint"]["openset"]["folds"] == 2  # the tiny profile's pair sets
    # metrics that record their folds (a 2-fold evaluation of the 2-fold pair sets): 2-fold everywhere
    for record in results["runs"].values():
        if record.get("test"):
            record["test"]["test"]["folds"] = 2
    for name in ("losses", "ablation"):
        text = report.section(results, repro.experiments[name], plot_link="x.png", command="c", machine="m")
        assert "| accuracy % (2-fold) | 2-fold std |" in text and "10-fold" not in text
        assert "accuracy is the 2-fold accuracy on" in text and "laid out in" not in text
    # metrics without them are sf2dist-eval's, over EVAL_FOLDS (10) folds: the header says so, and the
    # section says that these are not the pair sets' 2 identity-disjoint folds
    assert report.EVAL_FOLDS == 10
    for record in results["runs"].values():
        if record.get("test"):
            del record["test"]["test"]["folds"]
    text = report.section(results, repro.experiments["losses"], plot_link="x.png", command="c", machine="m")
    assert "| accuracy % (10-fold) | 10-fold std |" in text and "2-fold" not in text
    assert ("The pair sets are laid out in 2 folds of disjoint identities, but the accuracy splits them into 10 "
            "folds") in text
    # a table over runs evaluated differently shows both counts
    first = next(record for record in results["runs"].values() if record.get("test"))
    first["test"]["test"]["folds"] = 2
    summaries = report.summarize(results, repro.experiments["losses"])
    assert report.fold_label(summaries) == "2/10-fold"
    assert "| accuracy % (2/10-fold) | 2/10-fold std |" in report.losses_table(summaries, repro.experiments["losses"])
