"""A germinating seed waits longer while its services are down: the driver adds the grace epochs a
controller reports (the epochs Urza or Tezzeret was down) to germination_timeout_epochs."""

from __future__ import annotations

import esper.kasmina as K
from esper.kasmina.lifecycle import LifecycleConfig
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP


def test_grace_epochs_extend_the_germination_timeout():
    model = K.wrap(MLP(4, 8, 2, depth=1), ["hidden.0"])
    outage_epochs = {("hidden.0", 0): 3}
    driver = K.LifecycleDriver(model, LifecycleConfig(germination_timeout_epochs=2),
                               germination_grace=lambda name, seed: outage_epochs.get((name, seed), 0))
    layer = driver.site("hidden.0")
    layer.germinate(0, "residual_mlp", await_kernel=True)
    for _ in range(4):  # 2 epochs of timeout + 3 of grace: still waiting after 4
        driver.end_epoch()
        assert layer.state_of(0) == S.GERMINATED
    driver.end_epoch()
    cancelled = [e for e in driver.events if e.to_state == S.CANCELLED]
    assert cancelled and "(+3 while its services were down)" in cancelled[0].reason
