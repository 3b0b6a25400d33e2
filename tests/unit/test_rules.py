"""Semantic rules of CreateCompilationJob (kiln.rules), including every example of the reference text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kiln import rules
from kiln.catalog import UNAVAILABLE_FRAMEWORKS, Family, TargetCatalog
from kiln.errors import ValidationError

from .conftest import create_request

CATALOG = TargetCatalog()


def request_for(framework: str = "ONNX", data: str | None = None, *, device: str | None = "ml_c4",
                platform: dict[str, str] | None = None, options: str | None = None,
                version: str | None = None, uri: str = "s3://models-bucket/m/model.tar.gz") -> dict[str, Any]:
    input_config: dict[str, Any] = {"S3Uri": uri, "Framework": framework}
    if data is not None:
        input_config["DataInputConfig"] = data
    if version is not None:
        input_config["FrameworkVersion"] = version
    output: dict[str, Any] = {"S3OutputLocation": "s3://artifacts-bucket/out"}
    if platform is not None:
        output["TargetPlatform"] = platform
    elif device is not None:
        output["TargetDevice"] = device
    if options is not None:
        output["CompilerOptions"] = options
    return create_request(InputConfig=input_config, OutputConfig=output)


def refused(request: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        rules.check_create(request, CATALOG)
    message = info.value.message
    assert message.startswith("1 validation error detected: "), message
    return message


# -- DataInputConfig: the reference's examples, per framework ------------------------------------------
REFERENCE_DATA_INPUT_EXAMPLES = [
    # TensorFlow (NHWC), one and two inputs; the CLI form is the same string once the shell/JSON unescapes it.
    ("TENSORFLOW", '{"input":[1,1024,1024,3]}'),
    ("TENSORFLOW", json.loads('"{\\"input\\":[1,1024,1024,3]}"')),
    ("TENSORFLOW", '{"data1": [1,28,28,1], "data2":[1,28,28,1]}'),
    # Keras (NCHW).
    ("KERAS", '{"input_1":[1,3,224,224]}'),
    ("KERAS", '{"input_1": [1,3,224,224], "input_2":[1,3,224,224]}'),
    # MXNet/ONNX/DARKNET (NCHW).
    ("MXNET", '{"data":[1,3,1024,1024]}'),
    ("MXNET", '{"var1": [1,1,28,28], "var2":[1,1,28,28]}'),
    ("ONNX", '{"data":[1,3,1024,1024]}'),
    ("DARKNET", '{"data":[1,3,416,416]}'),
    # PyTorch dictionary and list forms.
    ("PYTORCH", '{"input0":[1,3,224,224]}'),
    ("PYTORCH", '[[1,3,224,224]]'),
    ("PYTORCH", '{"input0":[1,3,224,224], "input1":[1,3,224,224]}'),
    ("PYTORCH", '[[1,3,224,224], [1,3,224,224]]'),
    # TensorFlow SavedModel / frozen graph examples.
    ("TENSORFLOW", '{"inputs": [1, 224, 224, 3]}'),
    ("TENSORFLOW", '{"input_tensor:0": [1, 224, 224, 3]}'),
    ("TFLITE", '{"input": [1, 224, 224, 3]}'),
]


@pytest.mark.parametrize(("framework", "data"), REFERENCE_DATA_INPUT_EXAMPLES)
def test_reference_data_input_examples_are_accepted(framework: str, data: str) -> None:
    # GIVEN a DataInputConfig example from the reference text for its framework, on a CPU target
    request = request_for(framework, data, device="ml_c5")
    target = CATALOG.device("ml_c5")
    # WHEN the semantic rules run
    # THEN the request is accepted for that target (frameworks this deployment cannot load are refused
    # for that reason alone, not for their DataInputConfig) and the parser yields one spec per input
    if framework in UNAVAILABLE_FRAMEWORKS:
        assert "is not supported by this deployment" in refused(request)
    else:
        assert rules.check_create(request, CATALOG).name == "ml_c5"
    specs = rules.parse_data_input_config(data, framework, target)
    parsed = json.loads(data)
    assert len(specs) == len(parsed)
    assert all(spec.shape is not None and all(d > 0 for d in spec.shape) for spec in specs)


def test_pytorch_list_form_has_unnamed_inputs_in_order() -> None:
    # GIVEN PyTorch's list form with two shapes
    # WHEN it is parsed
    specs = rules.parse_data_input_config("[[1,3,224,224], [1,3,160,160]]", "PYTORCH")
    # THEN the inputs keep their order and have no names
    assert [s.name for s in specs] == [None, None]
    assert [s.shape for s in specs] == [(1, 3, 224, 224), (1, 3, 160, 160)]


@pytest.mark.parametrize("framework", ["XGBOOST", "SKLEARN"])
def test_tree_frameworks_need_no_data_input_config(framework: str) -> None:
    # GIVEN a tree model with and without a DataInputConfig ("input data name and shape are not needed")
    for data in (None, '{"anything": [1, 2]}'):
        request = request_for(framework, data, device="ml_c4")
        # WHEN the rules run / THEN they accept it and ignore the inputs
        assert rules.check_create(request, CATALOG).name == "ml_c4"
        assert rules.parse_data_input_config(data, framework) == []


COREML_EXAMPLES = [
    # (framework, DataInputConfig, CompilerOptions)
    ("TENSORFLOW", '{"input_1": {"shape": [1,224,224,3]}}', None),
    ("TENSORFLOW", '{"input_1": {"shape": ["1..10", 224, 224, 3]}}', None),
    ("KERAS", '{"input_1": {"shape": [[1, 224, 224, 3], [1, 160, 160, 3]]}}', None),
    ("TENSORFLOW", '{"input_1": {"shape": ["1..10", 224, 224, 3], "default_shape": [1, 224, 224, 3]}}', None),
    ("TENSORFLOW", '{"input_1": {"shape": [[1,224,224,3], [1,160,160,3]], "default_shape": [1,224,224,3]}}', None),
    ("PYTORCH", '[{"shape": [[1,3,224,224], [1,3,160,160]], "default_shape": [1,3,224,224]}]', None),
    ("TENSORFLOW", '{"input_1": {"shape": [[1,224,224,3], [1,160,160,3]], "default_shape": [1,224,224,3], '
                   '"type": "Image", "bias": [-1,-1,-1], "scale": 0.007843137255}}',
     '{"class_labels": "imagenet_labels_1000.txt"}'),
    ("PYTORCH", '[{"shape": [[1,3,224,224], [1,3,160,160]], "default_shape": [1,3,224,224], "type": "Image", '
                '"bias": [-1,-1,-1], "scale": 0.007843137255}]',
     '{"class_labels": "imagenet_labels_1000.txt"}'),
]


@pytest.mark.parametrize(("framework", "data", "options"), COREML_EXAMPLES)
def test_reference_coreml_examples_are_accepted(framework: str, data: str, options: str | None) -> None:
    # GIVEN a CoreML example from the reference (static, range, enumerated shapes, default_shape, Image inputs)
    request = request_for(framework, data, device="coreml", options=options)
    # WHEN the rules run
    target = rules.check_create(request, CATALOG)
    # THEN it is accepted and the CoreML parameters are kept for the converter
    assert target.family is Family.COREML
    specs = rules.parse_data_input_config(data, framework, target)
    assert specs and all("shape" in s.coreml for s in specs)


@pytest.mark.parametrize(("data", "expected"), [
    ('{"input_1": {"shape": [1,224,224,3], "dtype": "float"}}', "Unknown CoreML input parameter"),
    ('{"input_1": {"default_shape": [1,224,224,3]}}', "needs 'shape'"),
    ('{"input_1": {"shape": ["1-10", 224, 224, 3]}}', "ranges"),
    ('{"input_1": {"shape": [1,224,224,3], "type": "Video"}}', "'Image' or 'Tensor'"),
    ('{"input_1": {"shape": [1,224,224,3], "type": "Image", "bias": "minus one"}}', "'bias'"),
    ('{"input_1": {"shape": [1,224,224,3], "type": "Image", "scale": "small"}}', "'scale'"),
    ('{"input_1": {"shape": [1,224,224,3], "bias": [-1, -1, -1]}}', "apply only to inputs of type 'Image'"),
    ('{"input_1": {"shape": [[1,224,224,3], [1,0,160,3]]}}', "positive integers"),
    ('{"input_1": {"shape": [1,224,224,3], "default_shape": [1, "224"]}}', "positive integers"),
])
def test_coreml_input_errors_name_the_member(data: str, expected: str) -> None:
    # GIVEN a malformed CoreML input description
    request = request_for("TENSORFLOW", data, device="coreml")
    # WHEN the rules run
    message = refused(request)
    # THEN the error names DataInputConfig and what is wrong
    assert "inputConfig.dataInputConfig" in message
    assert expected in message


@pytest.mark.parametrize(("framework", "data", "expected"), [
    ("TENSORFLOW", "[[1,224,224,3]]", "only for PYTORCH"),
    ("ONNX", "[[1,3,224,224]]", "only for PYTORCH"),
    ("PYTORCH", "[]", "at least one input"),
    ("ONNX", "{}", "dictionary of input name to shape"),
    ("ONNX", '"just a string"', "dictionary of input name to shape"),
    ("ONNX", "{not json", "must be a JSON object"),
    ("ONNX", '{"data": [1, 3, -224, 224]}', "positive integers"),
    ("ONNX", '{"data": [1, 3, 2.5, 224]}', "positive integers"),
    ("ONNX", '{"data": []}', "positive integers"),
    ("ONNX", '{"data": [true, 3]}', "positive integers"),
    ("ONNX", '{"data": [1, 1, 1, 1, 1, 1, 1, 1, 1]}', "at most 8"),
    ("KERAS", '{"input_1": {"shape": [1, 3, 224, 224]}}', "positive integers"),  # CoreML form off-CoreML
])
def test_data_input_config_errors_name_the_member(framework: str, data: str, expected: str) -> None:
    # GIVEN a DataInputConfig in a form the framework does not take
    request = request_for(framework, data, device="ml_c4")
    # WHEN the rules run
    message = refused(request)
    # THEN the error names inputConfig.dataInputConfig and explains the expected form
    assert "inputConfig.dataInputConfig" in message
    assert expected in message


def test_data_input_config_accepts_python_literal_form() -> None:
    # GIVEN a DataInputConfig written as a Python literal (single quotes)
    # WHEN it is parsed
    specs = rules.parse_data_input_config("{'data': [1, 3, 224, 224]}", "ONNX")
    # THEN it is read like JSON
    assert specs == [rules.InputSpec(name="data", shape=(1, 3, 224, 224))]


# -- CompilerOptions ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "device", "platform", "expected"), [
    ("{'mattr': ['+neon']}", None, {"Os": "LINUX", "Arch": "ARM_EABIHF"}, {"mattr": ["+neon"]}),
    ("{'mattr': ['+neon', '+vfpv4']}", "rasp3b", None, {"mattr": ["+neon", "+vfpv4"]}),
    ("{'mcpu': 'skylake-avx512'}", "ml_c5", None, {"mcpu": "skylake-avx512"}),
    ("{'gpu-code': 'sm_75', 'trt-ver': '8.6.1', 'cuda-ver': '13.0'}", "ml_g4dn", None,
     {"gpu-code": "sm_75", "trt-ver": "8.6.1", "cuda-ver": "13.0"}),
    ("{'gpu-code': 'sm_87', 'trt-ver': '10.3', 'cuda-ver': '13.0'}", None,
     {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"},
     {"gpu-code": "sm_87", "trt-ver": "10.3", "cuda-ver": "13.0"}),
    ('{"gpu-code": "sm_90a"}', None, {"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
     {"gpu-code": "sm_90a"}),
    ('{"gpu_code": "sm_75"}', None, {"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
     {"gpu-code": "sm_75"}),
    ('{"dtype" : "float32"}', "ml_c4", None, {"dtype": "float32"}),
    ('{"DTYPE": "long"}', "ml_c4", None, {"dtype": "int64"}),
    ('{"dtype": "float"}', "ml_c4", None, {"dtype": "float32"}),
    ('{"class_labels": "imagenet_labels_1000.txt"}', "coreml", None, {"class_labels": "imagenet_labels_1000.txt"}),
    ('{"signature_def_key": "serving_custom"}', "ml_c4", None, {"signature_def_key": "serving_custom"}),
    ('{"output_names": ["output_tensor:0"]}', "ml_c4", None, {"output_names": ["output_tensor:0"]}),
    ('{"mattr": "+neon,+vfpv4"}', "rasp3b", None, {"mattr": ["+neon", "+vfpv4"]}),
    ('{"tuning": {"trials": 64, "minutes": 5}}', "ml_c4", None, {"tuning": {"trials": 64, "minutes": 5}}),
    ('{"tuning": {"minutes": 2, "workers": 8}}', "ml_c5", None, {"tuning": {"minutes": 2, "workers": 8}}),
    ('{"tuning": {"trials": 8, "workers": 1}}', "rasp4b", None, {"tuning": {"trials": 8, "workers": 1}}),
    # bf16 where the CPU has native bf16 dot products: Zen 4, Sapphire Rapids (AMX too), Graviton3
    ('{"precision": "bf16", "mcpu": "znver4"}', "ml_c5", None, {"precision": "bf16", "mcpu": "znver4"}),
    ('{"precision": "bf16", "mcpu": "sapphirerapids"}', None, {"Os": "LINUX", "Arch": "X86_64"},
     {"precision": "bf16", "mcpu": "sapphirerapids"}),
    ('{"precision": "bf16", "mcpu": "neoverse-v1"}', None, {"Os": "LINUX", "Arch": "ARM64"},
     {"precision": "bf16", "mcpu": "neoverse-v1"}),
    ('{"precision": "bf16", "mattr": ["+avx512bf16"]}', "ml_c5", None,
     {"precision": "bf16", "mattr": ["+avx512bf16"]}),
    ('{"precision": "fp32"}', "ml_c4", None, {"precision": "fp32"}),
])
def test_compiler_options_examples_are_accepted(options: str, device: str | None, platform: dict[str, str] | None,
                                                 expected: dict[str, Any]) -> None:
    # GIVEN a CompilerOptions example (JSON or the Python-literal form the AWS docs use) for a fitting target
    framework = "TENSORFLOW" if device == "coreml" else "ONNX"
    data = '{"input_1": [1, 224, 224, 3]}'
    request = request_for(framework, data, device=device, platform=platform, options=options)
    # WHEN the rules run
    target = rules.check_create(request, CATALOG)
    # THEN the request is accepted and the options parse to the normalised dictionary
    assert rules.parse_compiler_options(options, target) == expected


@pytest.mark.parametrize(("options", "device", "platform", "expected"), [
    ("not json at all", "ml_c4", None, "must be a JSON object"),
    ('["mcpu"]', "ml_c4", None, "JSON object of compiler options"),
    ('"--verbose 1 --num-neuroncores 2 -O2"', "ml_c4", None, "JSON object of compiler options"),
    ('{"opt-level": 3}', "ml_c4", None, "Unknown compiler option(s) opt-level"),
    ('{"mcpu": "skylake avx512; rm -rf /"}', "ml_c4", None, "'mcpu'"),
    ('{"mattr": ["neon"]}', "rasp3b", None, "'mattr'"),
    ('{"mattr": 7}', "rasp3b", None, "'mattr'"),
    ('{"gpu-code": "sm_7x"}', "ml_g4dn", None, "'gpu-code'"),
    ('{"cuda-ver": "ten"}', "ml_g4dn", None, "'cuda-ver'"),
    ('{"trt-ver": "6.0.1.2.3"}', "ml_g4dn", None, "'trt-ver'"),
    ('{"dtype": "complex128"}', "ml_c4", None, "'dtype'"),
    ('{"ANDROID_PLATFORM": 30}', "ml_c4", None, "'ANDROID_PLATFORM'"),
    ('{"class_labels": "../../etc/passwd"}', "coreml", None, "'class_labels'"),
    ('{"output_names": "out:0"}', "ml_c4", None, "'output_names'"),
    ('{"allow_pickle": "yes"}', "ml_c4", None, "'allow_pickle'"),
    ('{"allow_pickle": true}', "ml_c4", None, "applies only to SKLEARN, XGBOOST, PYTORCH"),
    ('{"tuning": {"trials": 0}}', "ml_c4", None, "'tuning.trials'"),
    ('{"tuning": {"hours": 2}}', "ml_c4", None, "'tuning'"),
    ('{"tuning": {"minutes": 2, "workers": 0}}', "ml_c4", None, "'tuning.workers'"),
    ('{"tuning": {"minutes": 2, "workers": 9}}', "ml_c4", None, "must be an integer from 1 to 8; got 9"),
    ('{"tuning": {"minutes": 2, "workers": "2"}}', "ml_c4", None, "'tuning.workers'"),
    ('{"tuning": {"minutes": 2, "workers": true}}', "ml_c4", None, "'tuning.workers'"),
    ('{"tuning": {"minutes": 2, "workers": 2.5}}', "ml_c4", None, "'tuning.workers'"),
    ('{"tuning": {"workers": 4}}', "ml_c4", None, "needs a budget: 'minutes' and/or 'trials'"),
    ('{"tuning": {"minutes": 2, "workers": 2}, "gpu-code": "sm_75"}', "ml_g4dn", None,
     "applies only to neural networks built for CPU targets"),
    ('{"gpu-code": "sm_75"}', "ml_c4", None, "apply only to NVIDIA targets"),
    ('{"precision": "fp16"}', "ml_c5", None, "'precision' at 'outputConfig.compilerOptions' must be one of fp32, bf16"),
    ('{"precision": "bf16"}', "ml_c5", None, "target 'ml_c5' (mcpu 'skylake-avx512') has no native bf16"),
    ('{"precision": "bf16"}', "ml_c4", None, "has no native bf16"),
    ('{"precision": "bf16", "mcpu": "neoverse-n1"}', None, {"Os": "LINUX", "Arch": "ARM64"}, "has no native bf16"),
    ('{"precision": "bf16", "mcpu": "znver4", "mattr": ["-avx512bf16"]}', "ml_c5", None, "has no native bf16"),
    ('{"precision": "bf16", "gpu-code": "sm_75"}', "ml_g4dn", None, "applies only to CPU targets"),
    ('{"cuda-ver": "10.1"}', "rasp4b", None, "apply only to NVIDIA targets"),
    ('{"trt-ver": "6.0.1"}', None, {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"}, "needs 'gpu-code'"),
    # The reference's "EC2 m5.2xlarge" example names the NVIDIA accelerator but only 'mcpu': NVIDIA needs gpu-code.
    ("{'mcpu': 'skylake-avx512'}", None, {"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
     "needs 'gpu-code'"),
])
def test_compiler_options_errors_name_the_member(options: str, device: str | None, platform: dict[str, str] | None,
                                                 expected: str) -> None:
    # GIVEN CompilerOptions that are malformed or do not fit the target
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device, platform=platform, options=options)
    # WHEN the rules run
    message = refused(request)
    # THEN the error names outputConfig.compilerOptions and the offending option
    assert "outputConfig.compilerOptions" in message
    assert expected in message


# -- CUDA architectures TVM 0.27's CUDA runtime cannot build kernels for ----------------------------------
@pytest.mark.parametrize(("device", "arch"), [
    ("ml_p2", "sm_37"), ("ml_p3", "sm_70"), ("jetson_tx1", "sm_53"), ("jetson_tx2", "sm_62"),
    ("jetson_nano", "sm_53"), ("jetson_xavier", "sm_72"),
])
def test_gpu_devices_cuda_13_cannot_target_are_refused(device: str, arch: str) -> None:
    # GIVEN an ONNX job for a GPU device whose architecture CUDA 13's NVRTC dropped (even with a gpu-code of a
    # newer GPU: the device's own GPU would still be the one running the artifact)
    for options in (None, '{"gpu-code": "sm_75"}'):
        request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device, options=options)
        # WHEN the rules run
        message = refused(request)
        # THEN the error names outputConfig.targetDevice, the device, its GPU and why
        assert f"Value '{device}' at 'outputConfig.targetDevice' failed to satisfy constraint" in message
        assert f"has a {arch} GPU" in message
        assert "CUDA 13.0's NVRTC" in message and "sm_75" in message


@pytest.mark.parametrize("gpu_code", ["sm_37", "sm_50", "sm_61", "sm_70", "sm_72", "sm_76", "sm_999"])
def test_gpu_code_cuda_13_cannot_target_is_refused(gpu_code: str) -> None:
    # GIVEN a TargetPlatform LINUX/X86_64/NVIDIA job whose gpu-code CUDA 13 cannot compile for
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', platform={
        "Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"}, options=f'{{"gpu-code": "{gpu_code}"}}')
    # WHEN the rules run
    message = refused(request)
    # THEN the error names the option, its member and the architectures that remain
    assert f"Value '{gpu_code}' of 'gpu-code' at 'outputConfig.compilerOptions'" in message
    assert "sm_75, sm_80, sm_86" in message


def test_the_reference_jetson_tx2_platform_example_is_refused() -> None:
    # GIVEN the reference's Jetson TX2 TargetPlatform example (LINUX/ARM64/NVIDIA, gpu-code sm_62, CUDA 10.0)
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', platform={
        "Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"},
        options="{'gpu-code': 'sm_62', 'trt-ver': '6.0.1', 'cuda-ver': '10.0'}")
    # WHEN the rules run / THEN it is refused: TVM 0.27's CUDA 13 cannot build kernels for a Pascal GPU
    assert "Value 'sm_62' of 'gpu-code' at 'outputConfig.compilerOptions'" in refused(request)


def test_the_compiler_refuses_an_unrunnable_gpu_code_as_the_api_does() -> None:
    # GIVEN the CompilerOptions string of an sm_70 job, as the compiler reads it
    target = CATALOG.platform("LINUX", "X86_64", "NVIDIA")
    # WHEN the compiler parses it / THEN the same rule refuses it (a ClientError there, not a late NVRTC failure)
    with pytest.raises(rules.RuleError, match="sm_70") as info:
        rules.parse_compiler_options('{"gpu-code": "sm_70"}', target)
    assert info.value.member == "outputConfig.compilerOptions"


def test_coreml_accepts_only_class_labels() -> None:
    # GIVEN a CoreML job with a CPU compiler option
    request = request_for("TENSORFLOW", '{"input_1": [1, 224, 224, 3]}', device="coreml",
                          options='{"mcpu": "skylake-avx512"}')
    # WHEN / THEN it is refused naming the member and the only accepted option
    message = refused(request)
    assert "outputConfig.compilerOptions" in message and "class_labels" in message


def test_tuning_workers_are_refused_for_tree_ensembles() -> None:
    # GIVEN an XGBoost job (TL2cgen builds it: nothing to tune) asking for tuning workers
    request = request_for("XGBOOST", None, device="ml_c5", options='{"tuning": {"minutes": 2, "workers": 2}}')
    # WHEN / THEN it is refused naming the member and why
    message = refused(request)
    assert "outputConfig.compilerOptions" in message and "'tuning.workers'" in message and "XGBOOST" in message
    # AND one worker (no fan-out) is what any other job asks for
    assert rules.tuning_workers(rules.parse_compiler_options('{"tuning": {"minutes": 2, "workers": 3}}')) == 3
    assert rules.tuning_workers(rules.parse_compiler_options('{"tuning": {"minutes": 2}}')) == 1
    assert rules.tuning_workers(rules.parse_compiler_options(None)) == 1


def test_allow_pickle_is_accepted_for_tree_frameworks() -> None:
    # GIVEN an SKLEARN job that opts in to pickles
    request = request_for("SKLEARN", None, device="ml_c4", options='{"allow_pickle": true}')
    # WHEN / THEN it is accepted
    assert rules.check_create(request, CATALOG).name == "ml_c4"


def test_bf16_is_refused_for_tree_models() -> None:
    # GIVEN an XGBOOST job asking for bf16 on a CPU that has it
    request = request_for("XGBOOST", None, device="ml_c5", options='{"precision": "bf16", "mcpu": "znver4"}')
    # WHEN the rules run  THEN it is refused naming the member: trees have no convolutions to run in bf16
    message = refused(request)
    assert "outputConfig.compilerOptions" in message and "not XGBOOST tree models" in message


# -- quantize-by-calibration (ADR 0027) -------------------------------------------------------------------
QUANTIZE = rules.QUANTIZE_MEMBER


def _quantize(calibration: Any = "calibration.npz", **extra: Any) -> str:
    return json.dumps({"quantize": {"dtype": "int8", "calibration": calibration}, **extra})


@pytest.mark.parametrize(("options", "device", "platform"), [
    (_quantize(), "ml_c5", None),
    (_quantize("data/calib/samples.npz"), "ml_c4", None),
    (_quantize("s3://my-calibration-bucket/resnet/calibration.NPZ"), "ml_c5", None),
    (_quantize(mcpu="cascadelake"), "ml_c5", None),
    (_quantize(precision="fp32"), None, {"Os": "LINUX", "Arch": "ARM64"}),
    (_quantize(), "rasp4b", None),
])
def test_quantize_by_calibration_is_accepted_for_cpu_targets(options: str, device: str | None,
                                                             platform: dict[str, str] | None) -> None:
    # GIVEN an ONNX job asking for int8 by calibration on a CPU target (archive member or S3 object)
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device, platform=platform, options=options)
    # WHEN the rules run  THEN it is accepted and the option parses unchanged
    target = rules.check_create(request, CATALOG)
    assert rules.parse_compiler_options(options, target)["quantize"] == json.loads(options)["quantize"]


@pytest.mark.parametrize(("options", "device", "member", "expected"), [
    ('{"quantize": "int8"}', "ml_c5", QUANTIZE, "must be an object such as"),
    ('{"quantize": {"dtype": "int8", "calibration": "c.npz", "method": "entropy"}}', "ml_c5", QUANTIZE,
     "Unknown member(s) method"),
    ('{"quantize": {"calibration": "c.npz"}}', "ml_c5", f"{QUANTIZE}.dtype", "must be one of int8"),
    ('{"quantize": {"dtype": "int4", "calibration": "c.npz"}}', "ml_c5", f"{QUANTIZE}.dtype", 'Value "int4"'),
    ('{"quantize": {"dtype": "int8"}}', "ml_c5", f"{QUANTIZE}.calibration", "Value null"),
    (_quantize(""), "ml_c5", f"{QUANTIZE}.calibration", "a file in the model archive or an s3:// URI"),
    (_quantize(7), "ml_c5", f"{QUANTIZE}.calibration", "Value 7"),
    (_quantize("../outside.npz"), "ml_c5", f"{QUANTIZE}.calibration", "no '..', not absolute"),
    (_quantize("data/../../outside.npz"), "ml_c5", f"{QUANTIZE}.calibration", "no '..'"),
    (_quantize("/etc/calibration.npz"), "ml_c5", f"{QUANTIZE}.calibration", "not absolute"),
    (_quantize("C:\\calibration.npz"), "ml_c5", f"{QUANTIZE}.calibration", "not absolute"),
    (_quantize("..\\calibration.npz"), "ml_c5", f"{QUANTIZE}.calibration", "no '..'"),
    (_quantize("https://example.com/c.npz"), "ml_c5", f"{QUANTIZE}.calibration", "or an s3:// URI"),
    (_quantize("s3://Bad_Bucket/c.npz"), "ml_c5", f"{QUANTIZE}.calibration", "s3://bucket/key.npz"),
    (_quantize("calibration.npy"), "ml_c5", f"{QUANTIZE}.calibration", "must be an .npz file"),
    (_quantize("c" * 1100 + ".npz"), "ml_c5", f"{QUANTIZE}.calibration", "length less than or equal to 1024"),
    (_quantize(precision="bf16", mcpu="znver4"), "ml_c5", QUANTIZE, "mutually exclusive"),
    (_quantize(**{"gpu-code": "sm_75"}), "ml_g4dn", QUANTIZE, "applies only to CPU targets: 'ml_g4dn' has no int8"),
])
def test_quantize_errors_name_the_member(options: str, device: str, member: str, expected: str) -> None:
    # GIVEN a quantize option that is malformed or does not fit the target
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device, options=options)
    # WHEN the rules run
    message = refused(request)
    # THEN the error names the member (down to quantize.dtype / quantize.calibration) and what is wrong
    assert f"'{member}'" in message, message
    assert expected in message, message


@pytest.mark.parametrize(("framework", "data"), [
    ("PYTORCH", '{"input0": [1, 3, 224, 224]}'), ("TFLITE", '{"input": [1, 224, 224, 3]}'), ("XGBOOST", None)])
def test_quantize_is_refused_for_frameworks_kiln_does_not_hold_as_onnx(framework: str, data: str | None) -> None:
    # GIVEN a job of a framework Kiln does not quantize (its model never becomes an ONNX graph in Kiln)
    request = request_for(framework, data, device="ml_c5", options=_quantize())
    # WHEN / THEN it is refused naming the member and the framework
    message = refused(request)
    assert f"'{QUANTIZE}' applies to ONNX models, not {framework}" in message


# -- TargetPlatform examples of the reference -------------------------------------------------------------
@pytest.mark.parametrize(("platform", "options", "target"), [
    ({"Os": "LINUX", "Arch": "ARM_EABIHF"}, "{'mattr': ['+neon']}", "LINUX_ARM_EABIHF"),
    ({"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"},
     "{'gpu-code': 'sm_87', 'trt-ver': '10.3', 'cuda-ver': '13.0'}", "LINUX_ARM64_NVIDIA"),
    ({"Os": "LINUX", "Arch": "X86_64"}, "{'mcpu': 'skylake-avx512'}", "LINUX_X86_64"),
    ({"Os": "LINUX", "Arch": "ARM64"}, None, "LINUX_ARM64"),
])
def test_reference_platform_examples_are_accepted(platform: dict[str, str], options: str | None, target: str) -> None:
    # GIVEN a TargetPlatform example (Raspberry Pi 3, Jetson TX2, x86-64 ...) with its CompilerOptions
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', platform=platform, options=options)
    # WHEN the rules run
    # THEN the platform resolves to the catalog target
    assert rules.check_create(request, CATALOG).name == target


@pytest.mark.parametrize(("platform", "options", "named"), [
    ({"Os": "LINUX", "Arch": "ARM64", "Accelerator": "MALI"}, None, "MALI"),  # RK3399 with Mali
    ({"Os": "ANDROID", "Arch": "ARM_EABI"}, "{'ANDROID_PLATFORM': 25, 'mattr': ['+neon']}", "ANDROID"),
    ({"Os": "ANDROID", "Arch": "ARM64"}, "{'ANDROID_PLATFORM': 29}", "ANDROID"),
    ({"Os": "LINUX", "Arch": "X86_64", "Accelerator": "INTEL_GRAPHICS"}, None, "INTEL_GRAPHICS"),
    ({"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NNA"}, None, "NNA"),
    ({"Os": "LINUX", "Arch": "ARM_EABI"}, None, "LINUX_ARM_EABI"),
])
def test_unsupported_platforms_are_refused_clearly(platform: dict[str, str], options: str | None,
                                                   named: str) -> None:
    # GIVEN a TargetPlatform this deployment cannot compile for (Mali, Android, soft-float ARM ...)
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', platform=platform, options=options)
    # WHEN the rules run
    message = refused(request)
    # THEN the error names the member, the refused platform and what is supported
    assert "outputConfig.targetPlatform" in message
    assert named in message
    assert "Supported: " in message and "LINUX_ARM64" in message


@pytest.mark.parametrize("device", ["ml_inf1", "ml_inf2", "ml_trn1", "ml_eia2", "qcs605", "qcs603",
                                    "amba_cv2", "amba_cv22", "amba_cv25"])
def test_unsupported_devices_are_refused_naming_target_and_supported(device: str) -> None:
    # GIVEN a TargetDevice that needs a toolchain this deployment does not ship
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device)
    # WHEN the rules run
    message = refused(request)
    # THEN the error names the member, the target, the reason and the supported devices
    assert f"Value '{device}' at 'outputConfig.targetDevice'" in message
    assert "not supported by this deployment" in message
    assert "Supported: " in message and "ml_c5" in message and "jetson_xavier" in message
    assert f", {device}," not in message.split("Supported: ")[1]


@pytest.mark.parametrize(("framework", "device"), [
    ("ONNX", "coreml"), ("TFLITE", "coreml"), ("XGBOOST", "coreml"),
    ("XGBOOST", "ml_g4dn"), ("SKLEARN", "ml_g4dn"),
])
def test_framework_target_pairs_that_cannot_compile_are_refused(framework: str, device: str) -> None:
    # GIVEN a framework the target cannot compile (CoreML converts TF/Keras/PyTorch; GPUs run neural nets)
    request = request_for(framework, None, device=device)
    # WHEN the rules run
    message = refused(request)
    # THEN the error names inputConfig.framework, the target and what it supports
    assert "inputConfig.framework" in message
    assert f"'{device}' supports" in message


# -- exclusive members ---------------------------------------------------------------------------------
def test_exactly_one_of_input_config_and_model_package() -> None:
    # GIVEN requests with both and with neither of InputConfig / ModelPackageVersionArn
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/pkg/1"
    both = create_request(ModelPackageVersionArn=arn)
    neither = create_request()
    del neither["InputConfig"]
    only_package = create_request(ModelPackageVersionArn=arn)
    del only_package["InputConfig"]
    # WHEN / THEN both and neither are refused naming both members; the package alone is accepted
    for request in (both, neither):
        message = refused(request)
        assert "'inputConfig'" in message and "'modelPackageVersionArn'" in message
    assert rules.check_create(only_package, CATALOG).name == "ml_c4"


def test_exactly_one_of_target_device_and_target_platform() -> None:
    # GIVEN output configs with both and with neither of TargetDevice / TargetPlatform
    both = create_request(OutputConfig={"S3OutputLocation": "s3://b/o", "TargetDevice": "ml_c4",
                                        "TargetPlatform": {"Os": "LINUX", "Arch": "X86_64"}})
    neither = create_request(OutputConfig={"S3OutputLocation": "s3://b/o"})
    # WHEN / THEN both are refused, naming both members
    for request in (both, neither):
        message = refused(request)
        assert "'outputConfig.targetDevice'" in message and "'outputConfig.targetPlatform'" in message


def test_both_exclusivity_errors_are_reported_together() -> None:
    # GIVEN a request breaking both exclusivity rules
    request = create_request(ModelPackageVersionArn="arn:aws:sagemaker:us-east-1:123456789012:model-package/p/1",
                             OutputConfig={"S3OutputLocation": "s3://b/o"})
    # WHEN the rules run
    with pytest.raises(ValidationError) as info:
        rules.check_create(request, CATALOG)
    # THEN both are listed in one SageMaker-style message
    assert info.value.message.startswith("2 validation errors detected: ")
    assert "modelPackageVersionArn" in info.value.message and "targetPlatform" in info.value.message


@pytest.mark.parametrize("location", ["https://bucket.s3.amazonaws.com/out", "s3://", "bucket/out"])
def test_output_location_must_be_an_s3_uri(location: str) -> None:
    # GIVEN an S3OutputLocation that is not an s3:// URI
    request = create_request(OutputConfig={"S3OutputLocation": location, "TargetDevice": "ml_c4"})
    # WHEN / THEN it is refused naming the member
    assert "outputConfig.s3OutputLocation" in refused(request)


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://models-bucket/model.zip", ".tar.gz suffix"),
    ("s3://models-bucket/model.tar", ".tar.gz suffix"),
    ("s3://models-bucket/", "s3://bucket/key.tar.gz"),
    ("https://models-bucket.s3.amazonaws.com/model.tar.gz", "s3://bucket/key.tar.gz"),
    ("s3://Bad_Bucket/model.tar.gz", "s3://bucket/key.tar.gz"),
])
def test_s3_uri_must_name_a_tar_gz_object(uri: str, expected: str) -> None:
    # GIVEN an InputConfig.S3Uri that is not s3://bucket/key.tar.gz
    request = request_for("ONNX", '{"data": [1, 3, 224, 224]}', uri=uri)
    # WHEN / THEN it is refused naming inputConfig.s3Uri
    message = refused(request)
    assert "inputConfig.s3Uri" in message and expected in message


@pytest.mark.parametrize("framework", ["PYTORCH", "TENSORFLOW", "TFLITE"])
def test_framework_version_accepted_where_it_applies(framework: str) -> None:
    # GIVEN FrameworkVersion for a framework that supports it
    request = request_for(framework, '{"data": [1, 3, 224, 224]}', version="2.4")
    # WHEN / THEN it is accepted
    assert rules.check_create(request, CATALOG).name == "ml_c4"


@pytest.mark.parametrize("framework", ["ONNX", "KERAS", "DARKNET", "XGBOOST", "SKLEARN"])
def test_framework_version_refused_where_it_does_not_apply(framework: str) -> None:
    # GIVEN FrameworkVersion for a framework that takes none
    request = request_for(framework, '{"data": [1, 3, 224, 224]}', version="1.0")
    # WHEN / THEN it is refused naming the member and the frameworks that take one
    message = refused(request)
    assert "inputConfig.frameworkVersion" in message and "MXNET, PYTORCH, TENSORFLOW, TFLITE" in message


def test_framework_version_must_look_like_a_version() -> None:
    # GIVEN a FrameworkVersion that passes botocore's pattern but is not a version
    request = request_for("PYTORCH", '{"data": [1, 3, 224, 224]}', version="2.x")
    # WHEN / THEN it is refused naming the member
    assert "inputConfig.frameworkVersion" in refused(request)


# -- stopping condition, tags, defaults -------------------------------------------------------------------
def test_max_wait_time_must_cover_max_runtime() -> None:
    # GIVEN MaxWaitTimeInSeconds below MaxRuntimeInSeconds
    # WHEN / THEN it is refused naming the member; equal values are fine
    with pytest.raises(ValidationError) as info:
        rules.check_stopping_condition({"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 600})
    assert "stoppingCondition.maxWaitTimeInSeconds" in info.value.message
    rules.check_stopping_condition({"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 900})
    rules.check_stopping_condition({"MaxWaitTimeInSeconds": 60})
    rules.check_stopping_condition(None)


def test_stopping_limits_fill_sagemaker_defaults() -> None:
    # GIVEN stopping conditions with and without limits
    # WHEN / THEN missing limits default to 900 s runtime and 3600 s pending
    assert rules.stopping_limits(None) == (900, 3600)
    assert rules.stopping_limits({"MaxRuntimeInSeconds": 120}) == (120, 3600)
    assert rules.stopping_limits({"MaxRuntimeInSeconds": 120, "MaxPendingTimeInSeconds": 1800}) == (120, 1800)


def test_tag_keys_must_be_unique_and_not_reserved() -> None:
    # GIVEN tags with a duplicate key (2nd) and a reserved aws: key (3rd)
    tags = [{"Key": "team", "Value": "a"}, {"Key": "team", "Value": "b"}, {"Key": "AWS:owner", "Value": "x"}]
    # WHEN the rule runs
    with pytest.raises(ValidationError) as info:
        rules.check_tags(tags)
    # THEN both errors are reported at their list positions
    message = info.value.message
    assert message.startswith("2 validation errors detected: ")
    assert "'tags.2.member.key'" in message and "unique" in message
    assert "'tags.3.member.key'" in message and "reserved" in message
    rules.check_tags([{"Key": "team", "Value": "a"}, {"Key": "owner", "Value": "b"}])
    rules.check_tags(None)


def test_every_framework_sagemaker_accepts_is_loadable_so_none_is_refused() -> None:
    # GIVEN this deployment's list of frameworks its compiler cannot load (MXNET left it when it got a loader)
    # WHEN an MXNet model is asked for
    target = rules.check_create(request_for("MXNET", '{"data": [1, 3, 224, 224]}'), CATALOG)
    # THEN nothing is listed as unavailable and the request is accepted
    assert UNAVAILABLE_FRAMEWORKS == {}
    assert target.name == "ml_c4"


def test_a_framework_listed_as_unavailable_is_refused_with_a_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a framework SageMaker accepts, listed as one this deployment's compiler cannot load
    monkeypatch.setitem(UNAVAILABLE_FRAMEWORKS, "MXNET", "export the model to ONNX and compile it as ONNX")
    request = request_for("MXNET", '{"data": [1, 3, 224, 224]}')
    # WHEN the rules run
    message = refused(request)
    # THEN the error names the member, the framework and what to do instead (the listed reason)
    assert "Value 'MXNET' at 'inputConfig.framework'" in message
    assert "not supported by this deployment" in message and "ONNX" in message


@pytest.mark.parametrize(("device", "platform", "name"), [
    ("x86_win32", None, "x86_win32"), (None, {"Os": "LINUX", "Arch": "X86"}, "LINUX_X86")])
def test_neural_networks_for_32_bit_x86_are_refused_trees_accepted(device: str | None,
                                                                   platform: dict[str, str] | None,
                                                                   name: str) -> None:
    # GIVEN a 32-bit x86 target (Windows or Linux), for which no 32-bit TVM runtime exists
    # WHEN an ONNX model and an XGBoost model are asked for
    message = refused(request_for("ONNX", '{"data": [1, 3, 224, 224]}', device=device, platform=platform))
    target = rules.check_create(request_for("XGBOOST", None, device=device, platform=platform), CATALOG)
    # THEN the network is refused naming what the target supports, and the tree ensemble is accepted
    assert "inputConfig.framework" in message and f"'{name}' supports XGBOOST, SKLEARN" in message
    assert target.name == name


def test_mxnet_needs_data_input_config_at_create() -> None:
    # GIVEN an MXNet job without DataInputConfig (an MXNet symbol does not record input shapes)
    request = request_for("MXNET", None)
    # WHEN the rules run THEN it is refused at create, naming the member, not later by the compiler
    message = refused(request)
    assert "inputConfig.dataInputConfig" in message and "MXNET" in message
    # AND with shapes it is accepted
    assert rules.check_create(request_for("MXNET", '{"data": [1, 3, 224, 224]}'), CATALOG).name == "ml_c4"


@pytest.mark.parametrize(("framework", "data", "options", "where"), [
    ("ONNX", '{"data": [1000000, 1000000]}', None, "inputConfig.dataInputConfig.data"),
    ("PYTORCH", "[[1, 3, 224, 224], [65536, 65536, 65536]]", None, "inputConfig.dataInputConfig[1]"),
    # 1 Gi elements: 4 GiB as float32 fits, 8 GiB as int64 does not
    ("ONNX", '{"ids": [1024, 1024, 1025]}', '{"dtype": "int64"}', "inputConfig.dataInputConfig.ids"),
])
def test_data_input_config_that_would_allocate_too_much_is_refused(framework: str, data: str, options: str | None,
                                                                   where: str) -> None:
    # GIVEN a DataInputConfig whose shape x element size exceeds the per-input cap (terabytes, say)
    request = request_for(framework, data, options=options)
    # WHEN the rules run at create
    message = refused(request)
    # THEN it is refused naming the member and the size, before anything is allocated
    assert f"at '{where}' takes" in message and "an input may take at most" in message


def test_data_input_config_at_the_cap_is_accepted() -> None:
    # GIVEN a shape of exactly 4 GiB as float32 WHEN the rules run THEN it is accepted
    rules.check_create(request_for("ONNX", '{"data": [1024, 1024, 1024]}'), CATALOG)
