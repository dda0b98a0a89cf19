"""Running the experiments: hyper-parameter selection on validation, then every seed on test.

For each row of an experiment (`sf2dist.reproduce.plan`) the runner

1. resolves the row's candidate settings (which waits for the row it builds on);
2. with more than one candidate, trains each with the first seed, the trainer evaluating the
   *validation* benchmarks and the *seen* pairs of training identities (`eval.benchmarks` is
   set to them), and chooses the candidate with the highest validation accuracy (mean over
   the validation pair sets; the first on ties). `choose` sees validation metrics and nothing
   else: the seen pairs only show how well a run fits its training identities;
3. trains the chosen setting with every seed (the first seed's run is the selection's run,
   not trained again) and only then evaluates each of these runs on the *test* benchmarks,
   with `sf2dist-eval` into `RUN_DIR/eval/test/`.

No test benchmark is ever part of a training run's config, and a run is evaluated on test
only once it is a row's final run, after its row's choice is made.

Every training is a subprocess, `launch/train.py` (`torchrun --standalone` when the plan has
more than one rank per run), `jobs` at a time. `results.json` in the output directory holds
every run's settings, seed, command, status, times and metrics (validation and seen at the
last step, and the run's `curve`: its logged training loss and every evaluation's accuracy
by step, `read_curve`), rewritten after each run;
re-running skips every run whose `status.json` says finished and whose metrics are stored,
and a training that was interrupted resumes from its newest checkpoint (the trainer's own
resume). Results made under another plan fingerprint (trainer config, data) are refused.
"""
from __future__ import annotations

import concurrent.futures
import csv
import datetime
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sf2dist.config import config_to_dict, load_config
from sf2dist.reproduce.plan import Experiment, Plan, Row, RunSpec, check_settings, run_spec, set_arguments
from sf2dist.train.metrics import read_csv

RESULTS_FORMAT = "sf2dist-reproduce/1"
ROOT = Path(__file__).resolve().parents[2]
TEST_EVAL_DIR = "eval/test"
CURVE_POINTS = 500  # at most this many training-loss points of a run are kept in results.json
_EVAL_MAIN = "import sys; from sf2dist.eval.cli import main; main(sys.argv[1:])"


def benchmark_name(path: str) -> str:
    """The name sf2dist.eval gives a benchmark: a file's stem, a directory's name."""
    return Path(path).name if Path(path).is_dir() else Path(path).stem


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the results file ---------------------------------------------------------------------
class ResultStore:
    """`results.json`: one record per run (module doc), written atomically after every change."""

    def __init__(self, path: str | os.PathLike, plan: Plan):
        self.path = Path(path)
        self._lock = threading.Lock()
        fingerprint = plan.fingerprint()
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is not valid JSON ({err}); move it away to start afresh") from None
            if self.data.get("format") != RESULTS_FORMAT:
                raise ValueError(f"{self.path}: format {self.data.get('format')!r}, expected {RESULTS_FORMAT!r}")
            if self.data.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                differing = sorted(k for k in fingerprint if self.data.get("fingerprint", {}).get(k) !=
                                   json.loads(json.dumps(fingerprint[k])))
                raise ValueError(
                    f"{self.path} holds runs of another trainer config or data (differs in: "
                    f"{', '.join(differing)}); their numbers cannot be mixed with these. Choose another --out, or "
                    f"move {self.path.parent} away")
        else:
            self.data = {"format": RESULTS_FORMAT, "profile": plan.name, "plan": str(plan.path),
                         "train_config": str(plan.train_config), "fingerprint": fingerprint,
                         "benchmarks": {"val": list(plan.val), "seen": list(plan.seen), "test": list(plan.test)},
                         "runs": {}, "rows": {}, "experiments": {}}

    def run(self, run_id: str) -> dict | None:
        return self.data["runs"].get(run_id)

    def update_run(self, run: RunSpec, fields: dict, config: dict | None = None) -> None:
        """Store a step's fields; a new record starts with the run's settings, seed and resolved `config`."""
        with self._lock:
            record = self.data["runs"].setdefault(run.id, {"settings": run.settings, "seed": run.seed,
                                                            "config": config})
            if "train" in fields:  # what an earlier training of this run measured is stale
                for stale in ("test", "seen", "curve"):
                    if stale not in fields:
                        record.pop(stale, None)
            record.update(fields)  # a step's fields replace that step's earlier attempt
            self._save()

    def set(self, section: str, key: str, value: Any) -> None:
        with self._lock:
            self.data[section][key] = value
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1, allow_nan=False) + "\n")
        partial.replace(self.path)


def run_finished(record: dict | None) -> bool:
    """Trained to the end (its status.json says so) with its validation metrics stored."""
    if not record or record.get("train", {}).get("status") != "finished" or not record.get("val"):
        return False
    try:
        status = json.loads((Path(record["run_dir"]) / "status.json").read_text())
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    return status.get("state") == "finished"


def tested(record: dict | None) -> bool:
    return bool(record and record.get("test"))


def val_score(record: dict | None) -> float | None:
    """The selection metric: mean 10-fold accuracy over the validation pair sets."""
    return _mean_accuracy(record, "val")


def seen_score(record: dict | None) -> float | None:
    """The training-identity accuracy: mean accuracy over the seen pair sets; reported, never used to choose."""
    return _mean_accuracy(record, "seen")


def _mean_accuracy(record: dict | None, benchmarks: str) -> float | None:
    if not record or not record.get(benchmarks):
        return None
    accuracies = [m["accuracy"] for m in record[benchmarks].values() if m.get("accuracy") is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def choose(val_scores: list[float | None]) -> int | None:
    """Index of the best validation score (the first on ties); None when no candidate has one."""
    best = None
    for index, score in enumerate(val_scores):
        if score is not None and (best is None or score > val_scores[best]):
            best = index
    return best


# -- one run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    run: RunSpec
    train: bool  # train it (or collect a training that finished)
    test: bool  # then evaluate it on the test benchmarks


Executor = Callable[[Task, Path, int], dict]  # (task, run directory, job slot) -> fields of its record


class SubprocessExecutor:
    """Trains with launch/train.py and evaluates with sf2dist-eval, each a subprocess (module doc)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def environment(self, slot: int) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.plan.threads))
        if self.plan.devices:
            devices = self.plan.devices[slot * self.plan.nproc:(slot + 1) * self.plan.nproc]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return env

    def train_command(self, run: RunSpec, run_dir: Path) -> list[str]:
        launcher = [sys.executable] if self.plan.nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.plan.nproc}"]
        sets = [arg for value in train_overrides(self.plan, run, run_dir) for arg in ("--set", value)]
        return [*launcher, str(ROOT / "launch" / "train.py"), "--config", str(self.plan.train_config), *sets]

    def test_command(self, run: RunSpec, run_dir: Path) -> list[str]:
        cfg = load_config([self.plan.train_config], set_arguments(run.settings))
        return [sys.executable, "-c", _EVAL_MAIN, "--run", str(run_dir), "--benchmark", *self.plan.test,
                "--out", str(run_dir / TEST_EVAL_DIR), "--batch-size", str(self.plan.eval_batch_size),
                "--device", self.plan.eval_device, "--flip", cfg.eval.flip, "--nproc", str(self.plan.nproc)]

    def _call(self, command: list[str], log: Path, slot: int) -> tuple[int, float]:
        start = time.perf_counter()
        with open(log, "a") as out:
            out.write(f"\n# {now()}: {' '.join(command)}\n")
            out.flush()
            code = subprocess.call(command, cwd=ROOT, env=self.environment(slot), stdout=out, stderr=subprocess.STDOUT)
        return code, time.perf_counter() - start

    def __call__(self, task: Task, run_dir: Path, slot: int) -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        fields: dict[str, Any] = {"run_dir": str(run_dir)}
        if task.train:
            command = self.train_command(task.run, run_dir)
            if _status(run_dir) == "finished":  # trained before the results were stored: collect only
                code, seconds = 0, 0.0
            else:
                code, seconds = self._call(command, run_dir / "reproduce-train.log", slot)
            status = _status(run_dir)
            train = {"command": command, "seconds": seconds, "exit_code": code, "status": status or "failed"}
            if code == 0 and status == "finished":
                fields["val"] = read_val_metrics(run_dir, self.plan.val)
                fields["seen"] = read_val_metrics(run_dir, self.plan.seen)
                fields["curve"] = read_curve(run_dir)
            else:
                train["status"] = "failed"
                train["error"] = _tail(run_dir / "reproduce-train.log")
            fields["train"] = train
            if train["status"] != "finished":
                return fields
        if task.test:
            command = self.test_command(task.run, run_dir)
            code, seconds = self._call(command, run_dir / "reproduce-test.log", slot)
            evaluation = {"command": command, "seconds": seconds, "exit_code": code,
                          "status": "finished" if code == 0 else "failed"}
            if code == 0:
                results = json.loads((run_dir / TEST_EVAL_DIR / "results.json").read_text())
                flip = command[command.index("--flip") + 1]  # the entry of the flip test it asked for
                fields["test"] = results["evaluations"][flip]["benchmarks"]
            else:
                evaluation["error"] = _tail(run_dir / "reproduce-test.log")
            fields["test_eval"] = evaluation
        return fields


def train_overrides(plan: Plan, run: RunSpec, run_dir: Path) -> list[str]:
    """The `--set` values of a run: its settings, then the plan's data, the validation and seen
    benchmarks (the only ones a training ever evaluates: never a test one), the seed and the run directory."""
    fixed = {"data.train": plan.train, "eval.benchmarks": [*plan.val, *plan.seen], "run.seed": run.seed,
             "run.dir": str(run_dir)}
    return set_arguments({**run.settings, **fixed})


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_val_metrics(run_dir: Path, benchmarks: tuple[str, ...]) -> dict:
    """The metrics of a finished run on `benchmarks` (validation or seen): eval.csv's rows at its last
    step, per benchmark; {} for no benchmarks."""
    if not benchmarks:
        return {}
    step = json.loads((run_dir / "status.json").read_text())["step"]
    wanted = {benchmark_name(path) for path in benchmarks}
    metrics: dict[str, dict] = {}
    with open(run_dir / "eval.csv", newline="") as f:
        for row in csv.DictReader(f):
            if int(row["step"]) == step and row["benchmark"] in wanted:
                metrics[row["benchmark"]] = {k: (float(v) if v not in ("", None) else None) for k, v in row.items()
                                             if k not in ("step", "benchmark")}
    missing = wanted - set(metrics)
    if missing:
        raise ValueError(f"{run_dir / 'eval.csv'} has no evaluation of {sorted(missing)} at the last step {step}")
    return metrics


def _finite(text: str | None) -> float | None:
    """A CSV cell as a number; None when empty or not finite (results.json is strict JSON)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def thin(points: list, limit: int = CURVE_POINTS) -> list:
    """At most `limit` of `points`, evenly spaced, the first and the last kept; all of them when they fit."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    return [points[index] for index in sorted({round(k * last / (limit - 1)) for k in range(limit)})]


def read_curve(run_dir: Path) -> dict:
    """How a run's training went, for the convergence report: {"loss": [[step, loss], ...] from
    metrics.csv (at most CURVE_POINTS, `thin`), "eval": {benchmark name: [[step, accuracy], ...]}
    from eval.csv (every evaluation: one per benchmark at the end, more when run.eval_every is set)}.

    A step logged twice (a resumed training repeats the steps after its checkpoint) keeps its last
    row; a loss or accuracy that is not a finite number is stored as null.
    """
    loss: dict[int, float | None] = {}
    for row in read_csv(run_dir / "metrics.csv"):
        loss[int(row["step"])] = _finite(row.get("loss"))
    accuracy: dict[str, dict[int, float | None]] = {}
    for row in read_csv(run_dir / "eval.csv"):
        if row.get("accuracy") not in ("", None):  # a benchmark without pair accuracy (IJB) has none
            accuracy.setdefault(row["benchmark"], {})[int(row["step"])] = _finite(row["accuracy"])
    return {"loss": thin([[step, value] for step, value in sorted(loss.items())]),
            "eval": {name: [[step, value] for step, value in sorted(points.items())]
                     for name, points in sorted(accuracy.items())}}


# -- the experiments ----------------------------------------------------------------------
@dataclass
class Outcome:
    experiment: str
    wall_seconds: float
    trained: int
    tested: int
    failed: list[str]
    undecided: list[str]  # rows without a result (every candidate or run failed)


class Reproduction:
    """Runs experiments of a plan into `out_dir` (module doc); `execute` replaces the subprocesses in tests."""

    def __init__(self, plan: Plan, experiments: dict[str, Experiment], out_dir: str | os.PathLike,
                 execute: Executor | None = None, log: Callable[[str], None] = print):
        self.plan, self.experiments = plan, experiments
        self.out_dir = Path(out_dir)
        self.store = ResultStore(self.out_dir / "results.json", plan)
        self.execute = execute or SubprocessExecutor(plan)
        self.log = log
        self.failed_now: set[str] = set()  # failed in this invocation: retried by the next one, not this one

    # -- rows -----------------------------------------------------------------------------
    def row(self, key: str) -> Row:
        experiment, _, name = key.partition("/")
        return self.experiments[experiment].row(name)

    def candidates(self, key: str) -> list[dict] | None:
        """The row's candidate settings; None while the row it builds on is undecided."""
        row = self.row(key)
        base: dict = {}
        if row.builds_on is not None:
            chosen = self.chosen(row.builds_on)
            if chosen is None:
                return None
            base = chosen
        return [{**base, **row.overrides, **point} for point in row.grid]

    def selection_runs(self, key: str) -> list[RunSpec]:
        candidates = self.candidates(key) or []
        return [run_spec(self.plan, settings, self.plan.seeds[0]) for settings in candidates]

    def chosen(self, key: str) -> dict | None:
        """The row's setting: its only candidate, or the validation choice once every candidate is trained."""
        candidates = self.candidates(key)
        if candidates is None:
            return None
        if len(candidates) == 1:
            return candidates[0]
        runs = self.selection_runs(key)
        records = [self.store.run(run.id) for run in runs]
        if any(not run_finished(r) and run.id not in self.failed_now for run, r in zip(runs, records)):
            return None
        scores = [val_score(r) if run_finished(r) else None for r in records]
        index = choose(scores)
        if index is None:
            return None
        return candidates[index]

    def final_runs(self, key: str) -> list[RunSpec]:
        chosen = self.chosen(key)
        return [] if chosen is None else [run_spec(self.plan, chosen, seed) for seed in self.plan.seeds]

    def _needed_rows(self, experiment: str) -> list[tuple[str, bool]]:
        """(row key, whether its final runs are wanted): the experiment's rows and, for their
        choices only, the rows they build on (transitively, across experiments)."""
        needed: dict[str, bool] = {}
        stack = [(f"{experiment}/{row.name}", True) for row in self.experiments[experiment].rows]
        while stack:
            key, final = stack.pop()
            needed[key] = needed.get(key, False) or final
            builds_on = self.row(key).builds_on
            if builds_on is not None and builds_on not in needed:
                stack.append((builds_on, False))
        return list(needed.items())

    def pending(self, experiment: str) -> list[Task]:
        """The tasks that can start now."""
        tasks: dict[str, Task] = {}

        def want(run: RunSpec, train: bool, test: bool) -> None:
            if run.id in self.failed_now or not (train or test):
                return
            previous = tasks.get(run.id)
            if previous is not None:
                train, test = train or previous.train, test or previous.test
            tasks[run.id] = Task(run, train, test)

        for key, final in self._needed_rows(experiment):
            candidates = self.candidates(key)
            if candidates is None:
                continue
            for settings in candidates:
                check_settings(self.plan, settings)
            if len(candidates) > 1:
                for run in self.selection_runs(key):
                    want(run, not run_finished(self.store.run(run.id)), False)
            if final:
                for run in self.final_runs(key):
                    record = self.store.run(run.id)
                    train = not run_finished(record)
                    want(run, train, train or not tested(record))
        return list(tasks.values())

    # -- running --------------------------------------------------------------------------
    def run_dir(self, run: RunSpec) -> Path:
        return self.out_dir / "runs" / run.id

    def _execute(self, task: Task, slots: queue.Queue) -> tuple[Task, dict]:
        slot = slots.get()
        try:
            return task, self.execute(task, self.run_dir(task.run), slot)
        except Exception as err:  # a broken run must not take the others down
            step = "train" if task.train else "test_eval"
            return task, {"run_dir": str(self.run_dir(task.run)),
                          step: {"status": "failed", "error": f"{type(err).__name__}: {err}"}}
        finally:
            slots.put(slot)

    def run(self, experiment: str, command: list[str] | None = None) -> Outcome:
        start = time.perf_counter()
        trained = tested_count = 0
        failed: list[str] = []
        while True:
            tasks = self.pending(experiment)
            if not tasks:
                break
            slots: queue.Queue = queue.Queue()
            for slot in range(self.plan.jobs):
                slots.put(slot)
            self.log(f"{experiment}: {len(tasks)} run(s) to {'train' if any(t.train for t in tasks) else 'test'} "
                     f"({self.plan.jobs} at a time)")
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.plan.jobs) as pool:
                futures = [pool.submit(self._execute, task, slots) for task in tasks]
                for future in concurrent.futures.as_completed(futures):
                    task, fields = future.result()
                    config = config_to_dict(load_config([self.plan.train_config],
                                                        train_overrides(self.plan, task.run, self.run_dir(task.run))))
                    self.store.update_run(task.run, fields, config)
                    record = self.store.run(task.run.id)
                    ok = (not task.train or run_finished(record)) and (not task.test or tested(record))
                    trained += task.train and run_finished(record)
                    tested_count += task.test and tested(record)
                    if not ok:
                        self.failed_now.add(task.run.id)
                        failed.append(task.run.id)
                    self.log(self._describe(task, record, ok))
        outcome = Outcome(experiment, time.perf_counter() - start, trained, tested_count, failed,
                          [f"{experiment}/{row.name}" for row in self.experiments[experiment].rows
                           if len([r for r in self.final_runs(f"{experiment}/{row.name}")
                                   if tested(self.store.run(r.id))]) == 0])
        self._store_rows(experiment)
        history = self.store.data["experiments"].get(experiment, {"invocations": []})
        history["invocations"].append({"finished": now(), "wall_seconds": outcome.wall_seconds,
                                       "trained": trained, "tested": tested_count, "failed": failed,
                                       "jobs": self.plan.jobs, "command": command})
        self.store.set("experiments", experiment, history)
        return outcome

    def _describe(self, task: Task, record: dict, ok: bool) -> str:
        what = "+".join(step for step, wanted in (("train", task.train), ("test", task.test)) if wanted)
        if not ok:
            error = (record.get("test_eval") or {}).get("error") or (record.get("train") or {}).get("error") or ""
            return f"  FAILED {what} {task.run.id}: {error.strip().splitlines()[-1] if error.strip() else ''}"
        score, seen = val_score(record), seen_score(record)
        seconds = sum((record.get(step) or {}).get("seconds", 0.0)
                      for step, wanted in (("train", task.train), ("test_eval", task.test)) if wanted)
        return (f"  done {what} {task.run.id} in {seconds:.0f} s"
                + (f", val accuracy {100 * score:.2f} %" if score is not None else "")
                + (f", seen (training identities) {100 * seen:.2f} %" if seen is not None else ""))

    def _store_rows(self, experiment: str) -> None:
        """Each row's candidates, validation scores, choice and final runs, for the report and the reader."""
        for row in self.experiments[experiment].rows:
            key = f"{experiment}/{row.name}"
            candidates = self.candidates(key) or []
            runs = self.selection_runs(key) if len(candidates) > 1 else []
            chosen = self.chosen(key)
            self.store.set("rows", key, {
                "label": row.label,
                "candidates": [{"settings": run.settings, "run": run.id, "val_score": val_score(self.store.run(run.id))}
                               for run in runs],
                # the chosen setting as the row and its grid spell it, and as the run identity keeps it
                "setting": chosen,
                "chosen": None if chosen is None else run_spec(self.plan, chosen, self.plan.seeds[0]).settings,
                "final_runs": [run.id for run in self.final_runs(key)],
            })
