"""QuantSpec / Scheme / Recipe: validation, dict and YAML round trips, module matching."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lowbit.algorithms import ALGORITHMS
from lowbit.errors import LowbitError
from lowbit.presets import PRESETS, get_preset
from lowbit.recipes import load_recipe, recipe_from_dict
from lowbit.scheme import (
    Override,
    QuantSpec,
    Recipe,
    Scheme,
    Step,
    scheme_from_dict,
    spec_from_dict,
    to_dict,
    with_group_size,
)

W4 = QuantSpec("int4", "group", 128)
W8 = QuantSpec("int8", "channel", None)
A8 = QuantSpec("int8", "token", None, dynamic=True)


class Linear:  # stand-ins: matching looks only at the class name
    pass


class Conv1D:
    pass


class Embedding:
    pass


def _custom_recipe() -> Recipe:
    scheme = Scheme(
        weights=QuantSpec("uint4", "group", 64, symmetric=False, observer="mse",
                          observer_args={"grid": 50, "maxshrink": 0.5}, scale_dtype="float16"),
        input_activations=QuantSpec("fp8_e4m3", "tensor", None, observer="percentile",
                                    observer_args={"percentile": 99.9}),
        kv_cache=QuantSpec("int8", "head", None, dynamic=True),
        targets=("Linear", "re:.*\\.experts\\.\\d+\\..*"),
        ignore=("lm_head", "mlp.gate"),
        overrides=(
            Override("down_proj", W8, None),
            Override("re:model\\.layers\\.0\\..*", None, None),
        ),
    )  # fmt: skip
    return Recipe(scheme=scheme, steps=(Step("rtn"), Step("gptq", {"block_size": 128})), name="mine")


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_dict_round_trip(name: str) -> None:
    recipe = get_preset(name)
    assert recipe.name == name and recipe.steps == PRESETS[name].steps
    kinds = [ALGORITHMS[step.name].kind for step in recipe.steps]
    # transforms first, then a quantizer (and optionally steps refining its result)
    assert "quantizer" in kinds and kinds[-1] != "transform"
    assert kinds.index("quantizer") > max((i for i, k in enumerate(kinds) if k == "transform"), default=-1)
    d = recipe.to_dict()
    assert d == to_dict(recipe)
    assert recipe_from_dict(d) == recipe
    # plain data only: safe YAML can write it
    yaml.safe_dump(d)
    # "preset: NAME" alone gives the preset
    assert recipe_from_dict({"preset": name}) == recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_yaml_round_trip(name: str, tmp_path: Path) -> None:
    recipe = get_preset(name)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe


def test_custom_recipe_round_trips(tmp_path: Path) -> None:
    recipe = _custom_recipe()
    d = recipe.to_dict()
    assert d["steps"] == [{"rtn": {}}, {"gptq": {"block_size": 128}}]
    assert d["scheme"]["overrides"][1] == {"pattern": "re:model\\.layers\\.0\\..*", "weights": None,
                                           "input_activations": None}  # fmt: skip
    back = recipe_from_dict(d)
    assert back == recipe
    assert back.scheme.overrides[1].weights is None
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_recipe(path) == recipe


def test_spec_dict_round_trip_every_field() -> None:
    spec = QuantSpec("uint3", "channel", None, symmetric=False, observer="percentile",
                     observer_args={"percentile": 99.0}, scale_dtype="bfloat16")  # fmt: skip
    d = to_dict(spec)
    assert d == {"format": "uint3", "granularity": "channel", "group_size": None, "symmetric": False,
                 "dynamic": False, "observer": "percentile", "observer_args": {"percentile": 99.0},
                 "scale_dtype": "bfloat16"}  # fmt: skip
    assert spec_from_dict(d, "w") == spec


def test_preset_with_replaced_parts() -> None:
    r = recipe_from_dict({"preset": "w4a16", "steps": [{"gptq": {"damp": 0.01}}], "name": "x"})
    assert r.scheme == get_preset("w4a16").scheme
    assert r.steps == (Step("gptq", {"damp": 0.01}),) and r.name == "x"
    r2 = recipe_from_dict({"preset": "w4a16", "scheme": {"weights": {"format": "int8", "granularity": "channel"}}})
    base = get_preset("w4a16").scheme.weights
    assert base is not None  # the preset's other weight fields stay: fp16 scales, MSE ranges
    assert r2.scheme.weights == dataclasses.replace(base, format="int8", granularity="channel", group_size=None)
    assert r2.name == "w4a16-custom"  # a changed preset says so
    assert recipe_from_dict({"scheme": {}}).steps == (Step("rtn"),)
    assert recipe_from_dict({"scheme": {}, "steps": ["rtn", {"gptq": None}]}).steps == (
        Step("rtn"), Step("gptq"),
    )  # fmt: skip


def test_override_fields_default_to_the_scheme() -> None:
    scheme = scheme_from_dict({
        "weights": {"format": "int4", "group_size": 64},
        "input_activations": {"format": "int8", "granularity": "token", "dynamic": True},
        "overrides": [
            {"pattern": "down_proj", "weights": {"format": "int8"}},
            {"pattern": "up_proj", "input_activations": None},
            {"pattern": "o_proj"},
        ],
    })  # fmt: skip
    o1, o2, o3 = scheme.overrides
    assert o1.weights == QuantSpec("int8", "group", 64)  # group_size inherited from the scheme
    assert o1.input_activations == scheme.input_activations
    assert o2.weights == scheme.weights and o2.input_activations is None
    assert (o3.weights, o3.input_activations) == (scheme.weights, scheme.input_activations)


# --- misspellings and bad input --------------------------------------------------------------------


def test_misspelled_spec_field_names_path_and_suggests() -> None:
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"scheme": {"weights": {"format": "int4", "grup_size": 64}}})
    msg = str(e.value)
    assert "recipe.scheme.weights" in msg
    assert "'grup_size'" in msg and "did you mean 'group_size'" in msg


def test_misspelled_field_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "my_recipe.yaml"
    path.write_text("scheme:\n  weights:\n    format: int4\n    grup_size: 64\nsteps: [rtn]\n")
    with pytest.raises(LowbitError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "my_recipe.yaml.scheme.weights" in msg and "did you mean 'group_size'" in msg


@pytest.mark.parametrize(
    ("data", "path", "suggest"),
    [
        ({"scheem": {}}, "recipe", "scheme"),
        ({"scheme": {"wieghts": None}}, "recipe.scheme", "weights"),
        ({"scheme": {"input_activation": None}}, "recipe.scheme", "input_activations"),
        ({"scheme": {"kv_cache": {"formt": "int8"}}}, "recipe.scheme.kv_cache", "format"),
        ({"scheme": {"overrides": [{"pattern": "x", "wieghts": None}]}}, "recipe.scheme.overrides[0]",
         "weights"),
        ({"scheme": {"weights": {"format": "int4"},
                     "overrides": [{"pattern": "x", "weights": {"symetric": True}}]}},
         "recipe.scheme.overrides[0].weights", "symmetric"),
        ({"scheme": {"weights": {"observer_arg": {}}}}, "recipe.scheme.weights", "observer_args"),
    ],
)  # fmt: skip
def test_misspellings_everywhere(data: dict, path: str, suggest: str) -> None:
    with pytest.raises(LowbitError) as e:
        recipe_from_dict(data)
    msg = str(e.value)
    assert msg.startswith(path + ":"), msg
    assert f"did you mean '{suggest}'" in msg


def test_unknown_preset() -> None:
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"preset": "w5a16"})
    msg = str(e.value)
    assert "'w5a16'" in msg and "w4a16" in msg and "w8a8" in msg
    with pytest.raises(LowbitError, match="unknown preset"):
        get_preset("W4A16")


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [unclosed\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(LowbitError, match="give a 'scheme' or a 'preset'"):
        load_recipe(empty)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"scheme": {}, "steps": []}, "non-empty list"),
        ({"scheme": {}, "steps": "rtn"}, "non-empty list"),
        ({"scheme": {}, "steps": [{"rtn": 3}]}, "must be a mapping"),
        ({"scheme": {}, "steps": [{"rtn": {}, "gptq": {}}]}, "one-key mapping"),
        ({"scheme": {"overrides": [{"weights": None}]}}, "needs a 'pattern'"),
        ({"scheme": {"weights": "int4"}}, "expected a mapping"),
        ({"scheme": {"weights": {"format": "int5x"}}}, "unknown number format"),
        ({"scheme": {"targets": "Linear"}}, "list of module patterns"),
        ({"scheme": {"ignore": "lm_head"}}, "list of module patterns"),
        ({"scheme": {"ignore": [3]}}, "list of module patterns"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_recipe_data(data: object, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        recipe_from_dict(data)  # type: ignore[arg-type]


# --- invalid combinations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "fp8_e4m3", "symmetric": False}, "float format"),
        ({"format": "fp4_e2m1", "granularity": "channel", "symmetric": False}, "float format"),
        ({"format": "int8", "granularity": "token"}, "dynamic=true"),
        ({"granularity": "group", "group_size": None}, "positive integer group_size"),
        ({"granularity": "group", "group_size": 0}, "positive integer group_size"),
        ({"granularity": "group", "group_size": "128"}, "group_size: expected an integer, got .128."),
        ({"granularity": "block"}, "granularity 'block'"),
        ({"observer": "max"}, "observer 'max'"),
        ({"scale_dtype": "e8m0"}, "scale_dtype 'e8m0'"),
        ({"format": "int16"}, "unknown number format"),
    ],
)
def test_invalid_spec(kwargs: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        QuantSpec(**kwargs)


def test_non_group_granularity_drops_group_size() -> None:
    assert QuantSpec("int8", "channel", 128).group_size is None
    assert QuantSpec("int8", "channel", 128) == W8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": QuantSpec("int8", "channel", None, dynamic=True)}, "dynamic=true is for activations"),
        ({"weights": QuantSpec("int8", "token", None, dynamic=True)}, "granularity 'token'"),
        ({"weights": QuantSpec("int8", "head", None)}, "granularity 'head'"),
        ({"input_activations": QuantSpec("int8", "group", 32)}, "input_activations"),
        ({"input_activations": QuantSpec("int8", "channel", None)}, "input_activations"),
        ({"kv_cache": QuantSpec("int8", "group", 32)}, "kv_cache"),
    ],
)
def test_invalid_scheme(kwargs: dict, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        Scheme(**kwargs)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (Override("x", QuantSpec("int8", "channel", None, dynamic=True), None), "override 'x': weights are"),
        (Override("x", QuantSpec("int8", "token", None, dynamic=True), None), "override 'x': weights cannot"),
        (Override("x", None, QuantSpec("int8", "group", 32)), "override 'x': input_activations"),
    ],
)
def test_invalid_override_specs(override: Override, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        Scheme(weights=W4, overrides=(override,))
    with pytest.raises(LowbitError, match=r"recipe\.scheme: override 'x'"):
        recipe_from_dict({"scheme": {"overrides": [to_dict(override)]}})


def test_pattern_list_errors_name_the_field() -> None:
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"scheme": {"targets": "Linear"}})
    assert str(e.value).startswith("recipe.scheme.targets: expected a list of module patterns")


def test_invalid_combination_from_dict_names_the_place() -> None:
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"scheme": {"weights": {"format": "fp8_e4m3", "granularity": "channel",
                                                 "symmetric": False}}})  # fmt: skip
    assert str(e.value).startswith("recipe.scheme.weights:") and "float format" in str(e.value)
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"scheme": {"weights": {"format": "int8", "granularity": "channel", "dynamic": True}}})
    assert str(e.value).startswith("recipe.scheme:") and "dynamic" in str(e.value)
    with pytest.raises(LowbitError) as e:
        recipe_from_dict({"scheme": {"input_activations": {"format": "int8", "granularity": "token"}}})
    assert str(e.value).startswith("recipe.scheme.input_activations:") and "dynamic=true" in str(e.value)


# --- matching modules ------------------------------------------------------------------------------


def test_targets_and_ignore() -> None:
    s = Scheme(weights=W4)  # targets Linear, ignore lm_head
    assert s.is_target("model.layers.0.mlp.down_proj", Linear())
    assert not s.is_target("lm_head", Linear())  # ignore wins over targets
    assert not s.is_target("model.lm_head", Linear())  # suffix after a dot
    assert s.is_target("model.not_lm_head", Linear())  # a suffix is whole dotted parts only
    assert not s.is_target("model.embed_tokens", Embedding())
    s2 = Scheme(weights=W4, targets=("re:.*\\.mlp\\..*", "Conv1D"), ignore=("re:.*layers\\.1\\..*", "Embedding"))
    assert s2.is_target("model.layers.0.mlp.up_proj", Linear())
    assert not s2.is_target("model.layers.0.self_attn.q_proj", Linear())  # not targeted
    assert s2.is_target("h.0.attn.c_attn", Conv1D())  # by class name
    assert not s2.is_target("model.layers.1.mlp.up_proj", Linear())  # ignored by regex
    assert not s2.is_target("model.layers.2.mlp.wte", Embedding())  # ignored by class, though targeted by re
    # re: is a full match, not a search
    s3 = Scheme(weights=W4, targets=("re:layers",), ignore=())
    assert not s3.is_target("model.layers.0", Linear()) and s3.is_target("layers", Linear())


def test_override_selection() -> None:
    w2 = QuantSpec("uint2", "group", 32, symmetric=False)
    s = Scheme(
        weights=W4,
        input_activations=A8,
        overrides=(
            Override("re:model\\.layers\\.0\\..*", W8, None),
            Override("mlp.down_proj", w2, A8),
            Override("Conv1D", None, None),
            Override("down_proj", W8, A8),  # never reached for names the one above catches
        ),
    )
    assert s.specs_for("model.layers.0.mlp.down_proj", Linear()) == (W8, None)  # first match wins
    assert s.specs_for("model.layers.3.mlp.down_proj", Linear()) == (w2, A8)  # dotted suffix
    assert s.specs_for("model.layers.3.attn.down_proj", Linear()) == (W8, A8)  # plain suffix
    assert s.specs_for("model.layers.3.mlp.xdown_proj", Linear()) == (W4, A8)  # no partial word
    assert s.specs_for("h.3.mlp.c_fc", Conv1D()) == (None, None)  # class name
    assert s.specs_for("model.layers.3.self_attn.q_proj", Linear()) == (W4, A8)  # defaults
    assert s.specs_for("model.layers.10.mlp.up_proj", Linear()) == (W4, A8)  # layers.1x != layers.0


def test_describe() -> None:
    assert W4.describe() == "int4 g128 sym"
    assert A8.describe() == "int8 token sym dyn"
    assert QuantSpec("uint4", "channel", None, symmetric=False, observer="mse").describe() == "uint4 channel asym mse"
    assert Scheme().describe() == "nothing quantized"
    assert QuantSpec("int4", "group", 32, scale_dtype="float16").describe() == "int4 g32 sym fp16-scale"
    assert QuantSpec("fp4_e2m1", "group", 32, scale_dtype="pow2").describe() == "fp4_e2m1 g32 sym pow2-scale"
    assert Scheme(weights=W8, input_activations=A8).describe() == "W: int8 channel sym; A: int8 token sym dyn"


def test_activation_presets_smooth_before_gptq() -> None:
    for name in ("w8a8", "w8a8-static", "w4a8"):
        recipe = get_preset(name)
        assert [s.name for s in recipe.steps] == ["smoothquant", "gptq"], name
        assert recipe.scheme.input_activations is not None and recipe.scheme.input_activations.bits == 8
    assert get_preset("w8a8").scheme.input_activations.dynamic  # type: ignore[union-attr]
    assert not get_preset("w8a8-static").scheme.input_activations.dynamic  # type: ignore[union-attr]
    assert [s.name for s in get_preset("w4a16-awq").steps] == ["awq", "rtn"]
    llm_int8 = get_preset("llm-int8").scheme.input_activations
    assert llm_int8 is not None and llm_int8.outlier_threshold == 6.0


def test_recipe_fields_merge_into_the_preset_field_by_field() -> None:
    r = recipe_from_dict({"preset": "w4a16", "scheme": {"weights": {"group_size": 64}}})
    base = get_preset("w4a16")
    assert base.scheme.weights is not None
    assert r.scheme.weights == dataclasses.replace(base.scheme.weights, group_size=64)
    assert r.steps == base.steps and r.name == "w4a16-g64"
    # null removes a spec; lists are replaced, not merged
    r = recipe_from_dict({"preset": "w8a8", "scheme": {"input_activations": None, "ignore": ["lm_head", "down_proj"]}})
    assert r.scheme.input_activations is None and r.scheme.ignore == ("lm_head", "down_proj")
    assert r.scheme.weights == get_preset("w8a8").scheme.weights and r.name == "w8a8-custom"
    assert recipe_from_dict({"preset": "w4a16", "steps": ["rtn"]}).name == "w4a16-rtn"
    assert recipe_from_dict({"preset": "w4a16", "scheme": {"weights": {"group_size": 128}}}).name == "w4a16"


def test_with_group_size() -> None:
    r = with_group_size(get_preset("w4a16"), 64)
    assert r.name == "w4a16-g64" and r.scheme.weights is not None and r.scheme.weights.group_size == 64
    ch = with_group_size(get_preset("w8a16"), 32)  # per-channel weights become grouped
    assert ch.scheme.weights is not None and (ch.scheme.weights.granularity, ch.scheme.weights.group_size) == (
        "group",
        32,
    )
    assert ch.name == "w8a16-g32"
    assert with_group_size(get_preset("w4a16"), 128) == get_preset("w4a16")
    with pytest.raises(LowbitError, match="quantizes no weights"):
        with_group_size(get_preset("kv8"), 64)
    with pytest.raises(LowbitError, match="positive integer"):
        with_group_size(get_preset("w4a16"), True)


# --- strict types: YAML's true, "64" and lists must not pass as something else -----------------------


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"group_size": True}, "r.yaml.scheme.weights.group_size: expected an integer, got true"),
        ({"group_size": "64"}, "group_size: expected an integer, got '64'"),
        ({"symmetric": "yes"}, "symmetric: expected true or false, got 'yes'"),
        ({"dynamic": 1}, "dynamic: expected true or false, got 1"),
        ({"format": 4}, "format: expected a string, got 4"),
        ({"observer": True}, "observer: expected a string, got true"),
        ({"observer_args": [0.2]}, "observer_args: expected a mapping"),
    ],
)
def test_spec_field_types_are_strict(weights: dict[str, Any], match: str) -> None:
    with pytest.raises(LowbitError) as err:
        recipe_from_dict({"scheme": {"weights": weights}}, where="r.yaml")
    assert match in str(err.value)


@pytest.mark.parametrize(
    ("scheme", "match"),
    [
        ({"overrides": 5}, "r.yaml.scheme.overrides: expected a list"),
        ({"overrides": [{"pattern": "re:(", "weights": None}]}, "'re:(' is not a valid regular expression"),
        ({"targets": ["re:[a-"]}, "targets: 're:[a-' is not a valid regular expression"),
        ({"ignore": ["re:*"]}, "ignore: 're:*' is not a valid regular expression"),
    ],
)
def test_scheme_structure_errors(scheme: dict[str, Any], match: str) -> None:
    with pytest.raises(LowbitError, match=re.escape(match)):
        recipe_from_dict({"scheme": scheme}, where="r.yaml")


def test_recipe_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfescheme: {}\n")
    with pytest.raises(LowbitError, match="is not UTF-8 text"):
        load_recipe(path)
