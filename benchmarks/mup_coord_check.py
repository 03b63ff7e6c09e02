"""muP coordinate check: plot activation scale vs width for standard and muP parametrization (PNG + JSON)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from open360.models.mup import CoordCheckSetup, coord_check, growth, plot_coord_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=CoordCheckSetup.steps)
    parser.add_argument("--lr", type=float, default=CoordCheckSetup.lr)
    parser.add_argument("--png", type=Path, default=Path("analysis/mup_coord_check.png"))
    parser.add_argument("--out", type=Path, default=None, help="JSON with every (width, step, activation, scale)")
    args = parser.parse_args()
    setup = CoordCheckSetup(steps=args.steps, lr=args.lr)
    rows = coord_check(args.widths, mup=False, setup=setup) + coord_check(args.widths, mup=True, setup=setup)
    print(f"growth = scale(width {max(args.widths)}) / scale(width {min(args.widths)}) after {args.steps} steps")
    print(f"{'activation':<12} {'standard':>10} {'muP':>10}")
    for act in dict.fromkeys(r["activation"] for r in rows):
        sp = growth([r for r in rows if r["parametrization"] == "sp"], act, args.steps)
        mup = growth([r for r in rows if r["parametrization"] == "mup"], act, args.steps)
        print(f"{act:<12} {sp:>10.2f} {mup:>10.2f}")
    print(f"plot: {plot_coord_check(rows, args.png)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": asdict(setup), "rows": rows}, indent=1))
        print(f"json: {args.out}")


if __name__ == "__main__":
    main()
