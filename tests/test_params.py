"""params.yaml is the `default` preset, holds every knob, and defines runs that validate."""

from pathlib import Path

import yaml

from pemae.config.params import SECTIONS, build_config, load_params
from pemae.config.schema import Config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_params_yaml_lists_every_knob_of_every_section():
    params = yaml.safe_load(PARAMS.read_text())
    every = Config().to_dict()
    for section in SECTIONS:
        assert set(params[section]) == set(every[section]), f"params.yaml section {section!r}"


def test_params_yaml_is_the_default_preset():
    params = yaml.safe_load(PARAMS.read_text())
    assert params["preset"] == "default"
    assert build_config("default", {s: params[s] for s in SECTIONS}) == build_config("default")


def test_every_run_in_params_yaml_resolves():
    runs = yaml.safe_load(PARAMS.read_text())["runs"]
    assert {"mae", "random"} <= set(runs)
    assert load_params(PARAMS, "random").pretrain.epochs == 0
    for run in runs:
        load_params(PARAMS, run)


def test_every_ablation_run_resolves_and_the_pipeline_keys_are_consistent():
    params = yaml.safe_load(PARAMS.read_text())
    for run, overrides in params["ablations"].items():
        assert run not in params["runs"]
        assert load_params(PARAMS, None, overrides).method.name == "pemae"
    assert len(params["seeds"]) >= 3 and len(set(params["seeds"])) == len(params["seeds"])
    known = set(params["runs"]) | {"pixels"}
    assert all(len(pair) == 2 and set(pair) <= known for pair in params["comparisons"])
    assert set(params["small_data"]["runs"]) <= set(params["runs"])
    named = set(params["runs"]) | set(params["ablations"])
    assert params["claims"] and all(len(pair) == 2 and set(pair) <= named for pair in params["claims"].values())
    for run in params["ablations"]:  # an ablation run resolves by name, as the study stage asks
        assert load_params(PARAMS, run, seed=1).pretrain.seed == 1
