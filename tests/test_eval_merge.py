"""`sf2dist-eval` into a folder that already holds results: one result per benchmark and flip
test is kept, a repeat replaces its own entry and says so, another checkpoint's or a broken
results.json is refused and left as it is."""
import json

import numpy as np
import pytest
from PIL import Image

from sf2dist.eval import Roc, roc_curve, roc_points, tar_at_far
from sf2dist.eval.cli import main
from sf2dist.eval.results import ROC_POINTS
from tests.test_eval_cli import fails, write_pairs
from tests.test_export_run import save_step

TIMES = ("extract_seconds", "evaluated_at")  # all that may differ between two evaluations of the same thing


def without_times(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key not in TIMES}


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture
def run(tmp_path):
    """A run with a checkpoint at step 20 and two benchmarks: (step directory, lfw, cfp)."""
    lfw = write_pairs(tmp_path / "lfw.bin", count=40, seed=0)
    cfp = write_pairs(tmp_path / "cfp.bin", count=40, seed=1)
    return save_step(tmp_path / "my-run", 20), lfw, cfp


def test_benchmarks_evaluated_one_after_the_other_are_all_kept(run, tmp_path, capsys):
    step, lfw, cfp = run
    out = tmp_path / "my-run" / "eval" / "step_00000020"
    main(["--checkpoint", str(step), "--benchmark", str(lfw)])
    main(["--checkpoint", str(step), "--benchmark", str(cfp)])
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line == f"wrote {out / 'results.json'} and {out / 'roc-sum.png'}; results.json holds flip sum: lfw, cfp"
    document = results(out)
    assert document["flip"] == "sum" and list(document["benchmarks"]) == ["lfw", "cfp"]
    assert document["benchmarks"] == document["evaluations"]["sum"]["benchmarks"] and list(document["evaluations"]) == ["sum"]
    assert list(document["evaluations"]["sum"]["roc"]) == ["lfw", "cfp"]
    # the same numbers as both evaluated at once
    main(["--checkpoint", str(step), "--benchmark", str(lfw), str(cfp), "--out", str(tmp_path / "together")])
    together = results(tmp_path / "together")
    for name in ("lfw", "cfp"):
        assert without_times(document["benchmarks"][name]) == without_times(together["benchmarks"][name])
    assert document["evaluations"]["sum"]["roc"] == together["evaluations"]["sum"]["roc"]
    assert document["checkpoint"] == str(step / "model.pt") and document["step"] == 20
    assert sorted(path.name for path in out.iterdir()) == ["results.json", "roc-sum.png"]  # no partial file left


def test_another_flip_test_is_kept_beside_the_first_with_its_own_plot(run, tmp_path, capsys):
    step, lfw, _ = run
    out = tmp_path / "my-run" / "eval" / "step_00000020"
    main(["--checkpoint", str(step), "--benchmark", str(lfw), "--flip", "none"])
    plain = results(out)["evaluations"]["none"]
    main(["--checkpoint", str(step), "--benchmark", str(lfw), "--flip", "sum"])
    assert capsys.readouterr().out.splitlines()[-1].endswith("; results.json holds flip sum: lfw; flip none: lfw")
    document = results(out)
    assert list(document["evaluations"]) == ["sum", "none"] and document["evaluations"]["none"] == plain
    assert document["flip"] == "sum" and document["benchmarks"] == document["evaluations"]["sum"]["benchmarks"]
    flipped = document["evaluations"]["sum"]["benchmarks"]["lfw"]
    assert flipped["best_threshold"] != plain["benchmarks"]["lfw"]["best_threshold"]  # two flip tests, two results
    assert Image.open(out / "roc-none.png").text["Title"] == "run my-run, step 20, flip none"
    assert Image.open(out / "roc-sum.png").text["Title"] == "run my-run, step 20, flip sum"


def test_the_same_benchmark_and_flip_again_replaces_only_its_entry_and_says_so(run, tmp_path, capsys):
    step, lfw, cfp = run
    out = tmp_path / "my-run" / "eval" / "step_00000020"
    main(["--checkpoint", str(step), "--benchmark", str(lfw), str(cfp)])
    first = results(out)["evaluations"]["sum"]
    earlier = first["benchmarks"]["lfw"]["evaluated_at"]
    capsys.readouterr()
    main(["--checkpoint", str(step), "--benchmark", str(lfw)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [
        f"replaced the earlier result of lfw (flip sum) from {earlier}",
        f"wrote {out / 'results.json'} and {out / 'roc-sum.png'}; results.json holds flip sum: lfw, cfp",
    ]
    again = results(out)["evaluations"]["sum"]
    assert list(again["benchmarks"]) == ["lfw", "cfp"] and again["benchmarks"]["cfp"] == first["benchmarks"]["cfp"]
    assert without_times(again["benchmarks"]["lfw"]) == without_times(first["benchmarks"]["lfw"])
    assert again["benchmarks"]["lfw"]["evaluated_at"] >= earlier and again["roc"] == first["roc"]


def test_another_checkpoints_results_are_refused_before_any_evaluation(run, tmp_path, capsys):
    step, lfw, _ = run
    other = save_step(tmp_path / "other-run", 10)
    shared = tmp_path / "shared"
    main(["--checkpoint", str(other), "--benchmark", str(lfw), "--out", str(shared)])
    before = (shared / "results.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(step), "--benchmark", str(lfw), "--out", str(shared)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "evaluating" not in err, err  # refused before any benchmark is read
    assert err.splitlines()[-1] == (
        f"sf2dist-eval: {shared / 'results.json'} holds the results of another checkpoint ({other / 'model.pt'}, step 10, "
        f"backbone {results(shared)['backbone']}), not of {step / 'model.pt'} (step 20, backbone "
        f"{results(shared)['backbone']}); pass another --out for this one"
    )
    assert (shared / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "content, reason",
    [("{not json", "Expecting property name enclosed in double quotes"), ("[1, 2]", "no 'benchmarks' mapping"),
     ('{"benchmarks": {}, "evaluations": {"both": {}}}', "'evaluations' is not a mapping of flip tests")],
)
def test_a_broken_results_file_is_refused_and_left_as_it_is(run, tmp_path, capsys, content, reason):
    step, lfw, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(content)
    message = fails(capsys, main, ["--checkpoint", str(step), "--benchmark", str(lfw), "--out", str(out)])
    assert message.startswith(f"{out / 'results.json'} is not a results file of sf2dist-eval ({reason}"), message
    assert message.endswith("it is left as it is: move it away, or pass another --out")
    assert (out / "results.json").read_text() == content and sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_a_results_file_from_before_the_merge_is_taken_in(run, tmp_path, capsys):
    step, lfw, cfp = run
    out = tmp_path / "out"
    main(["--checkpoint", str(step), "--benchmark", str(lfw), "--out", str(out)])
    entry = results(out)["benchmarks"]["lfw"]
    context = ("world_size", "device", "machine", "sf2dist_version", "evaluated_at")
    metrics = {key: value for key, value in entry.items() if key not in context}
    legacy = {"checkpoint": str(step / "model.pt"), "step": 20, "backbone": results(out)["backbone"], "flip": "sum",
              "world_size": 1, "device": "cpu", "machine": "m", "sf2dist_version": "0", "benchmarks": {"lfw": metrics}}
    (out / "results.json").write_text(json.dumps(legacy))
    main(["--checkpoint", str(step), "--benchmark", str(cfp), "--out", str(out)])
    document = results(out)
    kept = document["evaluations"]["sum"]["benchmarks"]["lfw"]
    assert without_times(kept) == without_times({**metrics, "world_size": 1, "device": "cpu", "machine": "m",
                                                 "sf2dist_version": "0"})
    assert "evaluated_at" in kept and list(document["evaluations"]["sum"]["roc"]) == ["cfp"]
    assert capsys.readouterr().out.splitlines()[-1].endswith("results.json holds flip sum: lfw, cfp")


def test_stored_roc_points_are_exact_operating_points_that_keep_every_tar_at_far():
    rng = np.random.default_rng(0)
    issame = np.arange(20000) % 4 == 0
    roc = roc_curve(rng.normal(issame * 2.0, 1.0), issame)
    assert len(roc.far) > 10000
    points = roc_points(roc)
    far, tar = np.array(points["far"]), np.array(points["tar"])
    assert len(far) <= ROC_POINTS and (far[0], tar[0]) == (0.0, 0.0) and (far[-1], tar[-1]) == (1.0, 1.0)
    exact = set(zip(roc.far.tolist(), roc.tar.tolist()))
    assert all(point in exact for point in zip(far.tolist(), tar.tolist()))
    stored = Roc(far, tar, np.zeros_like(far), roc.num_positive, roc.num_negative)
    np.testing.assert_array_equal(tar_at_far(stored), tar_at_far(roc))  # the table's TAR@FAR, read off the curve
    assert tar_at_far(roc, [1e-3])[0] not in {0.0, 1.0}  # ... on a curve where they mean something
