"""Pipeline schedules as data: one IR, generators, a checker, a simulator and a printer.

``build(name, pp, microbatches)`` returns a ``Schedule``; ``check`` proves its invariants;
``simulate`` replays it with a ``CostModel``. See docs/pipeline.md.
"""
from .checker import check, problems
from .comm import place_communication
from .ir import Compute, Overlapped, Recv, Schedule, ScheduleError, Send, TensorKey, consumed, produced
from .schedules import SCHEDULES, build, from_json, layout, stage_layers, validate
from .simulator import CostModel, SimulationResult, simulate

__all__ = ["check", "problems", "place_communication", "Compute", "Overlapped", "Recv", "Schedule",
           "ScheduleError", "Send", "TensorKey", "consumed", "produced", "SCHEDULES", "build",
           "from_json", "layout", "stage_layers", "validate", "CostModel", "SimulationResult",
           "simulate"]
