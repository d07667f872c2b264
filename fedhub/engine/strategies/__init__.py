"""Aggregation strategies (Flower's set) behind one interface; see :mod:`.base`.

- :mod:`.averaging`: FedAvg, FedAvgM, FedProx (streaming weighted mean, O(model) memory);
- :mod:`.adaptive`: FedAdam, FedYogi, FedAdagrad (server optimizers on the mean update);
- :mod:`.robust`: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan (every update buffered);
- :mod:`.fairness`: QFedAvg (q-FFL: each update weighted by its device's loss, streaming);
- :mod:`.buffer`: the memory-mapped update buffer the robust ones use;
- :mod:`.registry`: strategies by name, ``KEY=VALUE`` settings, ``--list-strategies``.
"""

from ..params import ParamError
from .adaptive import FedAdagrad, FedAdam, FedYogi
from .averaging import FedAvg, FedAvgM, FedProx
from .base import (
    DEFAULT_MEMORY_BUDGET,
    AggregationError,
    InvalidUpdate,
    NotEnoughUpdates,
    RoundAggregator,
    RoundPlan,
    RoundResult,
    Strategy,
)
from .buffer import UpdateBuffer
from .fairness import QFedAvg
from .registry import (
    STRATEGIES,
    describe_strategies,
    format_strategies,
    make_strategy,
    parse_strategy_args,
)
from .robust import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "STRATEGIES", "AggregationError", "Bulyan", "FedAdagrad", "FedAdam",
    "FedAvg", "FedAvgM", "FedMedian", "FedProx", "FedTrimmedAvg", "FedYogi", "InvalidUpdate", "Krum",
    "MultiKrum", "NotEnoughUpdates", "ParamError", "QFedAvg", "RoundAggregator", "RoundPlan", "RoundResult",
    "Strategy", "UpdateBuffer", "describe_strategies", "format_strategies", "make_strategy",
    "parse_strategy_args",
]
