"""The `megaevo report` command line: plots of runs and suites (megaevo.suite.report), EvoLM's questions
answered from a suite (``--findings``, megaevo.suite.findings) and the mixture-law fits of its CPT runs
(``--fit``, megaevo.suite.fit). A mistake in the input is one line, ``error: megaevo report: ...``, exit 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megaevo.errors import UserError, report_user_error
from megaevo.log import setup_logging
from megaevo.suite.findings import write_findings
from megaevo.suite.fit import summary, write_fit
from megaevo.suite.report import main as report_main


def report_parser() -> argparse.ArgumentParser:
    """`megaevo report`: plots of runs and suites (megaevo.suite.report), EvoLM's questions answered from a
    suite (--findings, megaevo.suite.findings) and the mixture-law fits of its CPT runs (--fit,
    megaevo.suite.fit)."""
    p = argparse.ArgumentParser(prog="megaevo report", description="Draw PNG plots of training runs "
                                "(DIR/metrics.jsonl) and suites (DIR/results.json with DIR/runs/ID/metrics.jsonl); "
                                "with --findings, answer EvoLM's questions (a)-(e) from a suite; with --fit, fit "
                                "the D-CPT and CMR mixture laws to a suite's CPT runs.")
    p.add_argument("dirs", nargs="*", metavar="RUN_OR_SUITE_DIR", help="run or suite directories to plot")
    p.add_argument("--out", default=None, help="where to write (default: DIR/plots for one directory, else "
                   "./plots; --findings: SUITE_DIR/findings; --fit: SUITE_DIR/fit)")
    p.add_argument("--findings", metavar="SUITE_DIR", default=None, help="one figure per question the suite's axes "
                   "allow and OUT/findings.md, OUT/findings.json")
    p.add_argument("--fit", metavar="SUITE_DIR", default=None, help="fit the D-CPT law and CMR's per-ratio power "
                   "laws to the CPT runs of the suite's mixture axis: OUT/fit.json, OUT/fit.png")
    p.add_argument("--tolerance", type=float, default=None, metavar="NATS", help="--fit: how far the general loss "
                   "may rise above its value before CPT for a feasible mixture (default: 1%% of that loss)")
    p.add_argument("--holdout", type=float, default=None, metavar="SHARE", help="--fit: the domain share held out "
                   "and predicted (default: the middle one)")
    p.add_argument("--domain", default=None, metavar="NAME", help="--fit: the domain corpus (data.train name; "
                   "default: the largest mean weight over the CPT runs)")
    p.add_argument("--general", default=None, metavar="NAME", help="--fit: the general (replayed) corpus")
    return p


def main(argv: list[str]) -> int:
    """`megaevo report`: plots (megaevo.suite.report) unless --findings or --fit is given."""
    args = report_parser().parse_args(argv)
    if args.findings is None and args.fit is None:
        return report_main(argv)
    setup_logging()
    try:
        if args.dirs:
            raise UserError(f"give the suite directory to --findings / --fit only, not also {' '.join(args.dirs)}")
        if args.findings is not None:
            out = Path(args.out) if args.out else Path(args.findings) / "findings"
            found, files = write_findings(args.findings, out)
            for f in found:
                rep = {True: "reproduced", False: "not reproduced", None: "cannot tell"}[f.reproduced]
                print(f"({f.key}) {rep}: {f.answer}")
            for f in files:
                print(f)
        if args.fit is not None:
            out = Path(args.out) if args.out else Path(args.fit) / "fit"
            result, files = write_fit(args.fit, out,
                                      tolerance=args.tolerance, holdout=args.holdout, domain=args.domain,
                                      general=args.general)
            for line in summary(result):
                print(line)
            for f in files:
                print(f)
    except (ValueError, OSError, ImportError) as e:
        return report_user_error(e, "report")
    return 0
