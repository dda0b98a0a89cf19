"""`make reproduce`: the paper's loss comparison, ablation and label-noise experiments on held-out identities.

- `plan`: profiles (configs/reproduce/<profile>.yaml), the three experiments as rows of
  config overrides, and run identities shared between rows and experiments;
- `runner`: hyper-parameter selection on the validation identities, final runs with every
  seed evaluated on the test identities, subprocess launching, the resumable results.json;
- `report`: mean ± std over seeds, differences against the seed spread, tables, plots and
  the sections of docs/results.md;
- `paper`: the paper's claims and quoted figures, with their sources.

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
