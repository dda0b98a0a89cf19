"""What `launch/reproduce.py` trains: profiles (plan files), the three experiments, run identities.

A *plan* (`configs/reproduce/<profile>.yaml`) names the trainer config every run starts
from (`train_config`, an ordinary `launch/train.py` config), the data (an open-set benchmark
that `sf2dist.data.openset` generates when missing, or explicit paths), the seeds, how runs
are launched (ranks per run, threads, parallel jobs, GPUs) and the hyper-parameter grids.
Besides the validation and test benchmarks, the data may name *seen* pair sets: pairs of the
training identities' own training images (the open-set benchmark's `seen.bin`), which every
training evaluates beside validation to show how well it fits the identities it trains on;
they never choose anything.

An *experiment* is a list of rows. A row is a set of config overrides (`section.key: value`),
a grid of points to choose from on the validation benchmarks, and optionally the row whose
chosen setting it starts from (`builds_on`): the ablation's rows build on each other, the
noise rows on the losses experiment's choice for their loss. A row's setting is
`{**chosen setting of builds_on, **overrides, **grid point}`.

A *run* is one training: a setting and a seed. Its identity (`RunSpec.id`) is derived from
the setting with every override equal to the trainer config's own value removed, so the
same training asked for by two rows or two experiments (the noise experiment at ratio 0
and the losses experiment; a chosen grid point at the first seed and the row's final run
with that seed) is one run, trained once.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sf2dist.config import ConfigError, config_to_dict, load_config
from sf2dist.data.openset import OpenSetSpec

EXPERIMENTS = ("losses", "ablation", "noise")
PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "reproduce"

# The losses of the paper's Table 5, as overrides of the trainer config. "softmax" is the
# normalised softmax (cosine logits scaled by s, no margin): sf2dist's softmax head has no
# unnormalised, biased variant.
LOSSES: dict[str, dict[str, Any]] = {
    "sphereface2-C": {"head.type": "sphereface2", "head.margin": "C"},
    "sphereface2-A": {"head.type": "sphereface2", "head.margin": "A"},
    "sphereface2-M": {"head.type": "sphereface2", "head.margin": "M"},
    "cosface": {"head.type": "partial_fc", "head.margin": "cosface"},
    "arcface": {"head.type": "partial_fc", "head.margin": "arcface"},
    "sphereface": {"head.type": "partial_fc", "head.margin": "sphereface"},
    "softmax": {"head.type": "partial_fc", "head.margin": "cosface", "head.m": 0.0},
}
# The ablation's rows whose values come from the plan's `ablation` grids, in order.
ABLATION_TUNED = ("balance-tuned", "mining", "margin", "adjustment")


class PlanError(ValueError):
    """A plan file (or an option that changes it) that cannot be used; the message says which and where."""


@dataclass(frozen=True)
class Row:
    """One row of an experiment's table (module doc)."""

    name: str
    label: str  # as the table shows it
    overrides: Mapping[str, Any] = field(default_factory=dict)
    grid: tuple[Mapping[str, Any], ...] = ({},)
    builds_on: str | None = None  # "experiment/row" whose chosen setting this row starts from
    reference: str | None = None  # row of the same experiment that differences are taken against
    group: str | None = None  # rows of one group share a table line (noise: the ratio)

    @property
    def needs_selection(self) -> bool:
        return len(self.grid) > 1


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"experiment {self.name} has no row {name!r}")


@dataclass(frozen=True)
class Plan:
    """A profile of `launch/reproduce.py`, read from its plan file (module doc)."""

    name: str
    path: Path
    train_config: Path
    train: str  # shard directory
    val: tuple[str, ...]  # benchmarks hyper-parameters are chosen on
    test: tuple[str, ...]  # benchmarks the tables report
    seen: tuple[str, ...]  # pairs of training identities: evaluated with val, never used to choose (module doc)
    openset: OpenSetSpec | None  # generated into data_root when missing
    data_root: str | None
    seeds: tuple[int, ...]
    nproc: int
    threads: int
    jobs: int
    devices: tuple[str, ...]
    eval_device: str
    eval_batch_size: int
    losses: dict[str, tuple[dict, ...]]
    ablation: dict[str, tuple[dict, ...]]
    noise_losses: tuple[str, ...]
    noise_ratios: tuple[float, ...]
    base: dict = field(repr=False, compare=False, default_factory=dict)  # the resolved trainer config

    def fingerprint(self) -> dict:
        """What every stored run depends on: a results file made under another fingerprint is refused."""
        base = {k: v for k, v in self.base.items() if k not in ("run", "logging")}
        return {"train_config": base, "train": self.train, "val": list(self.val), "test": list(self.test),
                "seen": list(self.seen), "openset": None if self.openset is None else self.openset.source()}


# -- plan files ---------------------------------------------------------------------------
_PLAN_KEYS = {"train_config", "data", "seeds", "nproc", "threads", "jobs", "devices", "eval", "losses", "ablation",
              "noise"}


def _points(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, dict) for p in value):
        raise PlanError(f"{where}: expected a non-empty list of mappings of config overrides, got {value!r}")
    for point in value:
        for key in point:
            if not isinstance(key, str) or key.count(".") < 1:
                raise PlanError(f"{where}: {key!r} is not a dotted config key such as head.m")
    return tuple(dict(p) for p in value)


def _require(mapping: Mapping, key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise PlanError(f"{where}: missing {key!r}")
    value = mapping[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PlanError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def profile_path(profile: str) -> Path:
    """The plan file of a profile name (`cpu`, `quick`, `paper`, `tiny`: any plan in PROFILES_DIR) or a path to one."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if not p.stem.endswith("_train"))
        raise PlanError(f"no profile {profile!r}: {path} does not exist; known profiles: {', '.join(known)}")
    return path


def load_plan(profile: str, *, data_root: str | None = None, seeds: tuple[int, ...] | None = None,
              jobs: int | None = None, nproc: int | None = None) -> Plan:
    """Read and check a plan; `data_root`, `seeds`, `jobs` and `nproc` replace the file's values."""
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise PlanError(f"cannot read plan {path}: {err}") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise PlanError(f"{path}: unknown keys {unknown}; known: {sorted(_PLAN_KEYS)}")
    where = str(path)
    train_config = path.parent / _require(raw, "train_config", str, where)
    try:
        base = config_to_dict(load_config([train_config]))
    except ConfigError as err:
        raise PlanError(f"{where}: train_config {train_config}: {err}") from None

    data = _require(raw, "data", dict, where)
    openset = None
    if "openset" in data:
        options = dict(_require(data, "openset", dict, f"{where}: data"))
        out = options.pop("out", None)
        root = data_root or out
        if not root:
            raise PlanError(f"{where}: data.openset needs out: (the directory to generate into)")
        try:
            openset = OpenSetSpec(**options)
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: data.openset: {err}") from None
        train, val, test = f"{root}/train", (f"{root}/val.bin",), (f"{root}/test.bin", f"{root}/test_templates")
        seen = (f"{root}/seen.bin",)
    else:
        if data_root is not None:
            raise PlanError(f"--data applies to plans that generate their data (data.openset); {where} names its "
                            f"data paths instead")
        root = None
        train = _require(data, "train", str, f"{where}: data")
        val = tuple(_require(data, "val", list, f"{where}: data"))
        test = tuple(_require(data, "test", list, f"{where}: data"))
        if not isinstance(data.get("seen") or [], list):
            raise PlanError(f"{where}: data: seen must be a list of pair sets, got {data['seen']!r}")
        seen = tuple(data.get("seen") or ())  # optional: pairs of training identities, where the data has any
    if not val or not test:
        raise PlanError(f"{where}: data needs at least one validation and one test benchmark")
    roles = (("a validation", val), ("a test", test), ("a seen (training-identity)", seen))
    for index, (first, paths) in enumerate(roles):
        for second, others in roles[index + 1:]:
            overlap = {Path(p).resolve() for p in paths} & {Path(p).resolve() for p in others}
            if overlap:
                raise PlanError(f"{where}: {sorted(map(str, overlap))} is both {first} and {second} benchmark")

    plan_seeds = tuple(seeds) if seeds else tuple(_require(raw, "seeds", list, where))
    if not plan_seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in plan_seeds) \
            or len(set(plan_seeds)) != len(plan_seeds):
        raise PlanError(f"seeds must be distinct integers, got {list(plan_seeds)}")
    evaluation = raw.get("eval", {}) or {}
    losses = {name: _points(points, f"{where}: losses.{name}") for name, points in
              _require(raw, "losses", dict, where).items()}
    unknown_losses = sorted(set(losses) - set(LOSSES))
    if unknown_losses:
        raise PlanError(f"{where}: losses: unknown {unknown_losses}; known: {', '.join(LOSSES)}")
    sizes = {name: len(points) for name, points in losses.items()}
    if len(set(sizes.values())) > 1 or max(sizes.values()) > 4:
        raise PlanError(f"{where}: every loss needs a grid of the same size, at most 4 points; got {sizes}")
    ablation = {name: _points(points, f"{where}: ablation.{name}") for name, points in
                _require(raw, "ablation", dict, where).items()}
    if set(ablation) != set(ABLATION_TUNED):
        raise PlanError(f"{where}: ablation needs exactly the rows {list(ABLATION_TUNED)}, got {sorted(ablation)}")
    noise = _require(raw, "noise", dict, where)
    noise_losses = tuple(_require(noise, "losses", list, f"{where}: noise"))
    missing = [loss for loss in noise_losses if loss not in losses]
    if missing:
        raise PlanError(f"{where}: noise.losses {missing} have no grid under losses (their setting is chosen there)")
    ratios = tuple(float(r) for r in _require(noise, "ratios", list, f"{where}: noise"))
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise PlanError(f"{where}: noise.ratios must be in [0, 1), got {list(ratios)}")

    plan = Plan(
        name=path.stem, path=path, train_config=train_config, train=train, val=tuple(map(str, val)),
        test=tuple(map(str, test)), seen=tuple(map(str, seen)), openset=openset, data_root=root, seeds=plan_seeds,
        nproc=nproc or _require(raw, "nproc", int, where), threads=_require(raw, "threads", int, where),
        jobs=jobs or _require(raw, "jobs", int, where), devices=tuple(str(d) for d in raw.get("devices", []) or []),
        eval_device=str(evaluation.get("device", "cpu")), eval_batch_size=int(evaluation.get("batch_size", 256)),
        losses=losses, ablation=ablation, noise_losses=noise_losses, noise_ratios=ratios, base=base,
    )
    if plan.nproc < 1 or plan.threads < 1 or plan.jobs < 1:
        raise PlanError(f"{where}: nproc, threads and jobs must be at least 1, got {plan.nproc}, {plan.threads}, "
                        f"{plan.jobs}")
    if plan.devices and len(plan.devices) < plan.jobs * plan.nproc:
        raise PlanError(f"{where}: {plan.jobs} jobs of {plan.nproc} rank(s) need {plan.jobs * plan.nproc} devices, "
                        f"the plan lists {len(plan.devices)}")
    return plan


# -- experiments --------------------------------------------------------------------------
def build_experiments(plan: Plan, num_classes: int) -> dict[str, Experiment]:
    """The three experiments of `plan`; `num_classes` (of the training data) sets the balanced lambda."""
    sf2 = "sphereface2-C" if "sphereface2-C" in plan.losses else None  # every difference is taken against it
    loss_rows = tuple(
        Row(name=loss, label=loss, overrides=LOSSES[loss], grid=points, reference=None if loss == sf2 else sf2)
        for loss, points in plan.losses.items()
    )
    balanced = (num_classes - 1) / num_classes
    naive = {"head.type": "sphereface2", "head.margin": "C", "head.alpha": 0.5, "head.r": 1.0, "head.m": 0.0,
             "head.t": 1.0}
    ablation_rows = (
        Row("naive", "naive binary loss (λ 0.5, r 1, m 0, t 1)", naive),
        Row("balance", f"+ positive/negative balance (λ = (K−1)/K = {balanced:.4f})", {"head.alpha": balanced},
            builds_on="ablation/naive", reference="naive"),
        # compared with the λ = (K−1)/K row, as the paper's Table 2 (74.49 -> 78.03 %)
        Row("balance-tuned", "+ positive/negative balance (λ tuned)", grid=plan.ablation["balance-tuned"],
            builds_on="ablation/naive", reference="balance"),
        Row("mining", "+ easy/hard mining (r)", grid=plan.ablation["mining"], builds_on="ablation/balance-tuned",
            reference="balance-tuned"),
        Row("margin", "+ angular margin (m)", grid=plan.ablation["margin"], builds_on="ablation/mining",
            reference="mining"),
        Row("adjustment", "+ similarity adjustment (t)", grid=plan.ablation["adjustment"],
            builds_on="ablation/margin", reference="margin"),
    )
    noise_rows = tuple(
        Row(name=f"{loss}@{ratio:g}", label=loss, overrides={"data.label_noise": ratio}, builds_on=f"losses/{loss}",
            reference=None if loss == sf2 or sf2 not in plan.noise_losses else f"{sf2}@{ratio:g}",
            group=f"{ratio:g}")
        for ratio in plan.noise_ratios for loss in plan.noise_losses
    )
    return {
        "losses": Experiment("losses", "Loss comparison (paper Table 5)", loss_rows),
        "ablation": Experiment("ablation", "SphereFace2 ablation (paper Table 2)", ablation_rows),
        "noise": Experiment("noise", "Label noise (paper Fig. 10, left)", noise_rows),
    }


# -- runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training: the overrides of the trainer config that make its setting, and its seed."""

    id: str
    overrides: tuple[tuple[str, Any], ...]  # sorted; values equal to the trainer config's left out
    seed: int

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)


def _same(a: Any, b: Any) -> bool:
    """Equal values, an int equal to a float included (head.r 30 is the config's 30.0)."""
    return _number_key(a) == _number_key(b) and isinstance(a, bool) == isinstance(b, bool)


def canonical_settings(plan: Plan, settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Settings without the overrides that equal the trainer config's value, sorted by key."""
    kept = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        base_section = plan.base.get(section, {})
        if "." not in name and name in base_section and _same(base_section[name], value):
            continue
        kept[key] = value
    return tuple(sorted(kept.items()))


def _number_key(value: Any) -> Any:
    """Numbers as floats in the identity: head.r 30 and 30.0 are one setting."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def run_spec(plan: Plan, settings: Mapping[str, Any], seed: int) -> RunSpec:
    overrides = canonical_settings(plan, settings)
    digest = hashlib.sha1(json.dumps([[k, _number_key(v)] for k, v in overrides], sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    values = dict(overrides)
    head_type = values.get("head.type", plan.base["head"]["type"])
    margin = values.get("head.margin", plan.base["head"]["margin"])
    label = re.sub(r"[^A-Za-z0-9_.-]", "", f"{head_type}-{margin}" if margin else head_type)
    return RunSpec(id=f"{label}-{digest}-seed{seed}", overrides=overrides, seed=seed)


def format_value(value: Any) -> str:
    """A value as `--set key=VALUE` writes it (YAML that load_config reads back to the same value)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_./-]+", value) and \
            yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def set_arguments(settings: Mapping[str, Any]) -> list[str]:
    """`section.key=value` strings for `load_config` overrides and `--set`."""
    return [f"{key}={format_value(value)}" for key, value in settings.items()]


def check_settings(plan: Plan, settings: Mapping[str, Any]) -> None:
    """Raise PlanError unless the trainer config with these overrides is valid (before any training)."""
    try:
        load_config([plan.train_config], set_arguments(settings))
    except ConfigError as err:
        raise PlanError(f"setting {dict(settings)} on {plan.train_config}: {err}") from None
