"""`megaevo demo`: the life of a language model on this CPU, without a download.

The data steps build two corpora, a tokenizer and indexed datasets; the general domain is the Python
standard library of the running interpreter (module reference pages made from docstrings, and the
source itself), the math domain is generated offline with reasoning-gym (questions with a worked
solution where one can be derived, and the answer), and the SFT conversations are reasoning-gym GCD
problems with worked Euclid steps:

    DIR/corpus/{general,math,sft}.jsonl  {"text": ...} / {"prompt", "response"} per line
    DIR/tokenizer/demo.model             SentencePiece model trained on the general and math corpora
    DIR/data/{general,math}.{bin,idx}    tokenized datasets (one document per corpus line, EOD appended)
    DIR/data/sft.*                       the SFT dataset (`megaevo preprocess --sft --template evolm`)
    DIR/demo.json                        what was made: paths, documents, tokens, vocabulary

Then the life cycle (:mod:`megaevo.demo.lifecycle`): DIR/suite.yaml and DIR/configs/STAGE.yaml (written
when absent: edit them and rerun) run as a suite into DIR/suite/ — pretrain, CPT with and without replay,
SFT, RL, evaluated after each stage — and the table is printed, the plots written to DIR/plots/.

Every data step leaves a `.done` record beside its output naming the inputs it was built from; a rerun
reuses an output only when that record matches and the output is complete, and the suite skips the
runs that finished, so a rerun is immediate.

`run_demo(..., life_cycle=False)` trains the single pre-training run of earlier versions instead
(`train_demo`, into DIR/run with DIR/config.yaml).

Modules: :mod:`~megaevo.demo.corpora` (the text), :mod:`~megaevo.demo.data` (cached data steps),
:mod:`~megaevo.demo.training` (stage settings, the single run), :mod:`~megaevo.demo.lifecycle` (the suite),
:mod:`~megaevo.demo.result` (what was made), :mod:`~megaevo.demo.common` (reporting, digests).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from megaevo.demo.corpora import (GENERAL_BYTES, GENERAL_DOCS, MATH_DOCS, MATH_MIX, SFT_CONVERSATIONS, SFT_TASKS,
                                  TOKENIZER_MAX_SENTENCES, TRAIN_ITERS, VOCAB_SIZE, MathProblem, evaluate,
                                  general_corpus, math_corpus, math_problems, reference_page, sft_corpus,
                                  split_text, stdlib_files, worked_solution)
from megaevo.data.tokenizers import load_tokenizer
from megaevo.demo.common import reporters
from megaevo.demo.data import (DomainResult, _make_corpora, _make_dataset, _make_sft_corpus, _make_sft_dataset,
                               _make_tokenizer)
from megaevo.demo.lifecycle import (LifeCycleResult, LifeCycleSizes, run_life_cycle, stage_configs, suite_settings,
                                    write_suite)
from megaevo.demo.result import DemoResult
from megaevo.demo.training import TRAIN_RECORD, TrainingResult, grpo_settings, sft_settings, train_demo, train_settings

__all__ = ["DemoResult", "DomainResult", "GENERAL_BYTES", "GENERAL_DOCS", "LifeCycleResult", "LifeCycleSizes",
           "MATH_DOCS", "MATH_MIX", "MathProblem", "SFT_CONVERSATIONS", "SFT_TASKS", "TOKENIZER_MAX_SENTENCES",
           "TRAIN_ITERS", "TRAIN_RECORD", "TrainingResult", "VOCAB_SIZE", "evaluate", "general_corpus",
           "grpo_settings", "math_corpus", "math_problems", "reference_page", "run_demo", "run_life_cycle",
           "sft_corpus", "sft_settings", "split_text", "stage_configs", "stdlib_files", "suite_settings",
           "train_demo", "train_settings", "worked_solution", "write_suite"]


def run_demo(
    directory: str | os.PathLike = "megaevo-demo",
    seed: int = 1234,
    *,
    scale: float = 1.0,
    vocab_size: int = VOCAB_SIZE,
    verbose: bool = True,
    train: bool = True,
    life_cycle: bool = True,
    sizes: LifeCycleSizes | None = None,
    all_chains: bool = False,
    train_iters: int = TRAIN_ITERS,
    train_overrides: Sequence[str] = (),
) -> DemoResult:
    """Build the demo data under `directory`, then (unless `train` is false) run the life-cycle suite
    (`life_cycle`, sized by `sizes`; `all_chains`: SFT and RL after every CPT run, not only the last) or, with `life_cycle=False`, the single pre-training run; print and
    return what was made.

    `scale` multiplies the corpus sizes (1.0: about 6 MB of general text and 4,000 math problems).
    `train_iters` and `train_overrides` (dotted, as `megaevo train` takes them) size the single run.
    """
    start = time.perf_counter()
    log, show = reporters(verbose)
    root = Path(directory).resolve()
    steps = 4 if train else 3
    log(f"[1/{steps}] corpora in {root / 'corpus'}")
    corpora = _make_corpora(root / "corpus", seed, scale, log, verbose)
    sft = _make_sft_corpus(root / "corpus" / "sft.jsonl", seed, scale, log, verbose)
    log(f"[2/{steps}] SentencePiece tokenizer (vocabulary {vocab_size:,})")
    model, model_sha = _make_tokenizer(root / "tokenizer" / "demo", corpora, vocab_size, seed, log)
    log(f"[3/{steps}] tokenized datasets in {root / 'data'}")
    domains = [_make_dataset(root / "data" / name, corpus, model, model_sha, log, verbose) for name, corpus in corpora.items()]
    _make_sft_dataset(root / "data" / "sft", sft, model, model_sha, log, verbose)
    result = DemoResult(
        directory=str(root),
        seed=seed,
        scale=scale,
        tokenizer=str(model),
        vocab_size=load_tokenizer(model).vocab_size,
        domains=domains,
        seconds=round(time.perf_counter() - start, 1),
    )
    facts = result.as_dict()
    del facts["seconds"], facts["training"], facts["life_cycle"]  # demo.json: the data made, identical on a rerun
    (root / "demo.json").write_text(json.dumps(facts, indent=2) + "\n")
    show(result.describe())
    if train and life_cycle:
        log(f"[4/{steps}] the life cycle on the CPU: pretrain -> cpt (replay) -> sft -> rl  ({root / 'suite.yaml'})")
        write_suite(root, result.vocab_size, seed, sizes, log=log)
        result.life_cycle = run_life_cycle(root, log=log, show=show, all_chains=all_chains)
    elif train:
        log(f"[4/{steps}] training the tiny model on the CPU")
        result.training = train_demo(root, result.vocab_size, seed, train_iters, train_overrides, verbose)
    result.seconds = round(time.perf_counter() - start, 1)
    if train:
        log(f"megaevo demo done in {result.seconds:.0f} s")
    return result
