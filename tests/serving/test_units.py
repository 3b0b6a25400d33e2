"""The serving package's pure parts: Accept negotiation, image layouts, body limits, the CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from kiln.runtime import TensorSpec
from kiln_serving import codec
from kiln_serving.config import ServingSettings
from kiln_serving.cpu import available_cpus, quota_cpus
from kiln_serving.server import limit_malloc_arenas
from pydantic import ValidationError


@pytest.mark.parametrize(("accept", "chosen"), [
    (None, "application/json"), ("", "application/json"), ("*/*", "application/json"),
    ("application/*", "application/json"), ("application/x-npy", "application/x-npy"),
    ("text/html, application/x-npz;q=0.8, */*;q=0.1", "application/x-npz"),
    ("application/x-npy;q=0.1, application/json;q=0.9", "application/json"),
    ("APPLICATION/X-NPY", "application/x-npy"),
])
def test_accept_negotiation(accept: str | None, chosen: str) -> None:
    # GIVEN an Accept header WHEN negotiated THEN the best encoding this server writes is chosen
    assert codec.choose_response_type(accept) == chosen


@pytest.mark.parametrize("accept", ["text/csv", "application/x-npy;q=0", "image/png, text/plain"])
def test_accept_without_a_writable_encoding_is_406(accept: str) -> None:
    # GIVEN an Accept header naming nothing writable (or refusing it with q=0) THEN 406
    with pytest.raises(codec.RequestError) as refused:
        codec.choose_response_type(accept)
    assert refused.value.status == 406


@pytest.mark.parametrize(("shape", "dtype", "layout"), [
    ((1, 3, 224, 224), "float32", codec.ImageLayout(True, 3, 224, 224)),
    ((1, 224, 224, 3), "uint8", codec.ImageLayout(False, 3, 224, 224)),
    ((1, 1, 28, 28), "float32", codec.ImageLayout(True, 1, 28, 28)),
    ((-1, 3, -1, -1), "float32", codec.ImageLayout(True, 3, None, None)),
    ((1, 8), "float32", None), ((2, 3, 8, 8), "float32", None), ((1, 4, 8, 8), "float32", None),
    ((1, 3, 8, 8), "bool", None),
])
def test_image_layouts(shape: tuple[int, ...], dtype: str, layout: codec.ImageLayout | None) -> None:
    # GIVEN an input spec WHEN asked whether it takes one image THEN its layout, or None
    assert codec.image_layout(TensorSpec("data", shape, dtype)) == layout


def test_body_limit_follows_the_inputs() -> None:
    # GIVEN small, large and dynamic inputs WHEN the body limit is derived THEN JSON of the inputs fits
    assert codec.body_limit([TensorSpec("x", (1, 8), "float32")]) == codec.MIN_BODY_LIMIT
    large = [TensorSpec("x", (1, 3, 1024, 1024), "float32")]
    assert codec.body_limit(large) == 3 * 1024 * 1024 * codec.JSON_BYTES_PER_ELEMENT + codec.BODY_OVERHEAD
    assert codec.body_limit([TensorSpec("x", (-1, 8), "float32")]) == codec.DYNAMIC_BODY_LIMIT
    # AND a configured limit wins
    assert codec.body_limit(large, configured=1000) == 1000


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
], ids=["v2-unlimited", "v2-1.5", "v2-0.5", "v1-4", "v1-unlimited", "none"])
def test_cpu_quota_from_cgroup_files(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    # GIVEN a cgroup v2 or v1 tree WHEN the quota is read THEN it is in CPUs (None: no quota)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert quota_cpus(tmp_path) == quota
    # AND the threads are the quota rounded up, within the CPUs this process may use, at least one
    pinned = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (min(pinned, math.ceil(quota)) if quota else pinned)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN SageMaker's port variable and Kiln's serving variables
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9081")
    monkeypatch.setenv("KILN_SERVING_IMAGE_BIAS", "[-1, 0, 1]")
    monkeypatch.setenv("KILN_SERVING_THREADS", "3")
    # WHEN read THEN they apply, and /opt/ml/model is where the model is looked for
    settings = ServingSettings()
    assert (settings.port, settings.image_bias, settings.threads) == (9081, (-1.0, 0.0, 1.0), 3)
    assert settings.model == Path("/opt/ml/model")
    # AND a bias of two values (neither one nor one per RGB channel) is refused, naming the setting
    monkeypatch.setenv("KILN_SERVING_IMAGE_BIAS", "[1, 2]")
    with pytest.raises(ValidationError, match="KILN_SERVING_IMAGE_BIAS"):
        ServingSettings()


def test_malloc_arenas_are_capped_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an operator's MALLOC_ARENA_MAX WHEN the server starts THEN it is left to glibc
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    # GIVEN none WHEN the server starts on glibc (this Linux host) THEN mallopt caps the arenas
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is True
