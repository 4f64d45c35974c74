"""Growth operators: width (new units between two host layers), merge, and depth (new blocks).

- `WidthPair` / `pair_modules`: where a width seed grows (producer -> [norm] -> act -> [post] -> consumer).
- `WidthSeed`: the new units as their own parameters while on trial; `attached` runs one in a host.
- `capture_statistics`, `gradmax_init`, `tiny_init`, `random_init`: initialisation.
- `merge_width_seed` / `widen_pair`: plain wider host modules, optimizer state carried over
  (`replace_grown`, `fill_new_parameter`; zero-padded or filled from statistics).
- `WidthGrowth`: width seeds in the Kasmina seed lifecycle, merged at fossilization.
- `insert_mlp_layer`, `insert_resnet_block`: depth growth that starts as the identity.
"""

from esper.kasmina.growth.attach import WidthHooks, attached
from esper.kasmina.growth.depth import DEPTH_MODES, insert_mlp_layer, insert_resnet_block
from esper.kasmina.growth.init import INITS, gradmax_init, random_init, tiny_init, top_singular
from esper.kasmina.growth.merge import merge_width_seed, regrow, widen_pair
from esper.kasmina.growth.optim_state import FILLS, fill_new_parameter, replace_grown
from esper.kasmina.growth.pair import PairModules, WidthPair, pair_modules, resolve
from esper.kasmina.growth.seed import WidthSeed, relu_open_at_zero
from esper.kasmina.growth.statistics import PairStatistics, capture_statistics
from esper.kasmina.growth.width_growth import FAMILY, WidthGrowth, width_spec

__all__ = [
    "DEPTH_MODES", "FAMILY", "FILLS", "INITS", "PairModules", "PairStatistics", "WidthGrowth", "WidthHooks",
    "WidthPair", "WidthSeed", "attached", "capture_statistics", "fill_new_parameter", "gradmax_init",
    "insert_mlp_layer", "insert_resnet_block", "merge_width_seed", "pair_modules", "random_init", "regrow",
    "relu_open_at_zero", "replace_grown", "resolve", "tiny_init", "top_singular", "widen_pair", "width_spec",
]
