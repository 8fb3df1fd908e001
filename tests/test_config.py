import pytest

from dmquant.config import QuantConfig, WeightQuantConfig, list_recipes, load_recipe, save_recipe
from dmquant.errors import DMQuantError


def test_shipped_recipes_load_and_tag():
    assert {"w8a8", "w4a8", "w4a16"} <= set(list_recipes())
    assert load_recipe("w8a8").tag == "W8A8"
    assert load_recipe("w4a8").weights.bits == 4 and load_recipe("w4a8").activations.bits == 8
    w4a16 = load_recipe("w4a16")
    assert w4a16.activations is None and not w4a16.needs_calibration_data


@pytest.mark.parametrize("name", ["w4a8", "w4a4-svd", "w4a8-ptqd"])
def test_recipe_round_trips_through_yaml(tmp_path, name):
    config = load_recipe(name)
    save_recipe(config, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again == config
    searched = QuantConfig.from_dict({**config.to_dict(), "smoothing": {"alpha": None, "search_grid": [0.3, 0.6]}})
    save_recipe(searched, tmp_path / "s.yaml")
    assert load_recipe(tmp_path / "s.yaml") == searched


def test_digest_names_what_the_recipe_computes(tmp_path):
    import dataclasses

    config = load_recipe("auto")
    save_recipe(config, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml").digest() == config.digest()  # the same recipe read back
    assert dataclasses.replace(config, name="x", description="y").digest() == config.digest()
    changed = dataclasses.replace(config, reconstruction=dataclasses.replace(config.reconstruction, iterations=1601))
    assert changed.digest() != config.digest() and len(config.digest()) == 12
    # a setting added later (mixed_precision.guided) leaves the digests stored before it alone while at its default
    import hashlib
    import json

    before = {k: v for k, v in config.to_dict().items() if k not in ("name", "description")}
    del before["mixed_precision"]["guided"]  # the recipe as digested before the field existed
    assert config.digest() == hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    guided = dataclasses.replace(config, mixed_precision=dataclasses.replace(config.mixed_precision, guided=True))
    assert guided.digest() != config.digest()


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(DMQuantError, match="unknown recipe 'w3a3'.*w4a16, .*w4a8, .*w8a8"):
        load_recipe("w3a3")


@pytest.mark.parametrize("bits", [1, 9, "8"])
def test_bad_bit_width(bits):
    with pytest.raises(DMQuantError, match="weights.bits"):
        QuantConfig.from_dict({"weights": {"bits": bits}})


def test_bad_keys_and_choices(tmp_path):
    with pytest.raises(DMQuantError, match="unknown keys \\['bitz'\\]"):
        QuantConfig.from_dict({"weights": {"bitz": 4}})
    with pytest.raises(DMQuantError, match="activations.granularity='channel'"):
        QuantConfig.from_dict({"activations": {"granularity": "channel"}})
    with pytest.raises(DMQuantError, match="group_size"):
        WeightQuantConfig(bits=4, granularity="group")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: [1, 2\n")
    with pytest.raises(DMQuantError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(DMQuantError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_layer_overrides_resolve_by_exact_name_then_glob_and_round_trip():
    from dmquant.config import QuantConfig

    c = QuantConfig.from_dict({"weights": {"bits": 4, "method": "mse"},
                               "layers": {"down.0.conv": {"weights": {"bits": 8}}, "down.*": {"weights": {"bits": 3}},
                                          "up.*": {"activations": {"bits": 6}}}})
    assert c.layer_sections("down.0.conv")[0].bits == 8 and c.layer_sections("down.1.conv")[0].bits == 3
    assert c.layer_sections("down.1.conv")[0].method == "mse"  # keys left out keep the recipe's
    assert c.layer_sections("up.0")[1].bits == 6 and c.layer_sections("mid")[0].bits == 4
    assert QuantConfig.from_dict(c.to_dict()) == c and c.tag == "WmixedA8"


def test_layer_patterns_select_by_kind_and_weight_only_drops_the_input_quantizer():
    from dmquant.config import QuantConfig

    c = QuantConfig.from_dict({"activations": {"bits": 8, "granularity": "token"},
                               "layers": {"conv:*": {"weight_only": True},
                                          "linear:*.ff.*": {"activations": {"symmetric": True}}}})
    assert c.layer_sections("down.0.conv1", "conv") == (c.weights, None)
    assert c.layer_sections("down.0.ff.net.2", "linear")[1].symmetric is True
    assert c.layer_sections("down.0.ff.net.2", "conv") == (c.weights, None)  # a conv named like a linear
    assert c.layer_sections("down.0.to_q", "linear") == (c.weights, c.activations)
    assert c.layer_sections("down.0.conv1") == (c.weights, c.activations)  # no kind given: kind patterns skip it
    assert QuantConfig.from_dict(c.to_dict()) == c and c.tag == "W8A8"  # same bits everywhere: not "mixed"


@pytest.mark.parametrize("data, message", [
    ({"layers": {"a": {"weights": {"bits": 1}}}}, "layers['a'].weights: weights.bits=1"),
    ({"layers": {"norm:*": {"weight_only": True}}}, "kind before ':' must be one of linear, conv"),
    ({"include": ["conv:*", "attn:*"]}, "include pattern 'attn:*': a pattern's kind before ':' must be one of"),
    ({"exclude": ["Linear:*"]}, "exclude pattern 'Linear:*'"),
    ({"layers": {"a": {"weight_only": True, "activations": {"bits": 4}}}}, "drop one of the two"),
    ({"layers": {"a": {"weight_only": "yes"}}}, "weight_only"),
    ({"layers": {"a": {"weights": {"bitz": 4}}}}, "unknown keys ['bitz']"),
    ({"layers": {"a": {"precision": 4}}}, "unknown keys ['precision']"),
    ({"layers": [1]}, "must be a mapping of module-name patterns"),
    ({"activations": None, "layers": {"a": {"activations": {"bits": 4}}}}, "quantizes no activations"),
    ({"layers": {"a": {"weights": {"bits": 4}}}, "mixed_precision": {}}, "drop the 'weights' of the 'layers' overrides"),
    ({"mixed_precision": {"target_bits": 4, "max_weight_bytes": 10}}, "not both"),
    ({"mixed_precision": {"candidate_bits": [4, 9]}}, "candidate_bits"),
    ({"mixed_precision": {"weighting": "middle"}}, "mixed_precision.weighting='middle'"),
    ({"mixed_precision": {}, "low_rank": {"rank": 4}}, "does not combine with smoothing, rotation or low_rank"),
])
def test_bad_layer_overrides_and_budgets_fail_with_one_line(data, message):
    from dmquant.config import QuantConfig

    with pytest.raises(DMQuantError) as info:
        QuantConfig.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_package_carries_the_recipes():
    """A wheel holds only what is inside dmquant/: the recipes reach it through dmquant/recipes (a link to
    pipelines/, listed in pyproject's package data), so a non-editable install finds them too."""
    from pathlib import Path

    import dmquant

    root = Path(dmquant.__file__).resolve().parent
    shipped = sorted(p.name for p in (root / "recipes").glob("*.yaml"))
    assert shipped and shipped == sorted(p.name for p in (root.parent / "pipelines").glob("*.yaml"))
    section = (root.parent / "pyproject.toml").read_text().split("[tool.setuptools.package-data]\n")[1]
    assert '"recipes/*.yaml"' in section.split("\n[")[0]
