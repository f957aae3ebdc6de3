"""The public API is what a recipe imports from ``miles``; a change here is a deliberate one."""

import miles

EXPECTED = [
    "EngineHandle",
    "GenerateOutput",
    "GenerateRequest",
    "MilesConfig",
    "Sample",
    "SamplingParams",
    "Task",
    "TrainSample",
    "Trajectory",
    "Turn",
    "dataset",
    "default_rollout",
    "reward",
    "rewards",
    "rollout",
    "setup",
    "to_sample",
    "update",
]


def test_all_is_the_expected_list() -> None:
    assert miles.__all__ == EXPECTED


def test_every_exported_name_exists() -> None:
    for name in miles.__all__:
        assert getattr(miles, name) is not None, name


def test_star_import_exports_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from miles import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED)
