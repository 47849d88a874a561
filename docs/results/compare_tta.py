"""Paired comparison of two evaluation tables of the same images, the second made with --tta:
its methods get a ``+tta`` suffix and each is compared with its plain twin (docs/RESULTS.md,
"Test-time flips").

    python docs/results/compare_tta.py PLAIN.csv TTA.csv OUT_DIR
"""

from __future__ import annotations

import sys

from pipeline.evaluation.tables import read_eval_table
from pipeline.reports import build_report, write_report


def main(plain: str, flipped: str, out: str) -> None:
    rows = [dict(r) for r in read_eval_table(plain).rows()]
    rows += [{**r, "method": r["method"] + "+tta"} for r in read_eval_table(flipped).rows()]
    methods = sorted({r["method"] for r in rows if not r["method"].endswith("+tta")})
    report = build_report([rows], comparisons=[(m + "+tta", m) for m in methods],
                          title="test-time flips vs none")
    write_report(report, out)
    for c in report.comparisons:
        print(f"  {c.method_a} - {c.method_b}: {100 * c.mean_difference:+.2f} points "
              f"[{100 * c.ci_low:+.2f}, {100 * c.ci_high:+.2f}], {c.wins}/{c.losses}/{c.ties}, "
              f"means {100 * c.mean_a:.2f} vs {100 * c.mean_b:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
