"""esper-tamiyo collect's plan and its command-line errors (the episodes themselves run in the end-to-end test)."""

from __future__ import annotations

import pytest

from esper.tamiyo.collect import main, parse_behaviour, parse_seeds, plan
from esper.tamiyo.episodes import TaskError


def test_plan_covers_tasks_sizes_seeds_and_behaviours():
    specs = plan(["digits-mlp", "digits-cnn1d"], [0, 1], ["random", "eps0.3"])
    assert len(specs) == (3 + 3) * 2 * 2 and len({s.episode_id for s in specs}) == len(specs)
    assert {s.size for s in specs if s.task == "digits-cnn1d"} == {"w4", "w8", "w4s3"}
    assert parse_seeds("0-2,7") == [0, 1, 2, 7] and parse_behaviour("random") is None
    assert parse_behaviour("eps0.25") == 0.25


def test_bad_arguments_name_what_is_expected(capsys):
    with pytest.raises(ValueError, match="expected e.g. 0-9"):
        parse_seeds("zero")
    with pytest.raises(ValueError, match="unknown behaviour 'greedy'"):
        parse_behaviour("greedy")
    with pytest.raises(TaskError, match="unknown task 'imagenet'"):
        plan(["imagenet"], [0], ["random"])
    assert main(["--out", "/nonexistent/never-created", "--tasks", "digits-mlp", "--behaviours", "eps2"]) == 2
    assert "unknown behaviour 'eps2'" in capsys.readouterr().err
