"""Suites: a grid of runs over the stages of a model's life (pretrain -> cpt -> sft -> rl), trained as a tree
with an evaluation after each stage, collected into one results table.

    megaevo suite SPEC.yaml [--out DIR] [--dry-run [--verbose]] [--launcher local|slurm] [--only NAME...]

The spec format: :mod:`megaevo.suite.spec`; the run tree: :mod:`megaevo.suite.tree`; launchers:
:mod:`megaevo.suite.launch` (a child's progress: :mod:`megaevo.suite.progress`; the dry run's summary:
:mod:`megaevo.suite.plan`; what a run has done: :mod:`megaevo.suite.markers`); the table: :mod:`megaevo.suite.results`.
"""
from megaevo.suite.launch import main, run_local, run_slurm
from megaevo.suite.results import collect, write_results
from megaevo.suite.spec import SpecError, SuiteSpec, load_spec, spec_from_dict
from megaevo.suite.tree import Run, expand, select

__all__ = ["Run", "SpecError", "SuiteSpec", "collect", "expand", "load_spec", "main", "run_local", "run_slurm",
           "select", "spec_from_dict", "write_results"]
