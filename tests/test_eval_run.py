"""`sf2dist-eval` on checkpoints as training writes them: step directories, the run's own
benchmarks, results under the run, the ROC's title and the notes under the table."""
import json

from PIL import Image

from sf2dist.eval import BenchmarkResult, format_table
from sf2dist.eval.cli import build_parser, main
from tests.test_eval_cli import fails, registry, write_checkpoint, write_pairs  # noqa: F401  (registry is a fixture)
from tests.test_export_run import option_helps, save_step


def test_a_step_directory_is_evaluated_on_the_runs_benchmarks_into_the_run(tmp_path, monkeypatch, capsys):
    lfw = write_pairs(tmp_path / "lfw.bin", count=40)  # 20 pairs, 10 negative
    run = tmp_path / "my-run"
    save_step(run, 10, benchmarks=[lfw])
    step = save_step(run, 20, benchmarks=[lfw])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["--checkpoint", str(step)])  # the directory training prints, no --benchmark
    captured = capsys.readouterr()
    assert f"benchmarks from the run's eval.benchmarks: {lfw}" in captured.err
    out = run / "eval" / "step_00000020"
    document = json.loads((out / "results.json").read_text())
    assert document["checkpoint"] == str(step / "model.pt") and document["step"] == 20
    assert list(document["benchmarks"]) == ["lfw"] and list(elsewhere.iterdir()) == []
    assert Image.open(out / "roc-sum.png").text["Title"] == "run my-run, step 20, flip sum"
    # the table says why TAR@FAR is "-" where the set has too few negative pairs
    assert document["benchmarks"]["lfw"]["tar_at_far"]["1e-02"] is None
    assert document["benchmarks"]["lfw"]["tar_at_far"]["1e-01"] is not None
    assert (
        '"-" under TAR@FAR: too few negative pairs to measure that FAR (FAR f needs at least 1/f of them; '
        "negative pairs: lfw 10)"
    ) in captured.out.splitlines()
    # --run: its newest checkpoint, the same place
    main(["--run", str(run), "--flip", "none"])
    assert json.loads((out / "results.json").read_text())["flip"] == "none"
    assert Image.open(out / "roc-none.png").text["Title"] == "run my-run, step 20, flip none"


def test_without_flip_the_runs_own_flip_test_is_used(tmp_path):
    lfw = write_pairs(tmp_path / "lfw.bin", count=40)
    run = tmp_path / "my-run"
    save_step(run, 10, benchmarks=[lfw], flip="concat")
    main(["--run", str(run)])
    out = run / "eval" / "step_00000010"
    assert json.loads((out / "results.json").read_text())["flip"] == "concat"
    main(["--run", str(run), "--flip", "sum"])  # an explicit choice wins
    assert json.loads((out / "results.json").read_text())["flip"] == "sum"


def test_benchmarks_the_run_names_but_that_are_gone_say_what_to_do(tmp_path, monkeypatch, capsys):
    step = save_step(tmp_path / "my-run", 10, benchmarks=["data/demo/holdout.bin"])
    monkeypatch.chdir(tmp_path)
    assert fails(capsys, main, ["--checkpoint", str(step)]) == (
        f"benchmark data/demo/holdout.bin (the run's eval.benchmarks, stored in {step / 'model.pt'}) does not exist "
        f"from {tmp_path}; pass --benchmark with where it is now"
    )
    step = save_step(tmp_path / "other-run", 10)  # a run without eval.benchmarks
    assert fails(capsys, main, ["--run", str(tmp_path / "other-run")]) == (
        f"no --benchmark given, and {step / 'model.pt'} records no eval.benchmarks of its run to use instead; "
        "pass --benchmark FILE_OR_DIR..."
    )


def test_a_checkpoint_outside_a_run_writes_beside_itself(tmp_path, registry, monkeypatch, capsys):  # noqa: F811
    write_checkpoint(tmp_path / "c.pt")
    lfw = write_pairs(tmp_path / "lfw.bin")
    monkeypatch.chdir(tmp_path / "..")
    main(["--checkpoint", str(tmp_path / "c.pt"), "--benchmark", str(lfw)])
    assert Image.open(tmp_path / "eval" / "c" / "roc-sum.png").text["Title"] == "c, flip sum"


def test_a_benchmark_of_another_size_than_the_model_takes_is_one_line(tmp_path, capsys):
    lfw = write_pairs(tmp_path / "lfw.bin")  # 16x16 faces
    step = save_step(tmp_path / "my-run", 10, input_size=32)
    message = fails(capsys, main, ["--checkpoint", str(step), "--benchmark", str(lfw)])
    assert "image is 16x16 but the model takes 32x32" in message, message


def test_template_benchmarks_explain_their_dashes():
    metrics = {"num_pairs": 12, "num_negative": 6, "best_accuracy": 0.9, "eer": 0.1, "auc": 0.95,
               "tar_at_far": {"1e-01": None, "1e+00": 1.0},
               "identification": {"G1": {"num_mated": 5, "num_nonmated": 3, "rank_1": 0.8, "rank_5": 1.0,
                                         "tpir_at_fpir": {"1e-01": None, "1e+00": 0.8}}}}
    table = format_table([BenchmarkResult("ijbc", "ijb", metrics, roc=None)]).splitlines()
    assert table[3].split()[:3] == ["ijbc", "12", "-"]
    assert '"-" under acc (10-fold): not measured on template benchmarks (ijbc)' in table
    assert (
        '"-" under TAR@FAR: too few negative pairs to measure that FAR (FAR f needs at least 1/f of them; '
        "negative pairs: ijbc 6)"
    ) in table
    assert table[-1] == (
        '"-" under TPIR@FPIR: too few non-mated probes to measure that FPIR (FPIR f needs at least 1/f of them; '
        "non-mated probes: ijbc/G1 3)"
    )
    assert not any("under" in line for line in format_table([]).splitlines())


def test_every_option_says_its_default():
    helps = option_helps(build_parser())
    assert set(helps) == {"-h", "--checkpoint", "--run", "--backbone-weights", "--backbone", "--embedding-dim",
                          "--benchmark", "--nproc", "--batch-size", "--device", "--workers", "--flip", "--out",
                          "--image-size"}
    for option, text in helps.items():
        assert option == "-h" or "default" in text or "required" in text, text
    assert "the run's own eval.benchmarks" in helps["--benchmark"] and "RUN_DIR/eval/step_N" in helps["--out"]
    assert "roc-FLIP.png" in helps["--out"]
