import pytest

from xtalforge.config import RunConfig, dump_toml, from_dict, load_config
from xtalforge.errors import ConfigError


def test_minimal_config_from_issue_loads(sw_config_file):
    cfg = load_config(sw_config_file)
    assert cfg.composition == "Si8" and cfg.oracle.name == "sw"
    assert cfg.search.max_oracle_calls == 20000
    assert cfg.resolve_path(cfg.search.target) == sw_config_file.parent / "diamond.cif"


def test_resolved_config_round_trips(sw_config_file, tmp_path):
    cfg = load_config(sw_config_file)
    cfg.structures.min_distances = {"Si-Si": 1.6}
    cfg.oracle.settings = {"device": "cpu"}
    out = tmp_path / "resolved.toml"
    out.write_text(dump_toml(cfg))
    again = load_config(out)
    assert again.structures.min_distances == {"Si-Si": 1.6}
    assert again.oracle.settings == {"device": "cpu"}
    assert again.relax == cfg.relax and again.search == cfg.search


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"composition": "Si8", "sead": 0}, "unknown key 'sead'"),
        ({"composition": "Si8", "search": {"max_oracle_cals": 5}}, "unknown key 'search.max_oracle_cals'"),
        ({"composition": "Si8", "search": {"max_oracle_calls": "many"}}, "search.max_oracle_calls must be an integer"),
        ({"composition": "Si8", "seed": 1.5}, "seed must be an integer"),
        ({"composition": "Si8", "relax": {"optimizer": "CG"}}, "relax.optimizer = 'CG' is not allowed"),
        ({"composition": "Si8", "oracle": "sw"}, "oracle must be a table"),
        ({"seed": 0}, "missing required key 'composition'"),
        ({"composition": "Si8", "relax": {"fmax": True}}, "relax.fmax must be a number"),
    ],
)
def test_bad_configs_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("composition = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_every_example_loads_with_its_commented_options_switched_on(tmp_path):
    import re
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    assert examples
    for example in examples:
        load_config(example)
        # "# key = value" lines are options a user may switch on: they must be valid keys too
        switched = re.sub(r"^# ([a-z_]+ = )", r"\1", example.read_text(), flags=re.MULTILINE)
        (tmp_path / example.name).write_text(switched)
        load_config(tmp_path / example.name)
