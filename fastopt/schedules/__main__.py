"""Preview a schedule from the command line:

    python -m fastopt.schedules "WSD(peak=3e-4, total=10000, decay=0.2)" --steps 10000 --plot out.png

prints the value at each phase's first and last step (start, end of warmup, start of decay, end, ...) and writes
a PNG plot if asked.
"""

from __future__ import annotations

import argparse

from .base import Schedule
from .spec import parse


def key_points(schedule: Schedule, steps: int) -> list[tuple[int, str]]:
    """(step, label) for the first and last step of every phase within steps 0..steps-1."""
    marks = [(start, name) for start, name in schedule.milestones() if start < steps]
    points = []
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else steps
        points.append((start, name))
        if end - 1 > start:
            points.append((end - 1, f"{name} (last step)"))
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastopt.schedules", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help='a schedule, e.g. "WSD(peak=3e-4, total=10000, decay=0.2)"')
    parser.add_argument("--steps", type=int, help="optimizer steps to preview (default: the schedule's length)")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of the schedule to this file")
    args = parser.parse_args(argv)
    try:
        schedule = parse(args.spec)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    steps = args.steps if args.steps is not None else schedule.length
    if not steps or steps < 1:
        parser.error("give --steps >= 1 (this schedule has no length of its own)")

    print(repr(schedule))
    print(f"{'step':>10}  {'value':>12}  phase")
    for step, label in key_points(schedule, steps):
        print(f"{step:>10}  {schedule(step):>12.6g}  {label}")
    if args.plot:
        schedule.plot(steps, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
