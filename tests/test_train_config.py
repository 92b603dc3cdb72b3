"""The trainer's typed configuration: parsed once, replaced (never mutated) by launchers."""

from __future__ import annotations

import pickle

import pytest

from trainer.cli import build_parser
from trainer.config import TrainConfig


def test_flags_become_a_typed_config_with_the_tasks_options():
    config = TrainConfig.from_namespace(build_parser().parse_args(["attribution", "--workers", "3", "--users", "7"]))
    assert (config.task, config.workers, config.out, config.controller) == ("attribution", 3, "runs/attribution", None)
    assert config.users == 7 and config.options["users"] == 7  # a task's option reads like a flag
    assert getattr(config, "no_such_option", None) is None
    with pytest.raises(AttributeError, match="no_such_option"):
        _ = config.no_such_option


def test_launchers_replace_instead_of_mutating_and_the_config_travels():
    config = TrainConfig.from_namespace(build_parser().parse_args(["digits", "--out", "x"]))
    moved = config.replace(controller="tcp://127.0.0.1:1", workers=4)
    assert (config.controller, config.workers) == (None, 2) and (moved.controller, moved.workers) == (
        "tcp://127.0.0.1:1", 4)
    with pytest.raises(AttributeError):
        config.workers = 5  # frozen
    assert pickle.loads(pickle.dumps(moved)) == moved  # to spawned ranks
    assert TrainConfig.from_dict(moved.to_dict()) == moved  # to Ray's train_loop_config
