"""The functions: handlers, runtime, tracing, Powertools, configuration and packaging."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kiln.config import KilnSettings
from kiln_infra.functions import API_HANDLER, CONTAINER_STOPPED_HANDLER, REGISTRY_HANDLER, WORKFLOW_HANDLER
from kiln_infra.layer import build_layer, requirements
from kiln_infra.paths import FUNCTIONS_DIR, REPO_ROOT

from .conftest import Synthesized

# KilnSettings fields that are not deployment settings (Lambda sets AWS_REGION; a default suffices).
NOT_FROM_CDK = {"region", "registry_max_runtime_seconds"}


def test_functions_run_the_handlers_traced_with_powertools(synth: Synthesized) -> None:
    # GIVEN the four functions
    functions = {f["Properties"]["Handler"]: f["Properties"] for f in synth.of_type("AWS::Lambda::Function").values()}
    # THEN they are the API, workflow, container-stopped and registry handlers
    assert set(functions) == {API_HANDLER, WORKFLOW_HANDLER, CONTAINER_STOPPED_HANDLER, REGISTRY_HANDLER}
    for handler, props in functions.items():
        env = props["Environment"]["Variables"]
        # AND each runs Python 3.11 with X-Ray, Powertools settings, an encrypted environment and the layer
        assert props["Runtime"] == "python3.11" and props["TracingConfig"] == {"Mode": "Active"}, handler
        assert env["POWERTOOLS_SERVICE_NAME"].startswith("kiln-"), handler
        assert "KmsKeyArn" in props and len(props["Layers"]) == 1, handler
        # AND gets every deployment setting of kiln.config.KilnSettings
        expected = {f"KILN_{name.upper()}" for name in KilnSettings.model_fields} - {
            f"KILN_{n.upper()}" for n in NOT_FROM_CDK}
        assert expected <= set(env), sorted(expected - set(env))
        assert env["KILN_CHECK_PASS_ROLE"] == "true"
        assert "resolve:secretsmanager" in str(env["KILN_PAGINATION_KEY"])


def test_handler_modules_import_with_only_the_layer_and_the_code() -> None:
    # GIVEN the staged layer and the functions' code directory, and nothing else on sys.path
    layer = build_layer() / "python"
    code = (f"import sys; sys.path[:0] = [{str(FUNCTIONS_DIR)!r}, {str(layer)!r}]\n"
            "import kiln.handlers.api, kiln.handlers.workflow\nprint('ok')")
    # WHEN a bare interpreter (-S: no site-packages) imports the handler modules
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False,
                            env={"AWS_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}, cwd="/")
    # THEN they load: the layer holds every dependency they need
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_layer_pins_agree_with_the_project_pins() -> None:
    # GIVEN the layer's requirements and the project's pinned requirements
    pins: dict[str, str] = {}
    for name in ("base.txt", "dev.txt"):
        for line in (REPO_ROOT / "requirements" / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==", 1)
                pins[package.strip().lower()] = version.strip()
    # THEN each layer package is pinned to the version the tests run
    for requirement in requirements():
        (spec,) = requirement.specifier
        assert pins.get(requirement.name.lower()) == spec.version, requirement.name


def test_function_code_asset_leaves_out_the_local_mode(synth: Synthesized) -> None:
    # GIVEN the staged code asset of the functions
    code = {str(f["Properties"]["Code"]["S3Key"]) for f in synth.of_type("AWS::Lambda::Function").values()}
    assert len(code) == 1
    asset = Path(synth.template_path).parent / f"asset.{next(iter(code)).split('.')[0].split(':')[-1]}"
    # THEN it holds the kiln package without the local mode (moto, local servers) or the web console
    files = {p.relative_to(asset).as_posix() for p in asset.rglob("*")}
    assert "kiln/handlers/api.py" in files and not any(f.startswith(("kiln/local/", "kiln/console")) for f in files)
