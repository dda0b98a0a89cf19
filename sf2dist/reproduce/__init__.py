"""`make reproduce`: the paper's loss comparison, ablation and label-noise experiments on held-out identities.

- `plan`: profiles (configs/reproduce/<profile>.yaml), the three experiments as rows of
  config overrides, and run identities shared between rows and experiments;
- `runner`: hyper-parameter selection on the validation identities, final runs with every
  seed evaluated on the test identities, each training's seen-pair accuracy and curves,
  subprocess launching, the resumable results.json;
- `report`: mean ± std over seeds, paired per-seed differences with their 90 % interval,
  how the final runs trained (convergence), tables, plots and the sections of docs/results.md;
- `paper`: the paper's own figures (Tables 2, 5, 6) and claims, with their source.

`launch/reproduce.py` is the command line.
"""
from sf2dist.reproduce.plan import (
    EXPERIMENTS,
    LOSSES,
    Experiment,
    Plan,
    PlanError,
    Row,
    RunSpec,
    build_experiments,
    load_plan,
)
from sf2dist.reproduce.runner import Reproduction, ResultStore, SubprocessExecutor, Task, choose

__all__ = ["EXPERIMENTS", "LOSSES", "Experiment", "Plan", "PlanError", "Reproduction", "ResultStore", "Row",
           "RunSpec", "SubprocessExecutor", "Task", "build_experiments", "choose", "load_plan"]
