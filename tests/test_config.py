"""Tests of config resolution and validation (`pemae.config.params`) and of the presets."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import yaml

from pemae.config.params import SECTIONS, build_config, config_for_run, deep_merge, load_params
from pemae.config.presets import PRESETS
from pemae.config.schema import Config, ConfigError
from pemae.models.mae import MaskedAutoencoder


def config_error(sections=None, preset="default", run_overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(preset, sections, run_overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Errors name the key
# --------------------------------------------------------------------------------------------
def test_unknown_key_in_a_section_is_named():
    msg = config_error({"model": {"mask_ration": 0.5}})
    assert "model.mask_ration" in msg and "unknown key" in msg


def test_unknown_section_is_named():
    msg = config_error({"pretrian": {"epochs": 1}})
    assert "pretrian" in msg and "unknown section" in msg


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_the_open_unit_interval_is_rejected(ratio):
    assert "model.mask_ratio" in config_error({"model": {"mask_ratio": ratio}})


@pytest.mark.parametrize("ratio", [0.01, 0.5, 0.75, 0.99])
def test_mask_ratio_inside_the_open_unit_interval_is_accepted(ratio):
    assert build_config("default", {"model": {"mask_ratio": ratio}}).model.mask_ratio == ratio


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_negative_lr_is_rejected(section):
    assert f"{section}.base_lr" in config_error({section: {"base_lr": -1e-3}})


def test_negative_linear_lr_is_rejected():
    assert "evaluation.linear_lr" in config_error({"evaluation": {"linear_lr": -1.0}})


@pytest.mark.parametrize("section", ["pretrain", "finetune", "evaluation"])
def test_batch_size_zero_is_rejected(section):
    assert f"{section}.batch_size" in config_error({section: {"batch_size": 0}})


def test_patch_size_that_does_not_divide_img_size_is_rejected():
    msg = config_error({"model": {"patch_size": 5}})
    assert "model.patch_size" in msg and "data.img_size" in msg


def test_heads_that_do_not_divide_width_are_rejected():
    assert "model.num_heads" in config_error({"model": {"num_heads": 5}})
    assert "model.decoder_heads" in config_error({"model": {"decoder_heads": 5}})


@pytest.mark.parametrize("section,key,value", [
    ("pretrain", "epochs", "3"),  # a string for an int
    ("pretrain", "epochs", True),  # a bool for an int
    ("pretrain", "epochs", 2.5),  # a float for an int
    ("model", "depth", None),
    ("pretrain", "base_lr", "fast"),  # a string that is no number
    ("pretrain", "base_lr", True),  # a bool for a float
    ("data", "hflip", 1),  # an int for a bool
    ("data", "hflip", "yes"),
    ("data", "root", 3),  # an int for a str
    ("data", "mean", 0.5),  # a scalar for a list
    ("data", "mean", ["a"]),  # a list of the wrong item type
])
def test_wrong_type_is_rejected_naming_the_key(section, key, value):
    assert f"{section}.{key}" in config_error({section: {key: value}})


@pytest.mark.parametrize("section,key,value,message", [
    ("pretrain", "epochs", "two", "pretrain.epochs = 'two': expected an integer, got 'two'"),
    ("pretrain", "epochs", 2.5, "pretrain.epochs = 2.5: expected an integer, got 2.5"),
    ("pretrain", "base_lr", True, "pretrain.base_lr = True: expected a number, got True"),
    ("data", "hflip", 1, "data.hflip = 1: expected true or false, got 1"),
    ("data", "root", 3, "data.root = 3: expected a string, got 3"),
    ("data", "mean", 0.5, "data.mean = 0.5: expected a list, got 0.5"),
    ("data", "mean", ["a"], "data.mean[0] = 'a': expected a number, got 'a'"),
])
def test_a_wrong_type_is_reported_as_a_type_error_alone(section, key, value, message):
    msg = config_error({section: {key: value}})
    assert msg == f"invalid configuration: {message}"  # one error on one line, no range error


def test_a_number_written_as_a_yaml_1_1_string_is_accepted_for_a_float():
    assert build_config("default", {"pretrain": {"base_lr": "1e-3"}}).pretrain.base_lr == 1e-3


def test_int_is_accepted_for_a_float_and_becomes_a_float():
    cfg = build_config("default", {"pretrain": {"warmup_epochs": 2}, "data": {"mean": [0]}})
    assert cfg.pretrain.warmup_epochs == 2.0 and isinstance(cfg.pretrain.warmup_epochs, float)
    assert cfg.data.mean == [0.0] and isinstance(cfg.data.mean[0], float)


def test_a_section_that_is_not_a_mapping_is_rejected():
    assert "model" in config_error({"model": 3})


def test_choices_are_enforced():
    assert "data.dataset" in config_error({"data": {"dataset": "mnist"}})
    assert "pretrain.device" in config_error({"pretrain": {"device": "tpu"}})
    assert "finetune.global_pool" in config_error({"finetune": {"global_pool": "max"}})
    assert "data.in_chans" in config_error({"data": {"in_chans": 2}})


def test_unknown_preset_is_named():
    msg = config_error(preset="huge")
    assert "huge" in msg and "preset" in msg


def test_imagefolder_without_root_is_rejected():
    assert "data.root" in config_error({"data": {"dataset": "imagefolder"}})


def test_imagefolder_with_root_validates():
    cfg = build_config("default", {"data": {"dataset": "imagefolder", "root": "/data"}})
    assert cfg.data.root == "/data"


@pytest.mark.parametrize("key", ["mean", "std"])
def test_mean_or_std_of_the_wrong_length_is_rejected(key):
    msg = config_error({"data": {key: [0.5, 0.5, 0.5]}})  # in_chans = 1
    assert f"data.{key}" in msg and "in_chans" in msg


def test_mean_of_the_right_length_validates():
    cfg = build_config("default", {"data": {"in_chans": 3, "mean": [0.1, 0.2, 0.3],
                                            "std": [1, 1, 1]}})
    assert cfg.data.mean == [0.1, 0.2, 0.3]


def test_non_positive_std_is_rejected():
    assert "data.std" in config_error({"data": {"std": [0.0]}})


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0], [0.9, 0.95, 0.99]])
def test_bad_betas_are_rejected(betas):
    assert "pretrain.betas" in config_error({"pretrain": {"betas": betas}})


def test_min_lr_above_peak_is_rejected():
    assert "finetune.min_lr" in config_error({"finetune": {"min_lr": 1.0}})


def test_several_errors_are_all_listed_in_one_message():
    msg = config_error({
        "model": {"mask_ratio": 1.5, "depht": 3},
        "pretrain": {"batch_size": 0, "base_lr": -1.0, "epochs": "many"},
        "bogus": {},
    })
    for key in ("model.mask_ratio", "model.depht", "pretrain.batch_size", "pretrain.base_lr",
                "pretrain.epochs", "bogus"):
        assert key in msg, key


def test_run_overrides_are_validated_too():
    assert "pretrain.epochs" in config_error(run_overrides={"pretrain": {"epochs": -1}})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# Resolution order
# --------------------------------------------------------------------------------------------
def test_dataclass_defaults_are_the_default_preset():
    assert build_config("default") == Config()


def test_sections_override_preset_and_run_overrides_override_sections():
    cfg = build_config("tiny", {"pretrain": {"epochs": 5, "seed": 3}},
                       {"pretrain": {"epochs": 7}})
    assert cfg.pretrain.epochs == 7  # the run's override wins
    assert cfg.pretrain.seed == 3  # from the sections
    assert cfg.pretrain.batch_size == PRESETS["tiny"]["pretrain"]["batch_size"]  # from the preset
    assert cfg.model.embed_dim == 64  # a preset value the sections do not touch


def test_a_section_given_as_none_keeps_the_preset():
    cfg = build_config("tiny", {"model": None, "data": None})
    assert cfg == build_config("tiny")


def test_deep_merge_merges_nested_dicts_without_mutating_inputs():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    override = {"a": {"y": [3], "z": {"q": 1}}, "c": 4}
    base_copy, override_copy = copy.deepcopy(base), copy.deepcopy(override)
    out = deep_merge(base, override)
    assert out == {"a": {"x": 1, "y": [3], "z": {"q": 1}}, "b": 2, "c": 4}
    assert base == base_copy and override == override_copy
    out["a"]["y"].append(9)
    out["a"]["z"]["q"] = 7
    out["a"]["x"] = 0
    assert base == base_copy and override == override_copy  # no shared sub-objects
    assert deep_merge(base, None) == base


def test_build_config_does_not_mutate_presets_or_sections():
    presets = copy.deepcopy(PRESETS)
    sections = {"model": {"depth": 3}, "data": {"mean": [0.5]}}
    sections_copy = copy.deepcopy(sections)
    cfg = build_config("tiny", sections)
    cfg.data.mean.append(1.0)
    assert PRESETS == presets and sections == sections_copy


def test_config_for_run_unknown_run_is_named():
    with pytest.raises(ConfigError, match="'nope'"):
        config_for_run("default", {}, {"mae": {}, "random": {}}, "nope")


def test_config_for_run_applies_that_runs_overrides():
    runs = {"mae": {"method": {"name": "mae"}}, "random": {"pretrain": {"epochs": 0}}}
    assert config_for_run("tiny", {}, runs, "random").pretrain.epochs == 0
    assert config_for_run("tiny", {}, runs, "mae").pretrain.epochs == 1
    assert config_for_run("tiny", {}, None, "anything") == build_config("tiny")


# --------------------------------------------------------------------------------------------
# params.yaml
# --------------------------------------------------------------------------------------------
def write_params(tmp_path, params: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_load_params_applies_sections_then_run_overrides(tmp_path):
    path = write_params(tmp_path, {
        "preset": "tiny",
        "model": {"mask_ratio": 0.6},
        "pretrain": {"epochs": 3, "seed": 4},
        "runs": {"a": {"pretrain": {"epochs": 0}}, "b": {"model": {"mask_ratio": 0.9}}},
    })
    a = load_params(path, "a")
    assert (a.pretrain.epochs, a.pretrain.seed, a.model.mask_ratio) == (0, 4, 0.6)
    b = load_params(path, "b")
    assert (b.pretrain.epochs, b.pretrain.seed, b.model.mask_ratio) == (3, 4, 0.9)
    assert a.model.embed_dim == 64  # the tiny preset underneath
    assert load_params(path).pretrain.epochs == 3  # no run: sections only


def test_load_params_unknown_run_is_named(tmp_path):
    path = write_params(tmp_path, {"runs": {"mae": {}}})
    with pytest.raises(ConfigError, match="'ghost'"):
        load_params(path, "ghost")


def test_load_params_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_broken_yaml_names_the_params_file_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: tiny\npretrain:\n  epochs: 2\n   batch_size: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}, line 4, column 14: invalid YAML: mapping values are not "
                              "allowed here")


def test_a_params_file_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- preset\n- tiny\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: expected a mapping") and "got a list" in str(err.value)


def test_load_params_reports_bad_values(tmp_path):
    path = write_params(tmp_path, {"pretrain": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        load_params(path)


def test_load_params_rejects_an_unknown_top_level_section(tmp_path):
    path = write_params(tmp_path, {"pretrian": {"epochs": 99}})
    with pytest.raises(ConfigError, match="pretrian"):
        load_params(path)


def test_repository_params_yaml_resolves_every_run():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    if not path.is_file():
        pytest.skip("no params.yaml in the repository")
    runs = yaml.safe_load(path.read_text()).get("runs") or {}
    for run in runs:
        assert isinstance(load_params(path, run), Config)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "default", "paper"])
def test_save_then_build_from_the_yaml_round_trips(tmp_path, preset):
    sections = {"data": {"root": "/imagenet", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}} \
        if preset == "paper" else {"pretrain": {"base_lr": 1e-5, "min_lr": 1e-7}}
    cfg = build_config(preset, sections)
    cfg.save(tmp_path / "out" / "config.yaml")
    loaded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert list(loaded) == list(SECTIONS)
    again = build_config("default", loaded)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def preset_config(name: str) -> Config:
    return build_config(name, {"data": {"root": "/imagenet"}} if name == "paper" else None)


def test_paper_preset_needs_a_root():
    assert "data.root" in config_error(preset="paper")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds_its_model(name):
    cfg = preset_config(name)
    start = time.perf_counter()
    # the meta device builds the architecture without allocating (ViT-B would take seconds)
    with torch.device("meta"):
        model = MaskedAutoencoder(cfg.model, cfg.data)
    assert time.perf_counter() - start < 10
    enc = model.encoder
    assert len(enc.blocks) == cfg.model.depth
    assert enc.embed_dim == cfg.model.embed_dim
    assert enc.blocks[0].attn.num_heads == cfg.model.num_heads
    assert enc.patch_embed.proj.kernel_size == (cfg.model.patch_size,) * 2
    assert enc.patch_embed.proj.in_channels == cfg.data.in_chans
    grid = cfg.data.img_size // cfg.model.patch_size
    assert model.num_patches == grid * grid
    assert enc.pos_embed.shape == (1, 1 + grid * grid, cfg.model.embed_dim)
    assert len(model.decoder_blocks) == cfg.model.decoder_depth
    assert model.decoder_embed.out_features == cfg.model.decoder_dim
    assert model.decoder_pred.out_features == cfg.model.patch_size ** 2 * cfg.data.in_chans


def test_presets_have_the_documented_sizes():
    tiny, default, paper = (preset_config(n) for n in ("tiny", "default", "paper"))
    assert (tiny.model.depth, tiny.model.embed_dim) == (2, 64)
    assert (default.model.depth, default.model.embed_dim) == (4, 128)
    assert (paper.model.depth, paper.model.embed_dim, paper.model.num_heads) == (12, 768, 12)
    assert (paper.model.patch_size, paper.data.img_size, paper.data.in_chans) == (16, 224, 3)
    assert (paper.model.decoder_depth, paper.model.decoder_dim) == (8, 512)
    assert paper.pretrain.batch_size == 4096 and paper.pretrain.epochs == 800


def test_default_preset_model_runs_forward():
    cfg = preset_config("default")
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model, cfg.data)
    out = model(torch.randn(2, 1, 28, 28))
    assert out["pred"].shape == (2, 49, 16) and torch.isfinite(out["loss"])


def test_the_pipeline_seed_drives_pretraining_fine_tuning_and_the_probes():
    runs = {"mae": {"method": {"name": "mae"}, "finetune": {"seed": 7}}}
    cfg = config_for_run("tiny", {}, runs, "mae", seed=3)
    assert (cfg.pretrain.seed, cfg.finetune.seed, cfg.evaluation.seed) == (3, 3, 3)
    assert cfg.method.name == "mae"  # the run's own overrides still apply
    assert config_for_run("tiny", {}, runs, "mae").finetune.seed == 7  # no pipeline seed: as set
    assert config_for_run("tiny", {}, runs, "mae", seed=3).data.split_seed == 0  # split: fixed


def test_load_params_takes_the_seed_and_knows_the_pipeline_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", "seeds": [0, 1], "comparisons": [["a", "b"]],
                                    "ablations": {}, "small_data": {}, "runs": {"a": {}}}))
    assert load_params(path, "a", seed=1).pretrain.seed == 1
