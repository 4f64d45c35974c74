"""Transient outages never end growth: each service is SIGKILLed once while a seed is germinating
(services.mode=local restarts it) and the run still fossilizes a seed afterwards.

Also checks what the outages must not do: no kernel is put on the run-long failed list by them
(no "compile failed" cancellation), and no germination is cancelled by a germination timeout that
ran out while a service was down.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from esper.serving import open_sync_channel
from esper.v1 import tolaria_pb2, tolaria_pb2_grpc
from tests.system.helpers import DEV

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = ("tezzeret", "urza", "oona", "tamiyo")


def _germinating(events: list[dict]) -> list[tuple[str, int]]:
    """Slots whose latest transition is into GERMINATED (waiting for their kernel)."""
    last: dict[tuple[str, int], str] = {}
    for e in events:
        last[(e["layer"], e["seed"])] = e["to"]
    return [slot for slot, state in last.items() if state == "GERMINATED"]


def test_each_service_killed_while_a_seed_germinates_and_a_seed_still_fossilizes(tmp_path, train_process):
    run_dir = tmp_path / "run"
    # No governor: on digits' tiny late losses its rollbacks would end seeds before they can
    # fossilize; room for many adaptations, since the run goes on until a seed fossilizes: six
    # seed slots and a budget far above the config's 2x, so that even if every seed germinated
    # around the four kills fossilizes, a slot and budget are left for the one after the restarts
    # (with two slots and 2x the run could fill both and then wait for a germination forever).
    proc = train_process(run_dir, "--config", DEV, "train.epochs=100000", "model.width=8", "model.depth=3",
                         "seeds.num_seeds=2", "controller.parameter_budget=50.0",
                         "controller.compute_budget=50.0", "controller.start_epoch=2",
                         "controller.max_adaptations=1000", "governor.enabled=false",
                         "logging.tensorboard=false", "logging.timeline_plot=false",
                         "lifecycle.germination_timeout_epochs=200")
    proc.wait_for(lambda: proc.service_pids().get("pids", {}).get("tamiyo"), 300, "services up")
    address = proc.tolaria_address()
    killed_while_germinating = {}
    for name in SERVICES:
        slots = proc.wait_for(lambda: _germinating(proc.events()), 600, f"a germinating seed to kill {name} under")
        pid = proc.service_pids()["pids"][name]
        os.kill(pid, signal.SIGKILL)
        killed_while_germinating[name] = slots
        restarts = proc.service_pids().get("restarts", {}).get(name, 0)
        proc.wait_for(lambda n=name, r=restarts: proc.service_pids().get("restarts", {}).get(n, 0) > r, 180,
                      f"{name} restarted")
    last_kill = max(e["step"] for e in proc.events()) if proc.events() else 0
    proc.wait_for(lambda: any(e["to"] == "FOSSILIZED" and e["step"] >= last_kill for e in proc.events()), 900,
                  "a seed fossilized after the restarts")
    with open_sync_channel(address) as channel:
        tolaria_pb2_grpc.TolariaServiceStub(channel).Stop(tolaria_pb2.StopRequest(reason="test"), timeout=120)
    assert proc.wait(300) == 0, proc.output()[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    services = summary["services"]
    assert all(services["restarts"].get(n, 0) >= 1 for n in SERVICES), services["restarts"]
    events = proc.events()
    cancelled = [e for e in events if e["to"] == "CANCELLED"]
    assert not [e for e in cancelled if e["reason"].startswith("compile failed")], cancelled
    print(f"\nkilled while germinating: {killed_while_germinating}; outages: {services['outages']}; "
          f"restarts: {services['restarts']}; cancelled: {[e['reason'] for e in cancelled]}; "
          f"fossilized: {[(e['layer'], e['seed'], e['step']) for e in events if e['to'] == 'FOSSILIZED']}")
