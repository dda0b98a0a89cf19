"""The typed config: YAML composition, includes, `--set` overrides, error messages, round trips."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sf2dist.config import Config, ConfigError, config_to_dict, load_config, save_config, validate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_no_files_no_overrides_gives_the_defaults():
    assert load_config() == Config()


def test_files_compose_in_order_mappings_merge_lists_replace(tmp_path):
    base = write(tmp_path / "base.yaml", """
optim: {lr: 0.1, milestones: [1, 2, 3], schedule: step}
model: {kwargs: {dropout: 0.2, stem: {width: 64}}}
data: {batch_size: 32}
""")
    top = write(tmp_path / "top.yaml", """
optim: {lr: 0.05, milestones: [5]}
model: {kwargs: {stem: {depth: 2}}}
""")
    cfg = load_config([base, top])
    assert cfg.optim.lr == 0.05
    assert cfg.optim.milestones == [5]  # replaced, not [1, 2, 3, 5]
    assert cfg.optim.schedule == "step"  # kept from base
    assert cfg.data.batch_size == 32
    assert cfg.model.kwargs == {"dropout": 0.2, "stem": {"width": 64, "depth": 2}}
    assert load_config([top, base]).optim.lr == 0.1  # the later file wins


def test_includes_are_relative_to_their_file_and_apply_before_it(tmp_path, monkeypatch):
    write(tmp_path / "shared/base.yaml", "include: [common.yaml]\noptim: {lr: 0.2}\ndata: {batch_size: 16}\n")
    write(tmp_path / "shared/common.yaml", "optim: {lr: 0.3, momentum: 0.5}\nrun: {seed: 7}\n")
    write(tmp_path / "shared/extra.yaml", "run: {seed: 8}\n")
    child = write(tmp_path / "exp/child.yaml", "include: [../shared/base.yaml, ../shared/extra.yaml]\n"
                                               "data: {batch_size: 8}\n")
    monkeypatch.chdir(write(tmp_path / "elsewhere/x", "").parent)
    cfg = load_config([child])
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.5)  # base over common
    assert cfg.run.seed == 8  # includes apply in list order
    assert cfg.data.batch_size == 8  # the file itself over its includes
    single = write(tmp_path / "exp/single.yaml", "include: ../shared/extra.yaml\n")
    assert load_config([single]).run.seed == 8


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("data.batch_size=64", "data", "batch_size", 64),
        ("optim.lr=1e-3", "optim", "lr", 0.001),  # YAML 1.1 reads "1e-3" as a string
        ("optim.lr=2", "optim", "lr", 2.0),  # an int is a float
        ("optim.weight_decay=5.0e-4", "optim", "weight_decay", 5e-4),
        ("optim.head_lr=0.01", "optim", "head_lr", 0.01),
        ("optim.clip_grad_norm=null", "optim", "clip_grad_norm", None),
        ("run.max_steps=500", "run", "max_steps", 500),
        ("data.flip=false", "data", "flip", False),
        ("run.resume=true", "run", "resume", True),
        ("eval.benchmarks=[a.bin, b.bin]", "eval", "benchmarks", ["a.bin", "b.bin"]),
        ("data.train=/data/x/train", "data", "train", "/data/x/train"),
        ("run.dir=2024", "run", "dir", "2024"),  # text fields take the text, not YAML's int
        ("data.train=on", "data", "train", "on"),  # ... nor YAML 1.1's bool
        ("data.train=", "data", "train", ""),
        ("data.train=[broken", "data", "train", "[broken"),  # not YAML: still the text
        ("logging.wandb_entity=null", "logging", "wandb_entity", None),
        ("logging.wandb_entity=my-team", "logging", "wandb_entity", "my-team"),
        ("head.type=partial_fc", "head", "type", "partial_fc"),
        ("model.kwargs={dropout: 0.1}", "model", "kwargs", {"dropout": 0.1}),
        ("model.kwargs.dropout=1e-1", "model", "kwargs", {"dropout": 0.1}),
        ("model.kwargs.stem.width=32", "model", "kwargs", {"stem": {"width": 32}}),
    ],
)
def test_override_of_each_type(override, section, key, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_after_files_in_order(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.1}\nmodel: {kwargs: {a: 1, b: {c: 2}}}\n")
    cfg = load_config([path], ["optim.lr=0.2", "optim.lr=0.3", "model.kwargs.b.d=3"])
    assert cfg.optim.lr == 0.3
    assert cfg.model.kwargs == {"a": 1, "b": {"c": 2, "d": 3}}
    assert load_config([path], ["model.kwargs={}"]).model.kwargs == {}  # a whole field is replaced
    assert load_config(overrides=["optim.schedule=step", "optim.milestones=[100, 200]"]).optim.milestones == [100, 200]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("optimizer: {lr: 0.1}\n", ["unknown section 'optimizer'", "did you mean 'optim'?"]),
        ("includes: [a.yaml]\n", ["unknown section 'includes'", "did you mean 'include'?"]),
        ("data: {batchsize: 3}\n", ["unknown key 'data.batchsize'", "did you mean 'data.batch_size'?"]),
        ("data: {zzz: 3}\n", ["unknown key 'data.zzz'", "known: data.train, data.num_classes"]),
        ("data: {batch_size: abc}\n", ["data.batch_size: expected int, got str 'abc'"]),
        ("data: {batch_size: true}\n", ["data.batch_size: expected int, got bool True"]),
        ("data: {batch_size: 64.0}\n", ["data.batch_size: expected int, got float 64.0"]),
        ("data: {batch_size: null}\n", ["data.batch_size: expected int, got null"]),
        ("optim: {lr: fast}\n", ["optim.lr: expected float, got str 'fast'"]),
        ("optim: {lr: '0.1'}\n", ["optim.lr: expected float, got str '0.1'"]),
        ("optim: {lr: .inf}\n", ["optim.lr: expected a finite float, got inf"]),
        ("optim: {head_lr: x}\n", ["optim.head_lr: expected float or null, got str 'x'"]),
        ("optim: {milestones: [10, x]}\n", ["optim.milestones[1]: expected int, got str 'x'"]),
        ("optim: {milestones: 10}\n", ["optim.milestones: expected list of int, got int 10"]),
        ("optim: {name: adam}\n", ["optim.name: 'adam' is not one of 'sgd', 'adamw'"]),
        ("engine: {zero_stage: 3}\n", ["engine.zero_stage: 3 is not one of 1, 2"]),
        ("model: {kwargs: [1]}\n", ["model.kwargs: expected mapping, got list [1]"]),
        ("model: {kwargs: {1: a}}\n", ["model.kwargs: keys must be strings, got int 1"]),
        ("data: 3\n", ["data: expected a mapping of keys, got int 3"]),
        ("include: 3\n", ["include: expected a path or a list of paths, got int 3"]),
        ("data: [1, 2\n", ["not valid YAML"]),
        ("- data\n", ["the top level must be a mapping of sections", "got list"]),
    ],
)
def test_file_errors_name_the_key_and_the_file(tmp_path, text, fragments):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    for fragment in [*fragments, str(path)]:
        assert fragment in str(err.value)


def test_a_value_from_an_include_names_the_included_file(tmp_path):
    base = write(tmp_path / "base.yaml", "data: {num_workers: many}\n")
    child = write(tmp_path / "child.yaml", "include: [base.yaml]\n")
    with pytest.raises(ConfigError, match="data.num_workers: expected int") as err:
        load_config([child])
    assert f"(from {base})" in str(err.value)


def test_missing_files_and_include_cycles(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config([missing])
    assert str(missing) in str(err.value)
    parent = write(tmp_path / "parent.yaml", "include: [gone.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config([parent])
    assert f"config file not found: {tmp_path / 'gone.yaml'} (included from {parent})" in str(err.value)
    write(tmp_path / "a.yaml", "include: [b.yaml]\n")
    write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config([tmp_path / "a.yaml"])


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optim.lr", ["malformed override 'optim.lr' (from --set): expected section.key=value"]),
        ("lr=0.1", ["malformed override 'lr=0.1'"]),
        ("optim..lr=0.1", ["malformed override"]),
        ("data.batch_size=abc", ["data.batch_size: expected int, got str 'abc' (from --set data.batch_size=abc)"]),
        ("data.flip=1", ["data.flip: expected bool, got int 1 (from --set data.flip=1)"]),
        ("optimizer.lr=0.1", ["unknown section 'optimizer' in --set optimizer.lr=0.1; did you mean 'optim'?"]),
        ("model.kwarg.x=1", ["unknown key 'model.kwarg' in --set model.kwarg.x=1; did you mean 'model.kwargs'?"]),
        ("data.batch_size.x=1", ["data.batch_size is not a mapping", "(from --set data.batch_size.x=1)"]),
        ("optim.milestones=[1, 2", ["optim.milestones: value", "is not valid YAML (from --set"]),
        ("engine.type=ds", ["engine.type: 'ds' is not one of 'ddp', 'deepspeed' (from --set engine.type=ds)"]),
    ],
)
def test_override_errors_name_the_key_and_the_override(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.batch_size=0"], ["data.batch_size: must be at least 1, got 0"]),
        (["run.epochs=0"], ["run.epochs: must be at least 1, got 0"]),
        (["run.max_steps=0"], ["run.max_steps: must be at least 1"]),
        (["data.num_workers=-1"], ["data.num_workers: must not be negative, got -1"]),
        (["optim.lr=0"], ["optim.lr: must be positive, got 0.0"]),
        (["optim.head_lr=-1e-2"], ["optim.head_lr: must be positive, got -0.01"]),
        (["optim.accumulation_steps=0"], ["optim.accumulation_steps: must be at least 1, got 0"]),
        (["data.label_noise=1.0"], ["data.label_noise: must be in [0, 1), got 1.0"]),
        (["data.label_noise=-0.1"], ["data.label_noise: must be in [0, 1)"]),
        (["head.type=partial_fc", "head.sample_rate=0"], ["head.sample_rate: must be in (0, 1], got 0.0"]),
        (["head.type=partial_fc", "head.sample_rate=1.5"], ["head.sample_rate: must be in (0, 1], got 1.5"]),
        (["head.sample_rate=0.1", "optim.name=adamw"], ["head.sample_rate: SphereFace2 class sampling", "needs optim.name sgd"]),
        (["head.margin=arcface"], ["head.margin: 'arcface' is not a margin of head.type sphereface2; "
                                   "expected one of C, A, M"]),
        (["head.type=partial_fc", "head.margin=C"], ["head.margin: 'C' is not a margin of head.type partial_fc; "
                                                     "expected one of cosface, arcface"]),
        (["optim.schedule=step", "optim.milestones=[300, 200]"],
         ["optim.milestones: must be positive and strictly increasing, got [300, 200]"]),
        (["optim.schedule=step", "optim.milestones=[100, 100]"], ["strictly increasing"]),
        (["optim.schedule=step"], ["optim.milestones: schedule step needs at least one milestone (from the default)"]),
        (["optim.milestones=[100]"], ["optim.milestones: only apply to schedule step, but optim.schedule is poly"]),
        (["engine.zero_stage=2"], ["engine.zero_stage: only applies to engine.type deepspeed"]),
        (["engine.device=cpu", "engine.precision=fp16"],
         ["engine.precision: fp16 is not available with engine.device cpu", "no fp16 matrix multiply"]),
        (["model.kwargs.embedding_dim=64"], ["model.kwargs: must not hold embedding_dim"]),
        (["head.type=partial_fc", "head.step=fused"], ["head.step: fused steps the rows of a SphereFace2 head"]),
        (["head.step=fused", "optim.name=adamw"], ["head.step: fused is an SGD step; it needs optim.name sgd"]),
        (["head.step=fused", "optim.accumulation_steps=2"], ["head.step: fused", "cannot accumulate 2 micro-batches"]),
        (["head.storage=bfloat16"], ["head.storage: bfloat16 rows", "set head.step fused as well (from --set head.storage=bfloat16)"]),
        (["head.storage=float16"], ["head.storage", "float16"]),
    ],
)
def test_cross_field_errors(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_cross_field_error_names_the_file_a_value_came_from(tmp_path):
    path = write(tmp_path / "sf2.yaml", "head: {margin: C}\n")
    with pytest.raises(ConfigError) as err:
        load_config([path], ["head.type=partial_fc"])
    assert f"head.margin: 'C' is not a margin of head.type partial_fc; expected one of cosface, arcface, sphereface " \
           f"(C is a sphereface2 margin); set head.margin=cosface (or another of them), or head.margin=null for " \
           f"partial_fc's default (from {path})" in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["head.type=partial_fc", "head.margin=arcface", "head.sample_rate=0.1"],
        ["engine.type=deepspeed", "engine.zero_stage=2"],
        ["engine.device=cuda", "engine.precision=fp16"],
        ["engine.device=cpu", "engine.precision=bf16"],
        ["optim.schedule=step", "optim.milestones=[100, 200]"],
        ["head.step=fused", "head.storage=bfloat16", "head.sample_rate=0.1"],
        ["data.train="],  # the trainer, not the config, requires data.train
    ],
)
def test_valid_combinations_pass(overrides):
    load_config(overrides=overrides)


def test_validate_on_a_config_built_in_code():
    cfg = Config()
    validate(cfg)
    cfg.data.batch_size = 0
    with pytest.raises(ConfigError, match=r"data.batch_size: must be at least 1, got 0 \(from the default\)"):
        validate(cfg)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(overrides=[
        "run.dir=runs/x", "run.max_steps=1000", "run.resume=false", "data.train=d/train", "data.num_classes=93431",
        "data.label_noise=0.25", "model.kwargs={dropout: 0.1, stem: {width: 32}, names: [a, b]}",
        "head.type=partial_fc", "head.margin=arcface", "head.m=0.5", "head.sample_rate=0.1", "optim.name=adamw",
        "optim.lr=1e-5", "optim.head_lr=3e-7", "optim.schedule=step", "optim.milestones=[10, 20]",
        "optim.clip_grad_norm=5", "engine.type=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
        "eval.benchmarks=[a.bin, b.bin]", "logging.wandb_entity=team", "logging.wandb_mode=disabled",
    ])
    path = tmp_path / "run/config.yaml"
    save_config(cfg, path)  # creates the run directory
    assert load_config([path]) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    assert config_to_dict(cfg)["optim"]["milestones"] == [10, 20]
    assert config_to_dict(cfg)["model"]["kwargs"]["stem"] == {"width": 32}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config([path])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config([tmp_path / "config.yaml"]) == cfg
    if path.name != "base_gpu.yaml":  # the shared base names no data set
        assert cfg.data.train and cfg.eval.benchmarks and cfg.run.dir != Config().run.dir
        assert "launch/train.py --config configs/" + path.name in path.read_text()


def test_shipped_configs_are_present():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"demo_cpu.yaml", "base_gpu.yaml", "ms1mv3_r50_sf2.yaml", "ms1mv3_r100_sf2.yaml",
            "ms1mv3_r100_pfc.yaml", "webface42m_r100_sf2.yaml"} <= names


# -- docs/config.md, warnings, changes on resume ------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_docs_config_md_is_generated_from_the_dataclasses_and_current():
    """Regenerate with `python -m sf2dist.config --markdown > docs/config.md` when this fails."""
    from sf2dist.config import config_keys, config_markdown

    text = config_markdown()
    assert DOCS.read_text() == text + "\n", "stale: run python -m sf2dist.config --markdown > docs/config.md"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == config_keys()
    for row in rows:  # type, default and a description for every key
        key, kind, default, _, description = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert kind and default.startswith("`") and len(description) > 10, row
    assert "| `optim.lr` | float | `0.1` |  | base learning rate" in text
    assert "| `head.type` | `sphereface2` \\| `partial_fc` | `sphereface2` |  |" in text
    assert "| `run.max_steps` | int or null | `null` | free |" in text


def test_the_markdown_command(capsys):
    from sf2dist.config import config_markdown, main

    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == config_markdown() + "\n"


def test_head_keys_the_chosen_head_does_not_read_are_warned_about(tmp_path):
    from sf2dist.config import resolve_config

    assert resolve_config().warnings == []  # defaults are never reported
    assert resolve_config([CONFIG_DIR / "demo_cpu.yaml"]).warnings == []
    demo = CONFIG_DIR / "demo_cpu.yaml"
    warnings = resolve_config([demo], ["head.type=partial_fc", "head.margin=cosface"]).warnings
    assert warnings == [
        f"head.r=30.0 (from {demo}) is not used: it is a sphereface2 setting and head.type is partial_fc; remove it",
        f"head.m=0.1 (from {demo}) was set for head.type sphereface2, but head.type is partial_fc (from --set "
        f"head.type=partial_fc), which reads it as its own margin size; set head.m for partial_fc as well, or "
        f"head.m=null for partial_fc's default",
    ]
    assert resolve_config(overrides=["head.s=32"]).warnings == [
        "head.s=32.0 (from --set head.s=32) is not used: it is a partial_fc setting and head.type is sphereface2; "
        "remove it"]
    # the --set options are one layer: m set before head.type on the command line is meant for that type
    warnings = resolve_config([demo], ["head.m=0.3", "head.margin=cosface", "head.type=partial_fc"]).warnings
    assert [warning.split()[0] for warning in warnings] == ["head.r=30.0"]
    # a file that sets both for one head: nothing carried over from the file it includes
    path = write(tmp_path / "pfc.yaml", f"include: [{demo}]\nhead: {{type: partial_fc, margin: arcface, m: 0.5}}\n")
    assert [warning.split()[0] for warning in resolve_config([path]).warnings] == ["head.r=30.0"]


def test_config_changes_between_a_checkpoint_and_now():
    from sf2dist.config import config_changes, resume_safe

    saved = config_to_dict(load_config(overrides=["optim.lr=0.3", "run.dir=a", "model.kwargs={width: 8}"]))
    del saved["head"]["storage"]  # a key added after the checkpoint was written: its default then
    now = load_config(overrides=["optim.lr=0.05", "run.dir=b", "run.resume=false", "model.kwargs={width: 16}",
                                 "run.max_steps=9"])
    assert [str(c) for c in config_changes(saved, now)] == [
        "run.max_steps: null -> 9", "model.kwargs: {width: 8} -> {width: 16}", "optim.lr: 0.3 -> 0.05"]
    assert [resume_safe(c.key) for c in config_changes(saved, now)] == [True, False, False]
    assert resume_safe("eval.benchmarks") and resume_safe("logging.progress") and not resume_safe("data.batch_size")
