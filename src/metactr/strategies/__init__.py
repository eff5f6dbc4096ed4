"""Training strategies, one registry: how a batch (or a meta-batch of tasks) becomes a loss and an
update. ``build_strategy(cfg)`` gives the object the Trainer runs; configs are in ``config``.

plain · two_phase (RML) · maml / fomaml / metasgd · reptile · melu · mamo · meta_embedding
"""

from metactr.strategies import cold_start, maml, plain, session, two_phase  # noqa: F401  (register)
from metactr.strategies.base import Context, Phase, Strategy, build_strategy, group_names, strategy_registry
from metactr.strategies.config import (STRATEGIES, StrategyConfig, StrategyDefaults, strategy_config)

__all__ = ["STRATEGIES", "Context", "Phase", "Strategy", "StrategyConfig", "StrategyDefaults", "build_strategy",
           "group_names", "strategy_config", "strategy_registry"]
