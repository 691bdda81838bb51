"""Measured energy per token (SPEC section 7), in three parts: the counting engine (counter.py, with the places
that modules declare in energy_places.py), the 45 nm pricing and report (pricing.py), and the CLI's tables and plots
(report.py). Importing `spikedecoder.energy` gives all of their public names."""

from ..energy_places import energy_scope
from .counter import count_ops
from .counts import OpCounts, is_binary
from .pricing import (
    KINDS,
    PRESETS,
    EnergyModel,
    StepEnergy,
    compare_reports,
    decode_report,
    deployed,
    energy_report,
    step_energy,
    subblock,
)
from .report import add_arguments, format_table, plot_reports, run, validation_windows, window_batches

__all__ = [
    "KINDS",
    "PRESETS",
    "EnergyModel",
    "OpCounts",
    "StepEnergy",
    "add_arguments",
    "compare_reports",
    "count_ops",
    "decode_report",
    "deployed",
    "energy_report",
    "energy_scope",
    "format_table",
    "is_binary",
    "plot_reports",
    "run",
    "step_energy",
    "subblock",
    "validation_windows",
    "window_batches",
]
