"""Local mode's typed settings: `kiln serve`'s flags become one validated LocalSettings; out-of-range
values are refused naming the flag or field."""

from __future__ import annotations

import pydantic
import pytest
from kiln.cli import build_parser
from kiln.local.settings import LocalSettings


def test_defaults_run_compilers_ten_below_the_api() -> None:
    # GIVEN no choice made  WHEN settings are built  THEN compilers run at nice +10, slots follow the CPUs
    settings = LocalSettings()
    assert (settings.compiler_niceness, settings.max_compilers, settings.api_workers) == (10, None, 4)
    assert settings.compiler_cpu_share == "own"


@pytest.mark.parametrize("field,value", [("compiler_niceness", 20), ("compiler_niceness", -1),
                                         ("max_compilers", 0), ("api_workers", -1), ("stop_grace_seconds", 0),
                                         ("compiler_nice", 5), ("compiler_cpu_share", "half")])
def test_out_of_range_or_unknown_fields_are_refused_by_name(field: str, value: object) -> None:
    # GIVEN a value outside its field's range (or a misspelt field)  WHEN settings are built
    with pytest.raises(pydantic.ValidationError) as refused:
        LocalSettings(**{field: value})
    # THEN the error names the field
    assert field in str(refused.value)


@pytest.mark.parametrize("value", ["20", "-3", "ten"])
def test_serve_refuses_a_niceness_outside_0_to_19(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN `kiln serve --compiler-niceness VALUE`  WHEN parsed  THEN usage error naming the flag
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--compiler-niceness", value])
    assert exited.value.code == 2
    assert "--compiler-niceness" in capsys.readouterr().err


def test_stack_takes_max_compilers_as_short_for_its_field() -> None:
    # GIVEN local settings and the max_compilers shorthand  WHEN a stack is built (not started)
    from kiln.local.stack import EmbeddedStack

    stack = EmbeddedStack(max_compilers=3, local=LocalSettings(compiler_niceness=4, compiler_cpu_share="api"))
    try:
        # THEN its runner has all three
        assert (stack.runner.max_running, stack.runner.niceness, stack.runner.in_own_session) == (3, 4, False)
        assert stack.local == LocalSettings(compiler_niceness=4, max_compilers=3, compiler_cpu_share="api")
    finally:
        stack.stop()  # (never started: removes its work dir)
