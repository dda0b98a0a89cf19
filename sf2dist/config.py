"""The typed training configuration: dataclasses, YAML composition, `--set` overrides, checks.

A run is described by YAML files composed in order (later files win, mappings merge deeply,
lists are replaced) and then by `section.key=value` overrides from the command line. Every
value is checked against its field's type and choices as it arrives, so an error names the
dotted key and the file (or `--set`) it came from; `validate` then checks the combinations.
This module does not import torch: reading a config must be cheap and must work anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import math
import re
import sys
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Margin names of each head (kept here rather than imported: the heads import torch).
MARGINS = {"sphereface2": ("C", "A", "M"), "partial_fc": ("cosface", "arcface", "sphereface")}


class ConfigError(ValueError):
    """A config value, file or override that cannot be used; the message says which and where."""


def _choices(*values: Any) -> dict[str, tuple[Any, ...]]:
    return {"choices": values}


@dataclass
class RunConfig:
    """Where the run lives, how long it trains, how often it logs, evaluates and saves."""

    dir: str = "runs/default"  # run directory: config.yaml, metrics.csv, eval.csv, status.json, checkpoints/, plots
    seed: int = 0  # initial weights, data order, flips and label noise follow it
    epochs: int = 1  # passes over the training set (unless run.max_steps is set)
    max_steps: int | None = None  # optimizer steps; when set, training stops there (may cut an epoch)
    log_every: int = 10  # steps between metric rows / progress-bar updates (or plain lines: see logging.progress)
    eval_every: int = 0  # steps between verification evals; 0 = only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # the newest this many checkpoints are kept, older ones deleted
    # true: continue from the run directory's newest checkpoint if there is one (keys not marked
    # resume-free must match its config, or be named by --allow-config-change); false: start a new run,
    # refused if the directory already holds checkpoints (use another run.dir)
    resume: bool = True
    timeout_s: int = 1800  # collective time-out: how long a rank waits for a stuck or dead peer
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops


@dataclass
class DataConfig:
    """The training shards and how they are batched."""

    # shard directory (with manifest.json; random access), or shards to stream sequentially: a webdataset URL
    # pattern (http://host/train/shard-{000000..000099}.tar), URLs or pipe:COMMANDs joined with ::, .tar paths
    # (docs/data.md, "Streaming shards"); required by the trainer
    train: str = ""
    num_classes: int | None = None  # if set, must match the manifest (null: taken from it)
    # images per rank per micro-batch (global batch: ranks x this x optim.accumulation_steps); with
    # data.global_batch_size set, the most a rank takes per micro-batch (its memory cap)
    batch_size: int = 128
    # images per optimizer step over all ranks, kept when the number of ranks W changes (an elastic restart,
    # a requeue onto other nodes, a rerun on fewer GPUs); null: data.batch_size x W x optim.accumulation_steps,
    # which changes with W. When set, optim.accumulation_steps stays 1 and on W ranks the step is split as
    # accumulation A = the smallest A >= ceil(global / (W x data.batch_size)) for which W x A divides global,
    # per-rank micro-batch = global / (W x A); W must divide it (refused otherwise, with values that work), and
    # head.step fused needs A = 1. A resume may set it to the checkpoint's images per step without
    # --allow-config-change (and then change data.batch_size too): no step's images change
    global_batch_size: int | None = None
    num_workers: int = 4  # decoding processes per rank (0: decode in the training process)
    # fraction of each class's labels replaced by other classes on purpose (noise experiments), in [0, 1):
    # exactly round(p n_c) per class, fixed by run.seed, the same in every epoch and on any number of ranks
    label_noise: float = 0.0
    flip: bool = True  # random horizontal flips
    # streamed shards: each rank mixes its samples in blocks of this many (held encoded in memory, about
    # 5-10 KB each for 112x112 faces); a directory ignores it
    shuffle_buffer: int = 10000
    # streamed shards: where manifest.json is (a URL, pipe:COMMAND or path); "": beside the first shard of
    # data.train (its file name replaced by manifest.json)
    manifest: str = ""
    # streamed shards: how often a shard (or the manifest) that fails to read is read again, after 1, 2, 4 ...
    # s, before the run stops with an error naming its URL (it never trains on fewer samples)
    retries: int = 3


@dataclass
class ModelConfig:
    """The replicated backbone."""

    # a registered backbone: iresnet18/50/100, sfnet4/20/36/64, mobilefacenet, smallcnn, and arcface_torch's
    # networks by its names (r18/34/50/100/200, mbf, mbf_large, vit_t/s/b/l/h and the WebFace42M variants)
    backbone: str = "iresnet50"
    embedding_dim: int = 512  # width of the embedding the head classifies
    # extra backbone constructor arguments, checked against the backbone's own (e.g. smallcnn: width,
    # input_pool; sfnet: norm); embedding_dim and input_size are set by sf2dist
    kwargs: dict = field(default_factory=dict)
    # a new run's starting backbone: a state_dict file of model.backbone (with model.embedding_dim,
    # model.kwargs and the data's image size) such as arcface_torch's backbone.pth (a DDP "module." prefix
    # is dropped), or an sf2dist checkpoint (step directory or model.pt), of which only the backbone is
    # taken; the head starts new. null = random initialisation. A resume loads its checkpoint and never
    # reads this file
    init_from: str | None = None


@dataclass
class HeadConfig:
    """The identity-sharded classifier and its loss."""

    type: str = field(default="sphereface2", metadata=_choices("sphereface2", "partial_fc"))  # the loss family
    # sphereface2: C|A|M (default C); partial_fc: cosface|arcface|sphereface (default cosface; sphereface is
    # A-Softmax, the true class's logit s psi(theta), psi = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi))
    margin: str | None = None
    # margin size; null = the head's default (sphereface2 0.4; partial_fc: cosface 0.4, arcface 0.5,
    # sphereface 1.5, which needs m >= 1)
    m: float | None = None
    alpha: float = 0.7  # sphereface2 only: lambda, the weight of the positive term
    r: float = 40.0  # sphereface2 only: the hypersphere radius (scale of the logits)
    t: float = 3.0  # sphereface2 only: the similarity adjustment g(z) = 2((z+1)/2)^t - 1
    loss_weight: float = 10.0  # sphereface2 only: the loss is multiplied by it
    s: float | None = None  # partial_fc only: logit scale; null = the margin's (cosface, arcface 64; sphereface 30)
    # partial_fc with margin sphereface: "s" normalises the features and scales every logit by s (the default,
    # the variant the SphereFace2 paper compares against); "norm" is the original A-Softmax (SphereFace, 2017):
    # features keep their norm, class j's logit is |x| cos theta_j and the target is the annealed blend
    # |x| (lambda cos theta_y + psi(theta_y)) / (1 + lambda); leave head.s unset then
    feature_scale: str = field(default="s", metadata=_choices("s", "norm"))
    # A-Softmax's lambda at the trainer's step t (resumed with it), feature_scale norm only:
    # lambda = max(lambda_min, lambda_base * (1 + lambda_gamma * t) ** -lambda_power)
    lambda_base: float = 1000.0
    lambda_gamma: float = 0.12  # see head.lambda_base
    lambda_power: float = 1.0  # see head.lambda_base
    lambda_min: float = 5.0  # see head.lambda_base
    sample_rate: float = 1.0  # fraction of each shard's classes in a step's loss, in (0, 1]; batch classes always are
    # sphereface2: "fused" steps the class rows inside the head's forward, chunk by chunk, so the
    # [C, D] weight gradient never exists (SGD only, no accumulation; the rows are left out of
    # gradient clipping); "separate" runs the head's optimizer after the backward
    step: str = field(default="separate", metadata=_choices("separate", "fused"))
    # the dtype the class rows (and their momentum) are kept in; the math is float32 either way.
    # bfloat16 needs step fused (stochastic rounding of the row updates)
    storage: str = field(default="float32", metadata=_choices("float32", "bfloat16"))


@dataclass
class OptimConfig:
    """Optimisers of backbone and head, and the learning-rate schedule they share."""

    name: str = field(default="sgd", metadata=_choices("sgd", "adamw"))  # the optimiser of backbone and head
    lr: float = 0.1  # base learning rate of the backbone and the head, unless optim.backbone_lr or optim.head_lr is set
    head_lr: float | None = None  # base learning rate of the head; null = optim.lr
    # base learning rate of the backbone; null = optim.lr. Fine-tuning from model.init_from: lower than the head's
    backbone_lr: float | None = None
    # the first N optimizer steps train the head only: the backbone's optimizer does not step (its weights
    # stay those of model.init_from; its BatchNorm statistics still follow the data), and the gradient norm
    # that optim.clip_grad_norm clips is the head's
    freeze_backbone_steps: int = 0
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on every weight except the SphereFace2 bias
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr over these steps
    # decay after warm-up: poly (1 - progress)^power, cosine (half a cosine from 1 to 0, as for ViTs), step or constant
    schedule: str = field(default="poly", metadata=_choices("poly", "cosine", "step", "constant"))
    power: float = 2.0  # poly decay exponent
    milestones: list[int] = field(default_factory=list)  # step decay points (optimizer steps)
    gamma: float = 0.1  # step schedule: the learning rate is multiplied by it at each milestone
    clip_grad_norm: float | None = None  # clip the global gradient norm (backbone and head) to this; null = no clipping
    accumulation_steps: int = 1  # micro-batches per optimizer step


@dataclass
class EngineConfig:
    """How the backbone is replicated, on which device, in which precision."""

    type: str = field(default="ddp", metadata=_choices("ddp", "deepspeed"))  # deepspeed: start with torchrun
    zero_stage: int = field(default=1, metadata=_choices(1, 2))  # deepspeed only
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16", "fp16"))  # autocast dtype; fp16 CUDA only
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))  # auto: CUDA when there is one
    # CUDA: false lets cuDNN time and pick its fastest kernels (cudnn.benchmark); true asks torch
    # for deterministic kernels instead (slower), for bitwise resume on a GPU
    deterministic: bool = False


@dataclass
class EvalConfig:
    """Verification during training."""

    # verification pair sets (.bin or pair lists) or IJB-style directories; each is read and checked
    # before the first step
    benchmarks: list[str] = field(default_factory=list)
    batch_size: int = 256  # images per rank per forward
    # sum: f(x) + f(flip x) (default); concat: [f(x), f(flip x)], twice the width, as in the
    # SphereFace LFW protocol; none: f(x)
    flip: str = field(default="sum", metadata=_choices("sum", "concat", "none"))


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.csv and eval.csv."""

    wandb_mode: str = field(default="offline", metadata=_choices("offline", "online", "disabled"))  # wandb's mode
    wandb_project: str = "sf2dist"  # wandb project
    wandb_entity: str | None = None  # wandb team or user; null = wandb's default
    progress: bool = True  # a progress bar on a terminal; false (or stderr not a terminal): a plain line every run.log_every steps


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
# section -> key -> (type, field); resolved once because the annotations are strings.
_FIELDS: dict[str, dict[str, tuple[Any, dataclasses.Field]]] = {
    name: {f.name: (typing.get_type_hints(cls)[f.name], f) for f in dataclasses.fields(cls)}
    for name, cls in SECTIONS.items()
}
# Exponent notation that YAML 1.1 (PyYAML) leaves a string: "1e-3", "5.0e4" (it wants "1.0e-3").
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml11_float(value: Any) -> Any:
    """`value` as a float if it is exponent notation that YAML parsed as a string, else unchanged."""
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()) else value


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def _describe(tp: Any) -> str:
    """Type as a user reads it: 'int', 'float or null', 'list of str', 'mapping'."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list of {_describe(args[0])}"
    return "mapping" if tp is dict else tp.__name__


def _got(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _check_value(value: Any, tp: Any, key: str, source: str, expected: str | None = None) -> Any:
    """`value` converted to `tp` where that is lossless (int -> float, '1e-3' -> float), else ConfigError.

    Exponent notation also becomes a float inside mapping fields (model.kwargs), whose value
    types are unknown here; quoted plain text ('0.1') stays text and is not a float.
    """
    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {expected or _describe(tp)}, got {_got(value)} (from {source})")

    if isinstance(tp, types.UnionType):  # only `X | None` occurs
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check_value(value, inner, key, source, _describe(tp))
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise fail()
        (item_tp,) = typing.get_args(tp)
        return [_check_value(item, item_tp, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise fail()
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{key}: keys must be strings, got {_got(bad[0])} (from {source})")
        return {k: _yaml11_float(v) for k, v in value.items()}
    if tp is float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r} (from {source})")
        return float(value)
    if tp is int and isinstance(value, bool):  # bool is an int subclass, never a count
        raise fail()
    if not isinstance(value, tp):
        raise fail()
    return value


def _check_layer(layer: Mapping, source: str) -> dict[str, dict[str, Any]]:
    """One file's (or override's) sections checked key by key; values converted to field types."""
    checked: dict[str, dict[str, Any]] = {}
    for section, values in layer.items():
        if section not in _FIELDS:
            raise ConfigError(f"unknown section {section!r} in {source}; "
                              f"{_suggest(str(section), [*_FIELDS, 'include'])}")
        if values is None:  # a section whose keys are all commented out
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a mapping of keys, got {_got(values)} (from {source})")
        fields = _FIELDS[section]
        checked[section] = {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(f"unknown key {dotted!r} in {source}; "
                                  f"{_suggest(dotted, [f'{section}.{k}' for k in fields])}")
            tp, f = fields[key]
            value = _check_value(value, tp, dotted, source)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(map(repr, choices))} (from {source})")
            checked[section][key] = value
    return checked


def _merge(base: dict, update: Mapping) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_error(source: str, exc: yaml.YAMLError) -> str:
    """'FILE, line L, column C: not valid YAML: problem (context)' and the line with a caret under the spot."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:  # a YAMLError without a position (rare: a reader error on the whole stream)
        return f"{source}: not valid YAML: {exc}"
    at_end = mark.buffer is not None and not mark.buffer[mark.pointer:].strip("\0 \n")
    where = f"line {mark.line + 1}, column {mark.column + 1}" + (" (the end of the file)" if at_end else "")
    text = f"{source}, {where}: not valid YAML: {exc.problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    snippet = mark.get_snippet(indent=4, max_length=100)
    if context_mark is not None and (not snippet or not snippet.split("\n")[0].strip()):
        snippet = context_mark.get_snippet(indent=4, max_length=100)  # the end of the file: show where it began
    if "\t" in str(exc.problem or "") or "\t" in (snippet or ""):
        text += "; YAML indents with spaces, not tabs"
    return text + (f"\n{snippet}" if snippet else "")


def _read_layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """(mapping, source) for each file in the order they apply: a file's includes, then itself."""
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: include cycle: {chain}")
    included_from = f" (included from {stack[-1]})" if stack else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{included_from}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}{included_from}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(str(path), exc)) from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    data = dict(data)
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        raise ConfigError(f"include: expected a path or a list of paths, got {_got(includes)} (from {path})")
    layers: list[tuple[dict, str]] = []
    for include in includes:
        layers += _read_layers(path.parent / include, (*stack, resolved))
    return layers + [(data, str(path))]


def _parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key[.subkey...]=value' -> (path, value); value parsed as YAML."""
    source = f"--set {text}"
    dotted, sep, raw = text.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"malformed override {text!r} (from --set): expected section.key=value, "
                          f"e.g. optim.lr=0.05")
    field_tp = _FIELDS.get(parts[0], {}).get(parts[1], (None,))[0]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if len(parts) == 2 and field_tp in (str, str | None):
            return parts, raw.strip()  # a text field takes the text (`run.dir=runs/a: b`)
        mark = getattr(exc, "problem_mark", None)
        where = f" at character {mark.column + 1}" if mark is not None and mark.line == 0 else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{dotted}: value {raw!r} is not valid YAML (from {source}): {problem}{where}") from None
    scalar = isinstance(value, (bool, int, float)) or (value is None and field_tp is str)
    if len(parts) == 2 and field_tp in (str, str | None) and scalar:
        # `run.dir=2024`, `data.train=on` or `data.train=` mean the text, not a YAML number, bool or null.
        value = raw.strip()
    return parts, value


def _set_nested(mapping: dict, keys: list[str], value: Any) -> dict:
    """A copy of `mapping` with mapping[k0][k1]... = value, creating inner mappings as needed."""
    updated = dict(mapping)
    head, *rest = keys
    inner = updated.get(head)
    updated[head] = _set_nested(inner if isinstance(inner, dict) else {}, rest, value) if rest else value
    return updated


@dataclass
class ResolvedConfig:
    """A loaded config with where each key came from and what looks like a mistake but is allowed."""

    config: Config
    sources: dict[str, str]  # dotted key -> the file or `--set` that set it last; absent: the default
    warnings: list[str]  # keys that have no effect or mean something else than where they were set


def resolve_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> ResolvedConfig:
    """Defaults, then each YAML file in order, then each `section.key=value` override; validated.

    An override of a nested key (`model.kwargs.dropout=0.1`) sets that one entry; an override
    of a field (`model.kwargs={}`) replaces the whole value.
    """
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    head_type_when_set: dict[str, str] = {}  # head key -> head.type in force in the layer that set it

    def record(section: str, keys: Sequence[str], source: str) -> None:
        sources.update({f"{section}.{key}": source for key in keys})
        if section == "head":
            head_type = merged.get("head", {}).get("type", HeadConfig.type)
            head_type_when_set.update({key: head_type for key in keys})

    for path in paths:
        for layer, source in _read_layers(Path(path)):
            for section, values in _check_layer(layer, source).items():
                merged[section] = _merge(merged.get(section, {}), values)
                record(section, list(values), source)
    for text in overrides:
        source = f"--set {text}"
        (section, key, *subkeys), value = _parse_override(text)
        if subkeys and key in _FIELDS.get(section, {}):
            current = merged.get(section, {}).get(key, getattr(SECTIONS[section](), key))
            if not isinstance(current, dict):
                raise ConfigError(f"{section}.{key} is not a mapping, so {'.'.join([section, key, *subkeys])} "
                                  f"cannot be set (from {source})")
            value = _set_nested(current, subkeys, value)
        checked = _check_layer({section: {key: value}}, source)
        merged.setdefault(section, {})[key] = checked[section][key]  # replaced, not merged
        record(section, [key], source)
    # The --set options are one layer, whatever their order: `--set head.m=0.3 --set head.type=partial_fc`
    # sets m for partial_fc.
    final_head_type = merged.get("head", {}).get("type", HeadConfig.type)
    for text in overrides:
        section, key = _parse_override(text)[0][:2]
        if section == "head":
            head_type_when_set[key] = final_head_type
    cfg = Config(**{name: cls(**merged.get(name, {})) for name, cls in SECTIONS.items()})
    validate(cfg, sources)
    return ResolvedConfig(cfg, sources, _head_warnings(cfg.head, sources, head_type_when_set))


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """The config of `resolve_config(paths, overrides)`."""
    return resolve_config(paths, overrides).config


# The keys each head reads besides head.type, head.margin, head.m and head.sample_rate, which both read.
HEAD_ONLY_KEYS = {
    "sphereface2": ("alpha", "r", "t", "loss_weight", "step", "storage"),
    "partial_fc": ("s", "feature_scale", "lambda_base", "lambda_gamma", "lambda_power", "lambda_min"),
}


def _head_warnings(head: HeadConfig, sources: Mapping[str, str], head_type_when_set: Mapping[str, str]) -> list[str]:
    """Head keys set in a file or --set that the chosen head ignores, or that were meant for another head.

    Defaults are never reported: only what the user wrote can be a mistake.
    """
    warnings = []
    for other, keys in HEAD_ONLY_KEYS.items():
        if other == head.type:
            continue
        for key in keys:
            if f"head.{key}" in sources:
                warnings.append(f"head.{key}={getattr(head, key)} (from {sources[f'head.{key}']}) is not used: it is a "
                                f"{other} setting and head.type is {head.type}; remove it")
    for key in ("margin", "m"):  # both heads read them, each with its own meaning and default
        meant_for = head_type_when_set.get(key)
        if meant_for is not None and meant_for != head.type and getattr(head, key) is not None:
            warnings.append(
                f"head.{key}={getattr(head, key)} (from {sources[f'head.{key}']}) was set for head.type {meant_for}, "
                f"but head.type is {head.type} (from {sources.get('head.type', 'the default')}), which reads it as "
                f"its own {'margin' if key == 'margin' else 'margin size'}; set head.{key} for {head.type} as well, "
                f"or head.{key}=null for {head.type}'s default"
            )
    return warnings


def validate(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Checks that span fields or ranges that types cannot express; raises ConfigError.

    `sources` maps dotted keys to where they were set (load_config passes it) so that the
    message can say which file or override to fix. `data.train` is not required here: the
    trainer checks it, so a config without it can still be loaded, saved and inspected.
    """
    sources = sources or {}

    def fail(key: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: {problem} (from {sources.get(key, 'the default')})")

    def value(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    # None (where a field allows it) means "not set" and is always fine here.
    for key in ("run.epochs", "run.max_steps", "run.log_every", "run.keep_checkpoints", "run.timeout_s",
                "run.max_bad_steps", "data.num_classes", "data.batch_size", "data.global_batch_size",
                "data.shuffle_buffer", "model.embedding_dim", "optim.accumulation_steps", "eval.batch_size"):
        if value(key) is not None and value(key) < 1:
            fail(key, f"must be at least 1, got {value(key)}")
    for key in ("run.eval_every", "run.checkpoint_every", "data.num_workers", "data.retries",
                "optim.warmup_steps", "optim.weight_decay", "optim.freeze_backbone_steps"):
        if value(key) < 0:
            fail(key, f"must not be negative, got {value(key)}")
    for key in ("optim.lr", "optim.head_lr", "optim.backbone_lr", "optim.power", "optim.gamma", "optim.clip_grad_norm"):
        if value(key) is not None and value(key) <= 0:
            fail(key, f"must be positive, got {value(key)}")

    if cfg.data.global_batch_size is not None and cfg.optim.accumulation_steps != 1:
        fail("optim.accumulation_steps", f"is derived from data.global_batch_size={cfg.data.global_batch_size} and "
                                         f"the number of ranks when that is set; leave it at 1 (data.batch_size caps "
                                         f"the images per rank per micro-batch), or set data.global_batch_size=null")
    if "embedding_dim" in cfg.model.kwargs:
        fail("model.kwargs", "must not hold embedding_dim; set model.embedding_dim instead")
    if not 0.0 <= cfg.data.label_noise < 1.0:
        fail("data.label_noise", f"must be in [0, 1), got {cfg.data.label_noise}")
    if not 0.0 < cfg.head.sample_rate <= 1.0:
        fail("head.sample_rate", f"must be in (0, 1], got {cfg.head.sample_rate}")
    if cfg.head.type == "sphereface2" and cfg.head.sample_rate != 1.0 and cfg.optim.name != "sgd":
        fail("head.sample_rate", f"SphereFace2 class sampling ({cfg.head.sample_rate}) steps only the sampled rows "
                                 f"with a row-sparse SGD; it needs optim.name sgd, not {cfg.optim.name!r}")
    if cfg.head.step == "fused":
        if cfg.head.type != "sphereface2":
            fail("head.step", "fused steps the rows of a SphereFace2 head inside its forward; the softmax head "
                              "needs the global normaliser first (use separate)")
        if cfg.optim.name != "sgd":
            fail("head.step", f"fused is an SGD step; it needs optim.name sgd, not {cfg.optim.name!r}")
        if cfg.optim.accumulation_steps != 1:
            fail("head.step", f"fused steps the rows at every forward, so it cannot accumulate "
                              f"{cfg.optim.accumulation_steps} micro-batches; set optim.accumulation_steps 1 or "
                              f"head.step separate")
    if cfg.head.storage == "bfloat16" and cfg.head.step != "fused":
        fail("head.storage", "bfloat16 rows are updated in float32 and stochastically rounded by the fused step; "
                             "set head.step fused as well")
    margins = MARGINS[cfg.head.type]
    if cfg.head.margin is not None and cfg.head.margin not in margins:
        hint = ""
        if cfg.head.margin == "sphereface":
            hint = " (sphereface, A-Softmax, is a margin of the softmax head: set head.type partial_fc)"
        other = [kind for kind, names in MARGINS.items() if cfg.head.margin in names]
        if other and other[0] != cfg.head.type and not hint:  # carried over from a config written for the other head
            hint = (f" ({cfg.head.margin} is a {other[0]} margin); set head.margin={margins[0]} (or another of "
                    f"them), or head.margin=null for {cfg.head.type}'s default")
        fail("head.margin", f"{cfg.head.margin!r} is not a margin of head.type {cfg.head.type}; "
                            f"expected one of {', '.join(margins)}{hint}")
    _validate_head_scale(cfg.head, fail)

    milestones = cfg.optim.milestones
    if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m <= 0 for m in milestones):
        fail("optim.milestones", f"must be positive and strictly increasing, got {milestones}")
    if cfg.optim.schedule == "step" and not milestones:
        fail("optim.milestones", "schedule step needs at least one milestone")
    if cfg.optim.schedule != "step" and milestones:
        fail("optim.milestones", f"only apply to schedule step, but optim.schedule is {cfg.optim.schedule}")

    if cfg.engine.type != "deepspeed" and cfg.engine.zero_stage != 1:
        fail("engine.zero_stage", f"only applies to engine.type deepspeed (engine.type is {cfg.engine.type}); "
                                  f"leave it at 1")
    if cfg.engine.precision == "fp16" and cfg.engine.device == "cpu":
        fail("engine.precision", "fp16 is not available with engine.device cpu (CPUs have no fp16 matrix "
                                 "multiply); use bf16 or fp32")


def _validate_head_scale(head: HeadConfig, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """head.s, head.m of the SphereFace margin, head.feature_scale and the lambda schedule."""
    sphereface = head.type == "partial_fc" and head.margin == "sphereface"
    if head.s is not None and head.s <= 0:
        fail("head.s", f"must be positive, got {head.s}")
    if sphereface and head.m is not None and head.m < 1:
        fail("head.m", f"the sphereface margin needs m >= 1 (psi(theta) is decreasing there), got {head.m}")
    if head.feature_scale == "norm":
        if not sphereface:
            fail("head.feature_scale", f"norm is the original A-Softmax; it needs head.type partial_fc and "
                                       f"head.margin sphereface (got {head.type}, margin {head.margin})")
        if head.s is not None:
            fail("head.s", "feature_scale norm scales each logit by its feature's norm; leave head.s unset")
    if head.lambda_base <= 0:
        fail("head.lambda_base", f"must be positive, got {head.lambda_base}")
    for key in ("lambda_gamma", "lambda_power", "lambda_min"):
        if getattr(head, key) < 0:
            fail(f"head.{key}", f"must not be negative, got {getattr(head, key)}")
    if head.feature_scale != "norm":
        for key in ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min"):
            default = getattr(HeadConfig, key)
            if getattr(head, key) != default:
                fail(f"head.{key}", f"only applies to head.feature_scale norm (the annealed A-Softmax), but "
                                    f"head.feature_scale is {head.feature_scale}; leave it at {default}")


# -- the global batch on a number of ranks ---------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: `per_rank` images per micro-batch on each of
    `world_size` ranks, `accumulation` micro-batches per step."""

    per_rank: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.per_rank * self.world_size * self.accumulation

    def __str__(self) -> str:
        return f"{self.per_rank} per rank x {self.world_size} rank(s) x {self.accumulation} accumulation"


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """The step's split on `world_size` ranks; ConfigError when data.global_batch_size cannot be kept there.

    Without data.global_batch_size: data.batch_size per rank and optim.accumulation_steps, so the
    global batch follows the world size. With it (the rule of its field comment): the fewest
    micro-batches per step whose per-rank share fits data.batch_size and splits the global batch
    exactly, so that a step holds the same images on any number of ranks.
    """
    data = cfg.data
    if data.global_batch_size is None:
        return BatchPlan(data.batch_size, world_size, cfg.optim.accumulation_steps)
    total = data.global_batch_size
    if total % world_size:
        below, above = (total // world_size) * world_size, (total // world_size + 1) * world_size
        multiples = " or ".join(str(value) for value in (below, above) if value > 0)
        divisors = [w for w in range(1, total + 1) if total % w == 0]
        near = sorted(sorted(divisors, key=lambda w: (abs(w - world_size), w))[:4])
        raise ConfigError(
            f"data.global_batch_size={total} cannot be split evenly over {world_size} ranks ({total} / {world_size} "
            f"is not a whole number of images per rank), and the global batch is kept exact: on {world_size} ranks "
            f"set it to a multiple of {world_size} (e.g. {multiples}), or run on a number of ranks that divides "
            f"{total} (e.g. {', '.join(map(str, near))})")
    per_rank_step = total // world_size  # images each rank takes per optimizer step
    accumulation = -(-per_rank_step // data.batch_size)  # the fewest micro-batches within data.batch_size
    while per_rank_step % accumulation:  # ends at most at per_rank_step: micro-batches of one image
        accumulation += 1
    plan = BatchPlan(per_rank_step // accumulation, world_size, accumulation)
    if cfg.head.step == "fused" and accumulation > 1:
        # the fewest ranks on which one micro-batch per rank holds the whole step
        ranks = next(w for w in range(-(-total // data.batch_size), total + 1)
                     if total % w == 0 and total // w <= data.batch_size)
        raise ConfigError(
            f"head.step fused steps the class rows at every forward, so it cannot accumulate micro-batches, but "
            f"data.global_batch_size={total} on {world_size} rank(s) with at most data.batch_size={data.batch_size} "
            f"images per rank per micro-batch needs {accumulation} micro-batches per step ({plan}). Run on {ranks} "
            f"ranks ({total // ranks} per rank), raise data.batch_size to {per_rank_step} if a rank's memory holds it, "
            f"or set head.step separate")
    return plan


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dicts and lists, as written to the run directory and logged to wandb."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write the resolved config as YAML that `load_config([path])` reads back to an equal Config.

    `comment`, if given, heads the file as YAML comment lines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" if not line.startswith("#") else f"{line}\n" for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


# -- resuming with another config ---------------------------------------------------------------
# Keys that may differ from the checkpoint's config when a run resumes, without asking: where the
# run lives and ends, how often it logs, evaluates and saves, how it waits, decodes and reports.
# None of them changes what a step computes. (run.epochs and run.max_steps move the end of the
# run, so a poly schedule's remaining decay follows the new end from the resumed step on; a resume
# never reads model.init_from, which starts a new run only.)
# Every other key changes the model, the loss, the data, its order or the optimiser of the
# remaining steps: the trainer refuses a resume that changes one unless `--allow-config-change`
# names it. A `section.*` entry covers every key of the section.
RESUME_SAFE_KEYS = (
    "run.dir", "run.resume", "run.epochs", "run.max_steps", "run.log_every", "run.eval_every",
    "run.checkpoint_every", "run.keep_checkpoints", "run.timeout_s", "run.max_bad_steps",
    "data.num_workers", "data.retries", "data.manifest", "model.init_from", "eval.*", "logging.*",
)
# How a step's images are split over ranks and micro-batches. With data.global_batch_size equal to
# the checkpoint's global batch (images per step), changing them changes no step's images, only
# how they are computed (as a change of the world size does): such a resume needs no permission.
BATCH_SPLIT_KEYS = ("data.batch_size", "data.global_batch_size", "optim.accumulation_steps")
# Where the run is and how it was started: not a setting of its steps, so not recorded as a change.
_INVOCATION_KEYS = ("run.dir", "run.resume")


def config_keys() -> list[str]:
    """Every dotted key, `section.key`, in declaration order."""
    return [f"{section}.{key}" for section, fields in _FIELDS.items() for key in fields]


def resume_safe(key: str) -> bool:
    """Whether `key` may change on resume without `--allow-config-change` (see RESUME_SAFE_KEYS)."""
    return key in RESUME_SAFE_KEYS or f"{key.split('.')[0]}.*" in RESUME_SAFE_KEYS


def check_keys(keys: Sequence[str], option: str) -> list[str]:
    """`keys` (dotted, or comma lists of them) split and checked against the config's keys, else ConfigError."""
    known = config_keys()
    found = [key.strip() for item in keys for key in item.split(",") if key.strip()]
    for key in found:
        if key not in known:
            raise ConfigError(f"{option} {key}: not a config key; {_suggest(key, known)}")
    return found


@dataclass(frozen=True)
class Change:
    """One key whose value differs between a checkpoint's config and this run's."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    """A value as it would be written in YAML flow style: 0.1, null, [a, b], {input_pool: 2}."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def config_changes(saved: Mapping[str, Any], cfg: Config) -> list[Change]:
    """The keys whose value in `cfg` differs from `saved` (a checkpoint's `config_to_dict`), in key order.

    A key missing from `saved` (a field added since it was written) counts as its default then.
    Keys of `saved` that no longer exist are left out. Where the run is and how it was started
    (run.dir, run.resume) are not settings of its steps and are never reported.
    """
    now, defaults = config_to_dict(cfg), config_to_dict(Config())
    changes = []
    for section, fields in _FIELDS.items():
        old_section = saved.get(section) or {}
        default = defaults[section]
        for key in fields:
            dotted = f"{section}.{key}"
            old = old_section.get(key, default[key]) if isinstance(old_section, Mapping) else default[key]
            if dotted not in _INVOCATION_KEYS and old != now[section][key]:
                changes.append(Change(dotted, old, now[section][key]))
    return changes


# -- docs/config.md ---------------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Each field's description: the comment lines right above it and the comment after it, joined."""
    lines, _ = inspect.getsourcelines(cls)
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+):", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            after = [tok.string.lstrip("#").strip() for tok in tokenize.generate_tokens(io.StringIO(line).readline)
                     if tok.type == tokenize.COMMENT]
            comments[match.group(1)] = " ".join(above + after)
        above = []
    return comments


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"`{_show(value)}`" if value != "" else '`""`'


def config_markdown() -> str:
    """docs/config.md: every key with its type, default and description, from the dataclasses above."""
    out = [
        "# Configuration keys",
        "",
        "<!-- Generated from sf2dist/config.py by `python -m sf2dist.config --markdown > docs/config.md`;",
        "     edit the field comments there, not this file (tests/test_config.py checks that it is current). -->",
        "",
        "A run is described by YAML files given with `--config` (composed in order: later files win,",
        "mappings merge key by key, lists are replaced; a file may `include:` others, relative to itself)",
        "and then by `--set section.key=value` overrides, in order. Every value is checked against its",
        "type and choices as it arrives; an error names the key and the file or `--set` it came from.",
        "`launch/train.py --print-config` prints the resolved config and checks the data without training;",
        "the resolved config is also written to `RUN_DIR/config.yaml`.",
        "",
        "Keys marked *resume: free* may change when a run resumes from a checkpoint. A resume that",
        "changes any other key is refused (exit status 2, listing `key: old -> new`) unless",
        "`--allow-config-change KEY` names it; the config of each such resume is kept in",
        "`RUN_DIR/config.step_NNNNNNNN.yaml` (`config.yaml` stays the config the run started with).",
        "",
    ]
    for section, cls in SECTIONS.items():
        out += [f"## `{section}`", "", (cls.__doc__ or "").strip(), "",
                "| key | type | default | resume | description |", "|---|---|---|---|---|"]
        comments = _field_comments(cls)
        for name, (tp, f) in _FIELDS[section].items():
            choices = f.metadata.get("choices")
            kind = " \\| ".join(f"`{c}`" for c in choices) if choices else _describe(tp)
            free = "free" if resume_safe(f"{section}.{name}") else ""
            description = comments.get(name, "").replace("|", "\\|")
            out.append(f"| `{section}.{name}` | {kind} | {_default_text(f)} | {free} | {description} |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sf2dist.config",
        description="Print docs/config.md, every config key with its type, default and description. (To see a "
                    "resolved config, use launch/train.py --config FILE --set KEY=VALUE --print-config.)")
    parser.add_argument("--markdown", action="store_true", required=True, help="print docs/config.md (required)")
    parser.parse_args(argv)
    print(config_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
