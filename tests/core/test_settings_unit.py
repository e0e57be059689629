"""kiln.settings: the one flags + environment reader of the operator, the server and the trainer."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest
from kiln_operator.main import parse_args
from kiln_trainer.settings import TrainerSettings

from kiln import settings
from kiln.settings import SettingsError, option

pytestmark = [pytest.mark.unit]


@dataclass(frozen=True)
class Demo:
    name: str = field(default="x", metadata=option("--name", env="DEMO_NAME"))
    """A string."""
    count: int = field(default=1, metadata=option("--count"))
    """An int (variable KILN_COUNT)."""
    wait: float = field(default=2.0, metadata=option("--wait", kind="duration"))
    """A duration."""
    on: bool = field(default=False, metadata=option("--on"))
    """A boolean."""
    tags: list[str] = field(default_factory=list, metadata=option("--tag"))
    """A list."""


def load(argv: list[str], env: dict[str, str]) -> Demo:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Demo)
    return settings.load(Demo, argv, env, parser)


def test_flag_wins_over_variable_over_default() -> None:
    assert load([], {}) == Demo()
    env = {"DEMO_NAME": "env", "KILN_COUNT": "3", "KILN_WAIT": "250ms", "KILN_ON": "Yes", "KILN_TAGS": "a, b,"}
    assert load([], env) == Demo("env", 3, 0.25, True, ["a", "b"])
    assert load(["--name", "flag", "--count", "4", "--wait", "1m", "--tag", "c", "--tag", "d"], env) == \
        Demo("flag", 4, 60.0, True, ["c", "d"])


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="KILN_COUNT='x' is not a valid int"):
        load([], {"KILN_COUNT": "x"})
    with pytest.raises(SettingsError, match="KILN_ON='maybe' is not a boolean"):
        load([], {"KILN_ON": "maybe"})
    with pytest.raises(SettingsError, match="KILN_WAIT='soon' is not a duration"):
        load([], {"KILN_WAIT": "soon"})
    with pytest.raises(SystemExit):
        load(["--wait", "soon"], {})


def test_parsers() -> None:
    assert [settings.parse_bool(v, "V") for v in ("1", "TRUE", "on", "0", "off", "")] == [True, True, True, False, False, False]
    assert settings.parse_bool("maybe", "V", strict=False) is False
    assert [settings.parse_duration(v, "V") for v in ("30", "1.5s", "250ms", "2m", "1h")] == [30.0, 1.5, 0.25, 120.0, 3600.0]


def test_the_three_processes_read_through_it() -> None:
    ops, _ = parse_args(["-n", "a", "--reconcile-interval", "2s"], {"KILN_EXCLUDE_NAMESPACES": "x,y", "KILN_MAX_WORKERS": "7"})
    assert (ops.namespaces, ops.exclude_namespaces, ops.reconcile_interval, ops.max_workers) == (["a"], ["x", "y"], 2.0, 7)
    assert parse_args(["-A"], {"KILN_NAMESPACES": "q"})[0].namespaces == []
    trainer = TrainerSettings.from_env({"KILN_API_INSECURE": "1", "KILN_TRAININGJOB": "t"})
    assert trainer.api_insecure and trainer.trainingjob == "t" and trainer.namespace == ""
