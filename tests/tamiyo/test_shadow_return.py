"""The shadow-return reward: every decision of an episode gets its final validation accuracy and
FLOPs against the no-growth shadow of the same task, size and seed; missing shadows are refused."""

from __future__ import annotations

import json

import pytest

from esper.tamiyo.collect import SHADOW, EpisodeSpec, is_done, plan, shadow_dir, shadow_specs
from esper.tamiyo.offline import ReplayDataError, load_replay
from esper.tamiyo.reward import REWARD_DEFINITION, SHADOW_RETURN_DEFINITION, shadow_return
from esper.tamiyo.train_cli import main as train_main
from tests.tamiyo.test_offline import WAIT, report, sick_graph, write


def _episode(out, task, size, seed, behaviour, val_acc, flops, rewards=(0.0, 0.0)):
    spec = EpisodeSpec(task, size, seed, behaviour)
    root = out / "episodes" / spec.episode_id
    write(root, [report(sick_graph(spec.episode_id, i % 3, i + 1), WAIT, reward=r) for i, r in enumerate(rewards)])
    (root / "done.json").write_text(json.dumps({"task": task, "size": size, "seed": seed, "behaviour": behaviour,
                                                "final_val_acc": val_acc, "flops_total": flops}))
    return spec


def _shadow(out, task, size, seed, val_acc, flops):
    root = shadow_dir(out, EpisodeSpec(task, size, seed, SHADOW))
    root.mkdir(parents=True)
    (root / "done.json").write_text(json.dumps({"task": task, "size": size, "seed": seed, "behaviour": SHADOW,
                                                "final_val_acc": val_acc, "flops_total": flops}))


def test_every_decision_gets_the_episode_return_against_its_shadow(tmp_path):
    out = tmp_path / "replay"
    _episode(out, "digits-cnn1d", "w4", 7, "random", 0.80, 3.0e8, rewards=(-0.1, 0.4))
    _episode(out, "digits-cnn1d", "w4", 7, "eps0.3", 0.70, 1.5e8)
    _episode(out, "digits-cnn1d", "w4", 8, "random", 0.60, 1.0e8)
    _shadow(out, "digits-cnn1d", "w4", 7, 0.65, 1.0e8)
    _shadow(out, "digits-cnn1d", "w4", 8, 0.62, 1.0e8)
    own = load_replay([out])
    assert own.reward_definition == REWARD_DEFINITION
    assert sorted(round(float(s.reward), 3) for s in own.samples) == [-0.1, 0.0, 0.0, 0.0, 0.0, 0.4]
    data = load_replay([out], reward="shadow-return")
    assert data.reward_definition == SHADOW_RETURN_DEFINITION and data.data_sha256 != own.data_sha256
    by_run = {}
    for s in data.samples:
        by_run.setdefault(s.run_id, set()).add(round(float(s.reward), 4))
    # +15 points at three times the shadow's FLOPs (two host runs extra: -2); +5 at +50%; -2 at equal FLOPs.
    assert by_run == {"digits-cnn1d.w4.s7.random": {13.0}, "digits-cnn1d.w4.s7.eps0.3": {4.5},
                      "digits-cnn1d.w4.s8.random": {-2.0}}
    assert shadow_return(0.8, 0.65, 3.0e8, 1.0e8) == pytest.approx(13.0)


def test_missing_or_old_shadows_are_refused(tmp_path, capsys):
    out = tmp_path / "replay"
    _episode(out, "teacher-mlp", "w8", 3, "random", 0.5, 1e8)
    with pytest.raises(ReplayDataError, match=r"no no-growth shadow of teacher-mlp.w8.s3.*collect --shadows"):
        load_replay([out], reward="shadow-return")
    assert train_main(["--replay", str(out), "--out", str(tmp_path / "p"), "--reward", "shadow-return"]) == 2
    assert "no no-growth shadow of teacher-mlp.w8.s3" in capsys.readouterr().err
    _shadow(out, "teacher-mlp", "w8", 3, None, 1e8)  # written before final_val_acc was recorded
    with pytest.raises(ReplayDataError, match="no final_val_acc"):
        load_replay([out], reward="shadow-return")
    with pytest.raises(ReplayDataError, match="reward 'accuracy'"):
        load_replay([out], reward="accuracy")


def test_one_shadow_per_task_size_and_seed_is_planned(tmp_path):
    specs = plan(["digits-cnn1d"], [0, 1], ["random", "eps0.3"], ["w4"])
    shadows = shadow_specs(specs)
    assert [(s.task, s.size, s.seed, s.behaviour) for s in shadows] == [
        ("digits-cnn1d", "w4", 0, SHADOW), ("digits-cnn1d", "w4", 1, SHADOW)]
    assert not is_done(shadows[0], tmp_path)
    _shadow(tmp_path, "digits-cnn1d", "w4", 0, 0.5, 1e8)
    assert is_done(shadows[0], tmp_path) and not is_done(specs[0], tmp_path)
