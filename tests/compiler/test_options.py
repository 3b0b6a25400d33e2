"""DataInputConfig and CompilerOptions parsing."""

from __future__ import annotations

import json

import pytest
from kiln_compiler.errors import ClientError
from kiln_compiler.loaders import resolve_shapes
from kiln_compiler.options import CompilerOptions, DataInputConfig


@pytest.mark.parametrize(
    ("raw", "by_name", "by_position"),
    [
        ('{"data": [1, 3, 224, 224]}', {"data": (1, 3, 224, 224)}, ()),
        ('{"var1": [1,1,28,28], "var2": [1,1,28,28]}', {"var1": (1, 1, 28, 28), "var2": (1, 1, 28, 28)}, ()),
        ("[[1,3,224,224], [1,3,160,160]]", {}, ((1, 3, 224, 224), (1, 3, 160, 160))),
        ("[1, 3, 224, 224]", {}, ((1, 3, 224, 224),)),
        ("{'input0': [1, 3, 224, 224]}", {"input0": (1, 3, 224, 224)}, ()),
    ],
    ids=["dict", "two-inputs", "pytorch-list", "bare-shape", "python-literal"],
)
def test_data_input_config_forms(raw: str, by_name: dict[str, tuple[int, ...]],
                                 by_position: tuple[tuple[int, ...], ...]) -> None:
    # GIVEN a DataInputConfig in one of the reference's forms
    # WHEN it is parsed
    cfg = DataInputConfig.parse(raw, "PYTORCH")
    # THEN names and shapes come out as declared, and the canonical JSON round-trips
    assert cfg.by_name == by_name
    assert cfg.by_position == by_position
    assert DataInputConfig.parse(cfg.to_json(), "PYTORCH") == DataInputConfig(by_name, by_position)


@pytest.mark.parametrize("raw", ['{"data": [1, 3, "a"]}', '{"data": [1, 0, 3]}', '"just a string"', "{not json"])
def test_bad_data_input_config(raw: str) -> None:
    # GIVEN a malformed DataInputConfig
    # WHEN parsed
    # THEN a ClientError in SageMaker style explains it
    with pytest.raises(ClientError) as err:
        DataInputConfig.parse(raw, "ONNX")
    assert err.value.reason.startswith("ClientError: InputConfiguration:")
    assert "dataInputConfig" in err.value.reason  # names the member, as the API's check does


def test_resolve_shapes_mismatch_names_the_input() -> None:
    # GIVEN a model input of shape [1,3,224,224] and a DataInputConfig in NHWC
    cfg = DataInputConfig.parse('{"data": [1, 224, 224, 3]}', "ONNX")
    # WHEN shapes are resolved
    with pytest.raises(ClientError) as err:
        resolve_shapes([("data", (1, 3, 224, 224), "float32")], cfg, "ONNX")
    # THEN the error names the input and both shapes
    assert "'data'" in str(err.value)
    assert "[1, 224, 224, 3]" in str(err.value) and "NCHW" in str(err.value)


def test_resolve_shapes_fills_dynamic_dims_and_rejects_unknown_names() -> None:
    # GIVEN a model with a dynamic batch dimension
    declared: list[tuple[str, tuple[int | None, ...], str]] = [("x", (None, 8), "float32")]
    # WHEN DataInputConfig gives the batch / names an unknown input / is absent
    specs = resolve_shapes(declared, DataInputConfig.parse('{"x": [4, 8]}', "ONNX"), "ONNX")
    with pytest.raises(ClientError, match=r"\['y'\] that the ONNX model does not have"):
        resolve_shapes(declared, DataInputConfig.parse('{"y": [4, 8]}', "ONNX"), "ONNX")
    with pytest.raises(ClientError, match="input 'x' has a dynamic shape"):
        resolve_shapes(declared, DataInputConfig(), "ONNX")
    # THEN the given shape fills the dynamic dimension
    assert specs[0].shape == (4, 8)


def test_compiler_options_json_and_python_literal() -> None:
    # GIVEN CompilerOptions as JSON and as the reference's Python-literal form
    # WHEN parsed
    a = CompilerOptions.parse(json.dumps({"mcpu": "neoverse-n1", "mattr": ["+neon"], "dtype": "float"}))
    b = CompilerOptions.parse("{'gpu-code': 'sm_62', 'trt-ver': '6.0.1', 'cuda-ver': '10.0'}")
    # THEN the values are normalised
    assert (a.mcpu, a.mattr, a.dtype) == ("neoverse-n1", ("+neon",), "float32")
    assert b.gpu_code == "sm_62"


@pytest.mark.parametrize("raw", ['{"bogus": 1}', '{"mattr": "neon"}', "{'gpu-code': 'turing'}", '{"dtype": "q4"}',
                                 '{"allow_pickle": "yes"}', "[1, 2]"])
def test_bad_compiler_options(raw: str) -> None:
    # GIVEN an invalid CompilerOptions string
    # WHEN parsed
    # THEN ClientError
    with pytest.raises(ClientError):
        CompilerOptions.parse(raw)


def test_compiler_loads_exactly_the_frameworks_the_api_accepts() -> None:
    # GIVEN the API's framework rules (kiln.catalog) and the compiler's loader registry
    from kiln.catalog import ALL_FRAMEWORKS, UNAVAILABLE_FRAMEWORKS
    from kiln_compiler.loaders import available_frameworks

    # WHEN compared THEN every framework the API accepts has a loader, and no loader is unreachable
    assert set(available_frameworks()) == set(ALL_FRAMEWORKS) - set(UNAVAILABLE_FRAMEWORKS)
