"""Show a schedule: JSON (the IR), text (action lists and a timeline), PNG (a timeline figure).

Timelines are drawn from the simulator's timing, like the DualPipe figure of the DeepSeek-V3
report: one row per rank, one box per compute action coloured by kind, the micro-batch number
inside; an ``F&B`` box is split, forward on top, backward below. Chunks on a rank's second
stage (DualPipe's reverse direction, DualPipeV's returning stages) are drawn darker (PNG) or
marked with ``'`` (text).
"""
from __future__ import annotations

import json
from pathlib import Path

from .ir import Compute, Overlapped, Schedule, computes
from .simulator import SimulationResult

COLOURS = {"F": "#f4b183", "B": "#9dc3e6", "I": "#a9d18e", "W": "#c5a3d9"}
DARK = {"F": "#c55a11", "B": "#2e75b6", "I": "#548235", "W": "#7030a0"}
NAMES = {"F": "forward", "B": "backward", "I": "input-grad backward", "W": "weight-grad backward"}


def to_json(schedule: Schedule, communication: bool = True) -> str:
    return json.dumps(schedule.to_json(communication))


def _second_chunk(schedule: Schedule, c: Compute) -> bool:
    """True for the chunk drawn darker: DualPipe's direction 1, DualPipeV's stages pp..2pp-1."""
    return c.direction == 1 or c.stage >= schedule.pp


def _label(schedule: Schedule, action) -> str:
    def one(c: Compute) -> str:
        return f"{c.kind}{c.mb}" + ("'" if _second_chunk(schedule, c) else "")
    if isinstance(action, Overlapped):
        return f"{one(action.forward)}&{one(action.backward)}"
    return one(action)


def summary(result: SimulationResult) -> str:
    """Step time, bubble, exposed communication, memory: one line per rank plus totals."""
    s = result.schedule
    lines = [f"{s.name}: pp={s.pp} ranks, {s.n_stages} stages, {s.microbatches} micro-batches; "
             f"step time {result.step_time:g}, bubble fraction {result.bubble_fraction:.3f}, "
             f"parameter copies {result.param_copies}",
             "rank  busy  bubble  exposed-comm  peak-activations  stages-held"]
    for r in range(s.pp):
        lines.append(f"{r:>4}  {result.busy[r]:>4g}  {result.bubble[r]:>6g}  {result.exposed_comm[r]:>12g}"
                     f"  {result.peak_activations[r]:>16}  {result.stages_per_rank[r]:>11}")
    return "\n".join(lines)


def to_text(result: SimulationResult, cell: int = 4) -> str:
    """Each rank's compute order, then a character timeline (``cell`` characters per time unit)."""
    s = result.schedule
    out = [summary(result), "", "order of compute actions (' = the rank's second chunk):"]
    for r in range(s.pp):
        out.append(f"rank {r}: " + " ".join(_label(s, a) for a in s.ranks[r] if computes(a)))
    unit = min(result.cost.of(slot.action) for line in result.timeline for slot in line)
    width = round(result.step_time / unit) * cell
    out += ["", f"timeline (one cell = {unit:g} time units, '.' = idle):"]
    for r, line in enumerate(result.timeline):
        row = ["."] * width
        for slot in line:
            a, b = round(slot.start / unit) * cell, round(slot.end / unit) * cell
            text = _label(s, slot.action)[: b - a - 1].ljust(b - a - 1) + "|"
            row[a:b] = list(text)
        out.append(f"rank {r:>2} |" + "".join(row))
    return "\n".join(out)


def draw_timeline(result: SimulationResult, path: str | Path, unit: str = "cost-model units",
                  title: str | None = None, marks: list[list[tuple[float, float]]] | None = None,
                  width: float | None = None) -> Path:
    """Write the timeline of a simulated (or measured) schedule as a PNG. ``marks``: per rank,
    intervals drawn as red bars under the row (a measured run's exposed all-to-all waits)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = result.schedule
    width = width or max(8.0, min(40.0, result.step_time * 0.35))
    fig, ax = plt.subplots(figsize=(width, 0.55 * s.pp + 1.4))
    for r, line in enumerate(result.timeline):
        y = s.pp - 1 - r
        for slot in line:
            chunks = computes(slot.action)
            height = 0.9 / len(chunks)
            for i, c in enumerate(chunks):
                bottom = y - 0.45 + (len(chunks) - 1 - i) * height
                colour = (DARK if _second_chunk(s, c) else COLOURS)[c.kind]
                ax.add_patch(plt.Rectangle((slot.start, bottom), slot.end - slot.start, height,
                                           facecolor=colour, edgecolor="black", linewidth=0.5))
                ax.text((slot.start + slot.end) / 2, bottom + height / 2, str(c.mb), ha="center",
                        va="center", fontsize=7 if len(chunks) == 1 else 6,
                        color="white" if _second_chunk(s, c) else "black")
        for start, end in (marks[r] if marks else []):
            ax.add_patch(plt.Rectangle((start, y - 0.5), end - start, 0.08, facecolor="#d62728",
                                       edgecolor="none"))
    ax.set_xlim(0, result.step_time)
    ax.set_ylim(-0.6, s.pp - 0.4)
    ax.set_yticks(range(s.pp))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(s.pp))])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title or (f"{s.name}, pp={s.pp}, {s.microbatches} micro-batches: step {result.step_time:g}, "
                           f"bubble fraction {result.bubble_fraction:.3f} (F&B: forward on top, backward below)"),
                 fontsize=9)
    handles = [Patch(facecolor=COLOURS[k], edgecolor="black", label=NAMES[k]) for k in "FBIW"]
    handles.append(Patch(facecolor=DARK["F"], edgecolor="black", label="second chunk (darker)"))
    if marks:
        handles.append(Patch(facecolor="#d62728", edgecolor="none", label="waiting for an all-to-all"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if s.pp < 4 else -0.18),
              ncol=5, fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
