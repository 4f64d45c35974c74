"""Tamiyo, the controller: a ModelGraphState in, AdaptationDecisions out.

    from esper.tamiyo import Controller, HeuristicPolicy, SafetyRails
    controller = Controller(HeuristicPolicy(cfg, rails_cfg, host_flops), SafetyRails(rails_cfg, host_flops))
    # or, from a policy config mapping: esper.tamiyo.settings.PolicySettings(...).controller(host_flops)
    decisions = controller.decide(model_graph_state)          # esper.v1 protobuf messages
"""

from esper.tamiyo.heuristic import HeuristicPolicy, plateau
from esper.tamiyo.policy import HeuristicConfig, Policy, RailsConfig
from esper.tamiyo.rails import Controller, SafetyRails

__all__ = ["Controller", "HeuristicConfig", "HeuristicPolicy", "Policy", "RailsConfig", "SafetyRails", "plateau"]
