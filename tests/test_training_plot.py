"""training.png: loss and learning rate always, verification accuracy only when there is some."""
from types import SimpleNamespace

import pytest
from matplotlib.colors import to_rgba

from sf2dist.train.metrics import RunLog, plot_run, read_csv, training_figure

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as RunLog leaves it after 5 logged steps and no evaluation."""
    log = RunLog(tmp_path, {}, SimpleNamespace(wandb_mode="disabled"))
    for step in range(1, 6):
        log.train({"step": 10 * step, "epoch": 0, "loss": 20.0 - step, "lr": 0.1 / step})
    log.finish()
    return tmp_path


def panels(fig) -> list[tuple[str, list, list]]:
    """(title, x, y of every line) of each axes."""
    return [
        (ax.get_title(), [list(line.get_xdata()) for line in ax.lines], [list(line.get_ydata()) for line in ax.lines])
        for ax in fig.axes
    ]


def test_without_evaluation_the_plot_has_loss_and_lr_panels_only(run_dir):
    assert read_csv(run_dir / "eval.csv") == []  # header only
    expected = [
        ("training loss", [[10, 20, 30, 40, 50]], [[19.0, 18.0, 17.0, 16.0, 15.0]]),
        ("learning rate", [[10, 20, 30, 40, 50]], [[pytest.approx(0.1 / s) for s in range(1, 6)]]),
    ]
    assert panels(training_figure(read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv"))) == expected
    (run_dir / "eval.csv").unlink()  # absent: the same figure
    assert read_csv(run_dir / "eval.csv") == []
    assert panels(training_figure(read_csv(run_dir / "metrics.csv"), [])) == expected
    path = plot_run(run_dir)
    assert path == run_dir / "training.png" and path.read_bytes()[:8] == PNG


def test_with_evaluation_an_accuracy_panel_follows(run_dir):
    log = RunLog(run_dir, {}, SimpleNamespace(wandb_mode="disabled"))
    log.eval(20, "lfw", {"accuracy": 0.9, "accuracy_std": 0.01})
    log.eval(20, "IJBC", {"auc": 0.99})  # IJB reports no 10-fold accuracy: left out of the panel
    log.eval(50, "lfw", {"accuracy": 0.95, "accuracy_std": 0.01})
    log.eval(50, "cfp_fp", {"accuracy": 0.8, "accuracy_std": 0.02})
    fig = training_figure(read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv"))
    titles = [title for title, _, _ in panels(fig)]
    assert titles == ["training loss", "learning rate", "10-fold verification accuracy"]
    accuracy = fig.axes[2]
    assert [line.get_label() for line in accuracy.lines] == ["cfp_fp", "lfw"]
    assert [list(line.get_xdata()) for line in accuracy.lines] == [[50], [20, 50]]
    assert [list(line.get_ydata()) for line in accuracy.lines] == [[pytest.approx(80.0)], [90.0, 95.0]]
    assert plot_run(run_dir).read_bytes()[:8] == PNG


def test_a_run_whose_only_benchmark_has_no_accuracy_gets_two_panels(run_dir):
    RunLog(run_dir, {}, SimpleNamespace(wandb_mode="disabled")).eval(50, "IJBC", {"auc": 0.99})
    assert len(training_figure(read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv")).axes) == 2


def test_accuracy_has_std_bars_the_lr_a_legend_and_steps_are_whole_numbers(tmp_path):
    log = RunLog(tmp_path, {}, SimpleNamespace(wandb_mode="disabled"))
    for step in (1, 2, 3):
        log.train({"step": step, "epoch": 0, "loss": 5.0 - step, "lr": 0.1})
    log.eval(2, "lfw", {"accuracy": 0.9, "accuracy_std": 0.015})
    log.eval(3, "lfw", {"accuracy": 0.95, "accuracy_std": 0.005})
    fig = training_figure(read_csv(tmp_path / "metrics.csv"), read_csv(tmp_path / "eval.csv"))
    fig.canvas.draw()  # ticks are placed when drawn
    ax_loss, ax_lr, ax_acc = fig.axes
    (bars,) = ax_acc.collections  # one vertical bar per evaluation: accuracy ± the 10-fold std, in %
    assert [segment.tolist() for segment in bars.get_segments()] == [
        [[2, pytest.approx(88.5)], [2, pytest.approx(91.5)]], [[3, pytest.approx(94.5)], [3, pytest.approx(95.5)]]]
    assert bars.get_colors().tolist() == [list(to_rgba(ax_acc.lines[0].get_color()))]  # the benchmark's colour
    assert [text.get_text() for text in ax_lr.get_legend().get_texts()] == [
        "backbone lr (optim.lr x warm-up x schedule)"]
    for ax in fig.axes:  # a 3-step run: no 1.5 or 2.25 on any step axis
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
