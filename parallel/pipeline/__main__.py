"""``python -m parallel.pipeline show|table``: print, draw or compare pipeline schedules.

    python -m parallel.pipeline show --schedule dualpipe --pp 4 --microbatches 10 --format png --out t.png
    python -m parallel.pipeline table --stages 16 --microbatches 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checker import check
from .printer import draw_timeline, to_json, to_text
from .schedules import SCHEDULES, ScheduleError, build
from .simulator import CostModel, comparison, simulate


def _costs(text: str | None) -> CostModel:
    """A cost model from a JSON file or an inline JSON object (keys F, B, W, I, F&B, p2p, ...)."""
    if text is None:
        return CostModel()
    return CostModel.load(json.loads(text) if text.lstrip().startswith("{") else Path(text))


def _show(args: argparse.Namespace) -> str:
    schedule = build(args.schedule, args.pp, args.microbatches, n_layers=args.layers)
    check(schedule)
    if args.format == "json":
        return to_json(schedule, communication=not args.no_comm)
    result = simulate(schedule, _costs(args.costs))
    if args.format == "png":
        out = args.out or f"pipeline-{args.schedule}-pp{args.pp}-mb{args.microbatches}.png"
        return f"wrote {draw_timeline(result, out)}"
    return to_text(result)


TABLE_COLUMNS = [("schedule", "schedule", "{}"), ("devices", "devices", "{}"),
                 ("micro-batches", "microbatches", "{}"), ("step time", "step_time", "{:g}"),
                 ("bubble (simulated)", "bubble", "{:g}"), ("bubble (paper formula)", "paper_bubble", "{:g}"),
                 ("bubble fraction", "bubble_fraction", "{:.3f}"), ("exposed comm", "exposed_comm", "{:g}"),
                 ("peak activations", "peak_activations", "{}"), ("stages / device", "stages_per_device", "{}"),
                 ("parameter copies", "param_copies", "{}")]


def _table(args: argparse.Namespace) -> str:
    cost = _costs(args.costs)
    rows = comparison(args.stages, args.microbatches, cost)
    if args.format == "json":
        return json.dumps(rows)
    lines = ["| " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in TABLE_COLUMNS) + " |" for row in rows]
    notes = [f"- {r['schedule']}: {r['note']}" for r in rows if r["note"]]
    legend = (f"costs per chunk: F={cost.forward:g} B={cost.backward:g} W={cost.weight:g} I={cost.I:g} "
              f"F&B={cost.FB:g} p2p={cost.p2p:g}; {args.stages} stages")
    return "\n".join([legend, "", *lines, *([""] + notes if notes else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print or draw one schedule")
    show.add_argument("--schedule", choices=SCHEDULES, required=True)
    show.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    show.add_argument("--microbatches", type=int, required=True)
    show.add_argument("--format", choices=("text", "json", "png"), default="text")
    show.add_argument("--out", help="output file (png; json and text go to it too when given)")
    show.add_argument("--layers", type=int, help="model blocks, to check they split into the stages")
    show.add_argument("--costs", help="cost model: JSON file or inline JSON, e.g. '{\"F&B\": 2.5}'")
    show.add_argument("--no-comm", action="store_true", help="json: leave out sends and receives")
    table = sub.add_parser("table", help="the DualPipe table, simulated, for one stage count")
    table.add_argument("--stages", type=int, required=True, help="PP of the table (model stages)")
    table.add_argument("--microbatches", type=int, required=True)
    table.add_argument("--costs", help="cost model: JSON file or inline JSON")
    table.add_argument("--format", choices=("markdown", "json"), default="markdown")
    args = parser.parse_args(argv)
    try:
        text = _show(args) if args.command == "show" else _table(args)
    except ScheduleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "show" and args.out and args.format != "png":
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
