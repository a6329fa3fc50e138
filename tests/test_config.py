import pytest
import yaml

from detkit.config import Config, ConfigError, dump_yaml, load_config, parse_overrides


def test_defaults_and_overrides():
    cfg = load_config(Config, None, ["solver.base_lr=0.02", "data.batch_size=8", "data.train_transform.scale_range=[0.5, 2.0]"])
    assert cfg.solver.base_lr == 0.02
    assert cfg.data.batch_size == 8
    assert cfg.data.train_transform.scale_range == (0.5, 2.0)
    # A partial section keeps that section's own defaults (train flips by default).
    assert cfg.data.train_transform.flip_prob == 0.5


@pytest.mark.parametrize("override, expected", [
    ("solver.base_lrr=0.1", "unknown key 'solver.base_lrr'; did you mean 'solver.base_lr'?"),
    ("dta.batch_size=2", "unknown key 'dta'; did you mean 'data'?"),
    ("data.batch_size=abc", "data.batch_size: expected an integer, got str 'abc'"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("data.aspect_ratio_grouping=1", "data.aspect_ratio_grouping: expected true or false"),
    ("data.train_transform.mode=scale_jiter", "did you mean 'scale_jitter'?"),
    ("data.train_transform.scale_range=[2.0, 1.0]", "data.train_transform: scale_range must satisfy"),
    ("model.input.pixel_std=[1, 2]", "model.input.pixel_std: expected a list of 3 values"),
])
def test_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Config, None, [override])
    assert expected in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["solver.base_lr"])


def test_base_merge_rule(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "data": {"batch_size": 4, "train_transform": {"short_sizes": [640, 800], "max_size": 1000}},
        "solver": {"steps": [10, 20]}}))
    (tmp_path / "child.yaml").write_text("base: base.yaml\n"
                                         "data: {train_transform: {max_size: 1333}}\nsolver: {steps: [30]}\n")
    cfg = load_config(Config, tmp_path / "child.yaml")
    assert cfg.data.batch_size == 4  # mappings merge ...
    assert cfg.data.train_transform.short_sizes == (640, 800)
    assert cfg.data.train_transform.max_size == 1333
    assert cfg.solver.steps == (30,)  # ... everything else replaces


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Config, tmp_path / "a.yaml")


def test_yaml_is_never_executed(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Config, tmp_path / "evil.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(Config, None, ["model.input.normalization=caffe", "eval.iou_types=[bbox, segm]"])
    assert cfg.model.input.channel_order == "BGR" and cfg.model.input.pixel_std == (1.0, 1.0, 1.0)
    dump_yaml(cfg, tmp_path / "out.yaml")
    again = load_config(Config, tmp_path / "out.yaml")
    assert again == cfg
