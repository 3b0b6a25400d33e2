"""The embedded stack builds at start what every job's workflow needs, so jobs accepted together do
not each build it at once while the API waits (ADRs 0050, 0058)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh process: the session's stack (and every test before this one) has long since
# loaded whatever a first job loads, so only a new process shows what the first jobs build.
FIRST_JOBS = textwrap.dedent("""
    import json, threading, time
    import botocore.loaders
    from moto.stepfunctions.parser.asl.antlr.runtime.ASLParser import ASLParser
    from kiln.local.stack import EmbeddedStack
    from tests.conftest import tar_gz, tiny_onnx_model

    built = {"service_models": 0, "definition_parses": 0}
    load_file, state_machine = botocore.loaders.JSONFileLoader.load_file, ASLParser.state_machine

    def counted_load(self, file_path, *args, **kwargs):
        built["service_models"] += "service-2" in str(file_path)
        return load_file(self, file_path, *args, **kwargs)

    def counted_parse(self, *args, **kwargs):
        built["definition_parses"] += 1
        return state_machine(self, *args, **kwargs)

    botocore.loaders.JSONFileLoader.load_file = counted_load
    ASLParser.state_machine = counted_parse
    with EmbeddedStack() as stack:
        stack.runner.hold = True  # no capacity: each task waits as pending once asked for
        models, artifacts = stack.outputs["ModelBucket"], stack.outputs["ArtifactBucket"]
        stack.client("s3").put_object(Bucket=models, Key="m.tar.gz",
                                      Body=tar_gz({"model.onnx": tiny_onnx_model().SerializeToString()}))
        at_start = dict(built)
        service = stack.kiln.service

        def create(index):
            service.create({"CompilationJobName": f"first-{index}", "RoleArn": stack.outputs["JobRoleArn"],
                            "InputConfig": {"S3Uri": f"s3://{models}/m.tar.gz", "Framework": "ONNX",
                                            "DataInputConfig": '{"x": [1, 8]}'},
                            "OutputConfig": {"S3OutputLocation": f"s3://{artifacts}/first-{index}",
                                             "TargetDevice": "ml_c5"},
                            "StoppingCondition": {"MaxRuntimeInSeconds": 600}})

        threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.time() + 120
        while len(stack.runner.held) < 4 and time.time() < deadline:
            time.sleep(0.1)
        statuses = [service.describe(f"first-{i}")["CompilationJobStatus"] for i in range(4)]
        after = dict(built)
        # what moto's server reads per request for every service the stack serves (the compilers' STS too)
        from moto.core.utils import get_service_model
        from kiln.local.stack import MOTO_SERVICES
        for name in MOTO_SERVICES:
            get_service_model(name)
        print(json.dumps({"at_start": at_start, "after": after, "tasks_asked_for": len(stack.runner.held),
                          "statuses": statuses, "moto_models_loaded_later": built["service_models"] - after["service_models"]}))
""")


@pytest.mark.slow
def test_first_jobs_build_no_service_model_and_parse_no_definition() -> None:
    # GIVEN a freshly started embedded stack (its own process)
    # WHEN four jobs are accepted at once and their workflows run up to asking for a compiler
    done = subprocess.run([sys.executable, "-c", FIRST_JOBS], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # THEN all four got that far (in progress, each task waiting for capacity)
    assert report["tasks_asked_for"] == 4 and report["statuses"] == ["INPROGRESS"] * 4, report
    # AND the stack had loaded botocore's models and parsed the state machine once, at start
    assert report["at_start"]["definition_parses"] == 1 and report["at_start"]["service_models"] > 0, report
    # AND the four workflows loaded no service model and parsed no definition again
    assert report["after"] == report["at_start"], report
    # AND moto's server had loaded the model of every service it serves Kiln (ADR 0058)
    assert report["moto_models_loaded_later"] == 0, report
