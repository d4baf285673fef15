"""Experiment configuration: YAML, unknown keys, ``--set`` overrides, type checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nerdrain.cli import main
from nerdrain.config import (
    ConfigError,
    DataConfig,
    SourceConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]

YAML = """
model:
  name: nerd_rain_s
  overrides: {dim: 16, inr_hidden: [32, 32]}
data:
  patch_size: 128
  batch_size: 2
  sources:
    - {kind: synthetic, root: /clean, weight: 3, presets: [heavy]}
    - {kind: paired, root: /pairs}
optim:
  lr: 1e-4          # YAML 1.1 reads this as the string '1e-4'
  min_lr: 1.0e-6
  betas: [0.8, 0.99]
  warmup_iters: 3
ema_decay: 0.999
iterations: 5000
"""


@pytest.fixture
def yaml_path(tmp_path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    return path


def test_yaml_loads_with_types(yaml_path):
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # the premise: a string from YAML
    cfg = load_config(yaml_path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 1e-6
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.optim.warmup_iters == 3 and cfg.iterations == 5000
    assert cfg.ema_decay == 0.999
    assert cfg.model.overrides == {"dim": 16, "inr_hidden": [32, 32]}
    assert cfg.data.sources == (
        SourceConfig(kind="synthetic", root="/clean", weight=3.0, presets=("heavy",)),
        SourceConfig(kind="paired", root="/pairs"),
    )
    assert isinstance(cfg.data.sources[0].weight, float)
    # untouched keys keep their defaults
    assert cfg.data.flips is True and cfg.data.num_workers == DataConfig().num_workers
    assert cfg.seed == 1234 and cfg.val.root is None


def test_empty_file_and_empty_sections_give_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == TrainConfig()
    assert load_config(None) == TrainConfig()
    sections = tmp_path / "sections.yaml"
    sections.write_text("val:\noptim:\n")
    assert load_config(sections) == TrainConfig()


def test_round_trip_through_yaml(yaml_path):
    cfg = load_config(yaml_path)
    again = from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("text, key", [
    ("iteratons: 5", "iteratons"),
    ("optim: {lrr: 1.0}", "lrr"),
    ("data: {sources: [{kind: paired, root: x, wieght: 2}]}", "wieght"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=key):
        load_config(path)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean lr\?"):
        from_dict(TrainConfig, {"optim": {"lrr": 1.0}})


def test_overrides_coerce_types(yaml_path):
    cfg = load_config(yaml_path, [
        "optim.lr=2e-4",  # string from YAML -> float
        "optim.betas=[0.5, 0.9]",  # list -> tuple
        "data.sources.0.weight=0.25",  # into a list by index
        "data.sources.1.presets=[light]",
        "model.overrides.dim=24",  # free-form dict
        "val.root=/val",
        "ema_decay=null",  # optional -> None
        "optim.grad_clip=1e-2",  # float | None from a string
        "iterations=7",
        "data.flips=false",
    ])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.data.sources[0].weight == 0.25 and cfg.data.sources[1].weight == 1.0
    assert cfg.data.sources[1].presets == ("light",)
    assert cfg.model.overrides == {"dim": 24, "inr_hidden": [32, 32]}
    assert cfg.val.root == "/val" and cfg.ema_decay is None
    assert cfg.optim.grad_clip == 0.01
    assert cfg.iterations == 7 and cfg.data.flips is False


def test_override_creates_missing_sections():
    cfg = load_config(None, ["val.every=10", "loss.fft_weight=0"])
    assert cfg.val.every == 10 and cfg.loss.fft_weight == 0.0


def test_apply_overrides_does_not_need_the_schema():
    data = {"a": [{"b": 1}, {"b": 2}]}
    assert apply_overrides(data, ["a.1.b=x", "c.d=[1, 2]"]) == {"a": [{"b": 1}, {"b": "x"}], "c": {"d": [1, 2]}}


@pytest.mark.parametrize("override, key", [
    ("iterations=abc", "iterations"),
    ("iterations=2.5", "iterations"),
    ("iterations=true", "iterations"),  # a bool is not an int
    ("data.flips=3", "flips"),
    ("optim.lr=fast", "lr"),
    ("optim.betas=[0.9, 0.99, 0.999]", "betas"),
    ("optim.betas=0.9", "betas"),
    ("data.sources=5", "sources"),
    ("model.overrides=7", "overrides"),
    ("val.root=[1]", "root"),
])
def test_bad_types_name_the_key(yaml_path, override, key):
    with pytest.raises(ValueError, match=key):
        load_config(yaml_path, [override])


@pytest.mark.parametrize("override, where", [
    ("val.protocol=rain100", "config.val.protocol: expected one of rain200, did_ddn"),
    ("data.sources.0.kind=synth", "config.data.sources[0].kind: expected one of paired, synthetic"),
    ("data.sources.0.presets=[drizzle]", "config.data.sources[0].presets: expected one of light"),
    ("data.sources.1.layout=folders", "config.data.sources[1].layout"),
    ("data.sources.1.root=''", "config.data.sources[1].root"),
    ("data.sources.0.weight=0", "config.data.sources[0].weight"),
    ("data.patch_size=100", "config.data.patch_size: expected a positive multiple of 16"),
    ("data.batch_size=0", "config.data.batch_size"),
    ("data.cache_mb=-1", "config.data.cache_mb: expected 0 (no cache) or more"),
    ("val.every=0", "config.val.every"),
    ("optim.lr=0", "config.optim.lr"),
    ("optim.min_lr=1", "config.optim.min_lr"),
    ("optim.betas=[0.9, 1.0]", "config.optim.betas"),
    ("iterations=0", "config.iterations"),
    ("ema_decay=1", "config.ema_decay"),
    ("checkpoint_every=0", "config.checkpoint_every"),
    ("device=gpu", "config.device"),
    ("model.name=nerd_rain_xl", "config.model.name: expected one of nerd_rain, nerd_rain_s"),
    ("model.weights=''", "config.model.weights: expected a checkpoint file or default"),
    ("optim.lr=.inf", "config.optim.lr: expected a finite number"),
    ("optim.grad_clip=.inf", "config.optim.grad_clip: expected a finite number"),
    ("loss.edge_weight=.nan", "config.loss.edge_weight: expected a finite number"),
    ("optim.betas=[0.9, .nan]", "config.optim.betas[1]: expected a finite number"),
    ("loss.fft_weight=-0.01", "config.loss.fft_weight: expected 0 or more"),
    ("optim.eps=0", "config.optim.eps: expected a positive number"),
    ("optim.weight_decay=-1e-4", "config.optim.weight_decay: expected 0 or more"),
    ("seed=-1", "config.seed: expected 0 to 2**64 - 1"),
    ("seed=18446744073709551616", "config.seed: expected 0 to 2**64 - 1"),
])
def test_bad_values_fail_at_load_naming_the_key(yaml_path, override, where):
    """Values a run would only trip over later (at the first validation, or on a worker) fail
    at load, where the message can name the key."""
    with pytest.raises(ConfigError) as err:
        load_config(yaml_path, [override])
    assert str(err.value).startswith(where) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["device=cuda:1", "device=mps", "ema_decay=null", "optim.min_lr=0",
                                      "data.sources.1.layout=prenet", "val.max_images=2", "loss.fft_weight=0",
                                      "seed=0", "seed=18446744073709551615",
                                      "data.cache_mb=0"])
def test_good_values_pass(yaml_path, override):
    load_config(yaml_path, [override])


@pytest.mark.parametrize("override", ["iterations", "=3", "data.sources.5.weight=1", "iterations.x=1",
                                      "data.sources.first.weight=1"])
def test_malformed_overrides(yaml_path, override):
    with pytest.raises(ConfigError, match="override"):
        load_config(yaml_path, [override])


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {patchsize: 64}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "patchsize" in err and "did you mean patch_size" in err
    assert not (tmp_path / "run").exists()
    good = tmp_path / "good.yaml"
    good.write_text("iterations: 3\n")
    assert main(["train", str(good), "--out", str(tmp_path / "run"), "--set", "optim.lr=quick"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_smoke_config_loads():
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert cfg.data.sources and cfg.data.num_workers == 0 and cfg.iterations <= 20


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each experiment file names only known keys with values of the right types."""
    cfg = load_config(path)
    assert cfg.iterations > 0 and cfg.data.sources


@pytest.mark.parametrize("content, problem", [(b"a: [1, 2\n", "not valid YAML at line 2, column 1"),
                                              (b"\xff\xfe\x00", "not a UTF-8 text file")])
def test_unreadable_config_file_is_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=problem) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("text, key, line", [
    ("optim:\n  lr: 1.0e-4\n  warmup_iters: 10\noptim:\n  min_lr: 0.0\n", "optim", 4),  # a section twice
    ("iterations: 10\nlog_every: 2\niterations: 20\n", "iterations", 3),
    ("data:\n  sources:\n    - {kind: paired, root: a, root: b}\n", "root", 3),
])
def test_a_key_given_twice_is_refused_naming_it(tmp_path, text, key, line):
    """YAML keeps the last of two equal keys without a word: the first section's values would be
    lost (here the learning rate and warm-up)."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: key {key!r} given twice (again at line {line})"


def test_an_override_with_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"override 'loss=\{fft_weight: 1, fft_weight: 2\}': .*'fft_weight' given twice"):
        load_config(None, ["loss={fft_weight: 1, fft_weight: 2}"])
