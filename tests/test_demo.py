"""The embedded demo: corpus generators, worked math solutions, and the whole pipeline at a small scale."""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from fractions import Fraction

import pytest

from megaevo import demo
from megaevo.demo import data as demo_data
from megaevo.data.indexed import IndexedDataset

# -- general corpus ------------------------------------------------------------------------------


def test_general_corpus_is_deterministic_and_capped():
    first = list(demo.general_corpus(limit_docs=40, max_bytes=200_000))
    assert first == list(demo.general_corpus(limit_docs=40, max_bytes=200_000))
    assert 0 < len(first) <= 40
    assert sum(len(d.encode()) for d in first) <= 200_000
    assert all(d.strip() for d in first)
    assert len(list(demo.general_corpus(limit_docs=5, max_bytes=None))) == 5
    small = list(demo.general_corpus(limit_docs=None, max_bytes=30_000))
    assert 0 < sum(len(d.encode()) for d in small) <= 30_000


def test_general_corpus_has_reference_pages_and_source():
    docs = list(demo.general_corpus(limit_docs=200, max_bytes=None))
    assert any(d.startswith("Module ") for d in docs)
    assert any("def " in d and not d.startswith("Module ") for d in docs)


def test_general_corpus_skips_tests_packages_and_undecodable(tmp_path):
    body = "\n".join(f"value_{i} = {i}" for i in range(40)) + "\n"
    files = {
        "good.py": '"""A good module with a docstring."""\n' + body + 'def grow(x):\n    """Grow x."""\n',
        "pkg/__init__.py": '"""A package."""\n' + body.replace("value", "pkg_value"),
        "test/test_thing.py": body.replace("value", "TESTSUITE"),
        "pkg/tests/test_x.py": body.replace("value", "TESTSUITE"),
        "site-packages/third.py": body.replace("value", "THIRDPARTY"),
        "latin1.py": "# caf\xe9\n" + body.replace("value", "LATIN"),
        "tiny.py": "x = 1\n",
        "notes.txt": body.replace("value", "NOTPYTHON"),
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1" if name == "latin1.py" else "utf-8"))
    text = "\n".join(demo.general_corpus(limit_docs=None, max_bytes=None, root=tmp_path))
    assert "value_39 = 39" in text and "pkg_value_0" in text
    assert "Module good\n\nA good module with a docstring.\n\ngrow(x)\nGrow x." in text
    assert "Module pkg" not in text  # a module docstring alone makes no reference page
    for absent in ("TESTSUITE", "THIRDPARTY", "LATIN", "NOTPYTHON", "x = 1"):
        assert absent not in text
    with pytest.raises(FileNotFoundError, match="no Python source files"):
        list(demo.general_corpus(root=tmp_path / "test" / "nothing-here"))


def test_split_text_keeps_everything_and_bounds_chunks():
    source = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(300))
    chunks = list(demo.split_text(source, 500))
    assert len(chunks) > 5
    assert all(c.startswith("def f") for c in chunks)
    assert "\n\n".join(chunks) + "\n\n" == source
    assert max(map(len, chunks)) < 600
    wall = "x = [\n" + "    1,\n" * 2000 + "]\n"  # no blank line anywhere
    pieces = list(demo.split_text(wall, 1000))
    assert len(pieces) > 1 and max(map(len, pieces)) <= 4000 + 10
    assert "\n".join(pieces) + "\n" == wall


def test_reference_page():
    source = '''"""Tools."""

class Box:
    """Holds things."""

    def put(self, item, *, force=False):
        """Put an item in."""

    def _hidden(self):
        """Not shown."""


def helper(x):
    """Help with x."""
'''
    page = demo.reference_page("tools", source)
    assert page.startswith("Module tools\n\nTools.")
    assert "class Box\nHolds things." in page
    assert "Box.put(self, item, *, force=False)\nPut an item in." in page
    assert "helper(x)\nHelp with x." in page
    assert "_hidden" not in page
    assert demo.reference_page("broken", "def (:\n") is None


# -- math corpus ---------------------------------------------------------------------------------


def test_math_problems_are_seeded():
    a = demo.math_problems(60, seed=1)
    assert a == demo.math_problems(60, seed=1)
    b = demo.math_problems(60, seed=2)
    assert len(a) == len(b) == 60
    assert len({p.text for p in a} & {p.text for p in b}) < 10
    assert list(demo.math_corpus(60, seed=1)) == [p.text for p in a]


def test_math_documents_hold_question_solution_and_answer():
    problems = demo.math_problems(120, seed=3)
    assert {p.dataset for p in problems} == set(demo.MATH_MIX)
    assert len({p.question for p in problems}) == len(problems)
    for p in problems:
        assert p.text.startswith("Question: " + p.question.strip())
        assert p.text.endswith("\nAnswer: " + p.answer)
        assert p.answer.strip()
        assert ("\nSolution:\n" in p.text) == (p.solution is not None)
    with_steps = [p for p in problems if p.solution]
    assert len(with_steps) >= 0.8 * len(problems)
    assert {p.dataset for p in with_steps} >= set(demo.MATH_MIX) - {"basic_arithmetic", "products"}


def test_worked_solutions_check_their_result():
    entry = {"question": "GCD of 12 and 18?", "answer": "6", "metadata": {"numbers": [12, 18]}}
    steps = demo.worked_solution("gcd", entry)
    assert steps.splitlines() == ["18 = 1 × 12 + 6", "12 = 2 × 6 + 0", "The last nonzero remainder is 6, so the GCD is 6."]
    assert demo.worked_solution("gcd", {**entry, "answer": "5"}) is None
    assert demo.worked_solution("no_such_dataset", entry) is None

    eq = {"answer": "7", "metadata": {"equation": "81 - 3*x = 60", "variable": "x"}}
    assert demo.worked_solution("simple_equations", eq).splitlines() == [
        "81 - 3*x = 60",
        "Subtract 81 from both sides: -3*x = -21",
        "Divide both sides by -3: x = 7",
    ]
    assert demo.worked_solution("simple_equations", {**eq, "answer": "8"}) is None
    quadratic = {"answer": "3", "metadata": {"equation": "x*x = 9", "variable": "x"}}
    assert demo.worked_solution("simple_equations", quadratic) is None

    frac = {"answer": "$\\dfrac{3}{4}$", "metadata": {"numerator": 30, "denominator": 40}}
    assert demo.worked_solution("fraction_simplification", frac) == "gcd(30, 40) = 10\n30 ÷ 10 = 3 and 40 ÷ 10 = 4"
    assert demo.worked_solution("fraction_simplification", {**frac, "answer": "3/5"}) is None

    chain = {"answer": "-4", "metadata": {"expression": "4 - 1 - 7"}}
    assert demo.worked_solution("chain_sum", chain) == "4 - 1 = 3\n3 - 7 = -4"

    prod = {"answer": "4264", "metadata": {"expression": "82 * 52"}}
    assert demo.worked_solution("products", prod).splitlines()[-1] == "4100 + 164 = 4264"

    primes = {"answer": "2 × 2 × 5 × 7 × 7", "metadata": {"number": 980, "factors": [2, 2, 5, 7, 7]}}
    assert demo.worked_solution("prime_factorization", primes).splitlines()[-1] == "7 is prime."


def test_evaluate_is_exact_and_refuses_anything_else():
    assert demo.evaluate("1/3 + 1/6") == Fraction(1, 2)
    assert demo.evaluate("-( -2 - 9 ) * 3", {}) == 33
    assert demo.evaluate("2*y - 1", {"y": Fraction(5)}) == 9
    for bad in ("__import__('os')", "x", "2 ** 3", "[1][0]"):
        with pytest.raises(ValueError):
            demo.evaluate(bad)


def test_math_corpus_needs_reasoning_gym(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(ImportError, match=r"pip install 'megaevo\[demo\]'"):
        demo.math_problems(5, seed=0)


# -- corpus files --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit, total, end", [("B", 6_000, 3 + 4 + 2), ("doc", 4_000, 3)])
def test_corpus_progress_bar_closes_at_the_real_end(tmp_path, monkeypatch, unit, total, end):
    # The general corpus stops at its byte cap long before its document cap: the bar counts what
    # ends it, and a corpus that ends short of the bar's total closes the bar full, not at 1,318/4,000.
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def close(self):
            bars.append((self.n, self.total, self.unit))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    record = demo_data._write_jsonl(tmp_path / "general.jsonl", iter(["abc", "déf", "gh"]), total, True, unit)
    assert record["documents"] == 3
    assert bars[0] == (end, end, unit)  # (closed once more when collected)
    assert [json.loads(line)["text"] for line in (tmp_path / "general.jsonl").read_text().splitlines()] == [
        "abc", "déf", "gh"]


# -- the whole demo ------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_demo_small(tmp_path, capsys):
    from megaevo.data.tokenizers import load_tokenizer

    out = tmp_path / "demo"
    result = demo.run_demo(out, seed=5, scale=0.02, vocab_size=600, train=False)
    printed = capsys.readouterr().out
    assert result.training is None and not (out / "run").exists() and not (out / "config.yaml").exists()
    assert result.life_cycle is None and not (out / "suite.yaml").exists() and not (out / "suite").exists()
    facts = json.loads((out / "demo.json").read_text())
    assert facts == {k: v for k, v in result.as_dict().items() if k not in ("seconds", "training", "life_cycle")}
    assert facts["vocab_size"] == 600 and facts["seed"] == 5
    tokenizer = load_tokenizer(facts["tokenizer"])
    assert tokenizer.vocab_size == 600

    domains = {d["name"]: d for d in facts["domains"]}
    assert set(domains) == {"general", "math"}
    assert domains["math"]["corpus_documents"] == round(demo.MATH_DOCS * 0.02)
    for name, d in domains.items():
        corpus_lines = (out / "corpus" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(corpus_lines) == d["corpus_documents"] > 0
        ds = IndexedDataset(d["data_prefix"])
        ds.validate()
        assert (ds.num_documents, len(ds), ds.num_tokens) == (d["documents"], d["sequences"], d["tokens"])
        assert ds.num_documents == d["corpus_documents"]
        assert d["dtype"] == "uint16" == str(ds.dtype)
        last = [int(ds.document(i)[-1]) for i in range(ds.num_documents)]
        assert set(last) == {tokenizer.eod_id}
        first_text = json.loads(corpus_lines[0])["text"]
        assert tokenizer.decode(ds.document(0)[:-1]) == first_text
        assert f"{d['tokens']:,} tokens" in printed
    assert json.loads((out / "corpus" / "math.jsonl").read_text().splitlines()[0])["text"].startswith("Question: ")

    # A rerun reuses every output; a new seed rebuilds the math corpus and what depends on it.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "demo.json"}
    again = demo.run_demo(out, seed=5, scale=0.02, vocab_size=600, verbose=False, train=False)
    assert again.domains == result.domains
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    math_before = (out / "corpus" / "math.jsonl").read_text()
    demo.run_demo(out, seed=6, scale=0.02, vocab_size=600, verbose=False, train=False)
    assert (out / "corpus" / "general.jsonl").stat().st_mtime_ns == stamps[out / "corpus" / "general.jsonl"]
    assert (out / "corpus" / "math.jsonl").read_text() != math_before
    assert (out / "tokenizer" / "demo.model").stat().st_mtime_ns != stamps[out / "tokenizer" / "demo.model"]
    assert json.loads((out / "demo.json").read_text())["seed"] == 6


@pytest.mark.slow
def test_run_demo_rebuilds_incomplete_outputs(tmp_path):
    out = tmp_path / "demo"
    first = demo.run_demo(out, seed=5, scale=0.01, vocab_size=600, verbose=False, train=False)
    general_text = (out / "corpus" / "general.jsonl").read_text()
    (out / "data" / "math.bin").write_bytes(b"")  # a damaged dataset
    with open(out / "corpus" / "general.jsonl", "a") as f:  # a corpus changed behind its record
        f.write('{"text": "extra"}\n')
    second = demo.run_demo(out, seed=5, scale=0.01, vocab_size=600, verbose=False, train=False)
    assert (out / "corpus" / "general.jsonl").read_text() == general_text
    assert second.domains == first.domains
    math_ = IndexedDataset(second.domains[1].data_prefix)
    assert (math_.num_documents, math_.num_tokens) == (first.domains[1].documents, first.domains[1].tokens)


# -- training the tiny model ---------------------------------------------------------------------

# A few iterations on short samples: the whole demo, training included, in seconds.
SHORT = ["data.seq_len=32", "train.eval_iters=1"]


def _metrics(out):
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_demo_trains_and_writes_its_config(tmp_path, capsys):
    from megaevo.config import config_from_dict, load_config, validate
    from megaevo.checkpoint import LoadedCheckpoint

    out = tmp_path / "demo"
    result = demo.run_demo(out, seed=5, scale=0.01, vocab_size=600, train_iters=4, train_overrides=SHORT,
                           life_cycle=False)
    printed = capsys.readouterr().out
    training = result.training
    assert training.status == "trained" and training.iterations == 4
    assert "[4/4] training the tiny model" in printed

    # DIR/config.yaml is the exact config trained with: the demo's settings, the tokenizer's vocabulary.
    cfg = load_config(out / "config.yaml")
    assert cfg == config_from_dict(demo.train_settings(out.resolve(), 4, vocab_size=600, seed=5), SHORT)
    assert cfg == load_config(out / "run" / "config.yaml")
    assert (cfg.model.preset, cfg.model.vocab_size, cfg.train.iters, cfg.train.dtype) == ("tiny", 600, 4, "fp32")
    assert cfg.checkpoint.load == "auto" and cfg.out_dir == str((out / "run").resolve())
    assert {n: c["weight"] for n, c in cfg.data.train.items()} == {"general": 0.8, "math": 0.2}
    validate(cfg, world_size=2)  # torchrun --nproc_per_node 2 takes the same file

    # One progress line per log step, validation per domain, and a final checkpoint.
    records = _metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert "step      4/4  loss " in printed
    assert [e["step"] for e in training.evals] == [1, 2, 3, 4]
    assert set(training.evals[-1]) == {"step", "val/general", "val/math"}
    assert LoadedCheckpoint(out / "run" / "checkpoints" / "iter_0000004").iteration == 4

    # The before/after table: both domains at the first and the last evaluation.
    first, last = training.evals[0], training.evals[-1]
    assert "step 1" in printed and "step 4" in printed
    for name in ("val/general", "val/math"):
        row = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        assert f"{first[name]:.3f}" in row and f"{last[name]:.3f}" in row
        assert f"{last[name] - first[name]:+.3f}" in row


@pytest.mark.slow
def test_run_demo_leaves_a_finished_run_resumes_an_interrupted_one(tmp_path, capsys):
    out = tmp_path / "demo"
    kwargs = dict(seed=5, scale=0.01, vocab_size=600, train_iters=4, train_overrides=SHORT, life_cycle=False)
    demo.run_demo(out, **kwargs)
    metrics = (out / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()

    # A rerun of a finished run says so and trains nothing.
    again = demo.run_demo(out, **kwargs)
    printed = capsys.readouterr().out
    assert again.training.status == "already trained" and again.training.iterations == 4
    assert "already holds the finished run (iteration 4 of 4): not training again" in printed
    assert "/4  loss " not in printed
    assert (out / "run" / "metrics.jsonl").read_text() == metrics
    assert "val/math" in printed  # the table still shows the finished run's losses

    # An interrupted run (its last checkpoint at iteration 3) resumes where it stopped.
    checkpoints = out / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "iter_0000004")
    (checkpoints / "latest").write_text("iter_0000003")
    resumed = demo.run_demo(out, **kwargs)
    printed = capsys.readouterr().out
    assert resumed.training.status == "resumed" and resumed.training.iterations == 4
    assert "resuming from iteration 3" in printed
    assert "step      4/4  loss " in printed and "step      3/4  loss " not in printed
    assert [e["step"] for e in resumed.training.evals] == [1, 2, 3, 4]

    # Other settings start the run over.
    changed = demo.run_demo(out, **{**kwargs, "train_overrides": SHORT + ["optim.lr=1e-3"]})
    printed = capsys.readouterr().out
    assert changed.training.status == "trained" and "the config or the data changed, starting over" in printed
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_stopped_single_run_says_where_it_stopped_and_shows_no_table(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the demo's run: it saves and stops, and the demo says so instead of going on as if
    the run had finished; a rerun resumes."""
    import os
    import signal

    from megaevo.demo import training as trainer_module  # where the demo looks its Trainer up

    original = trainer_module.Trainer

    class StoppedAtTwo(original):
        def train_step(self):
            record = super().train_step()
            if self.run.iteration == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return record

    out = tmp_path / "demo"
    kwargs = dict(seed=5, scale=0.01, vocab_size=600, train_iters=4, train_overrides=SHORT, life_cycle=False)
    monkeypatch.setattr(trainer_module, "Trainer", StoppedAtTwo)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, **kwargs)
    printed = capsys.readouterr()
    assert "stopped at iteration 2, saved: rerun `megaevo demo" in printed.out + printed.err
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    monkeypatch.setattr(trainer_module, "Trainer", original)
    resumed = demo.run_demo(out, **kwargs)
    assert resumed.training.status == "resumed" and resumed.training.iterations == 4


@pytest.mark.slow
def test_train_demo_refuses_a_directory_it_did_not_make(tmp_path):
    demo.run_demo(tmp_path / "demo", seed=5, scale=0.01, vocab_size=600, verbose=False, train=False)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no demo run"):
        demo.train_demo(tmp_path / "demo", 600, iters=2, overrides=SHORT + [f"out_dir={other}"], verbose=False)
    assert (other / "notes.txt").read_text() == "keep me"


# -- the life cycle ---------------------------------------------------------------------------------

# Every stage in a few steps: short samples, two RL steps of two prompts, an evaluation of four problems.
TINY_CYCLE = demo.LifeCycleSizes(pretrain_iters=4, cpt_iters=2, sft_epochs=1, rl_iters=2, rl_prompts=2, rl_n=2,
                                 rl_max_new_tokens=8, eval_task="rg:gcd:4", eval_batch_size=4,
                                 overrides=["train.eval_iters=1"])


def test_suite_spec_has_every_stage_and_the_replay_axis(tmp_path):
    from megaevo.suite import expand, load_spec

    demo.run_demo(tmp_path, seed=5, scale=0.01, vocab_size=600, verbose=False, train=False)
    assert (tmp_path / "data" / "sft.bin").is_file() and (tmp_path / "data" / "sft.done").is_file()
    spec_path = demo.write_suite(tmp_path, 600, 5, log=lambda _: None)
    spec = load_spec(spec_path)
    assert [s.name for s in spec.stages] == ["pretrain", "cpt", "sft", "rl"]
    runs = expand(spec)
    cpt = [r for r in runs if r.stage == "cpt"]
    assert sorted(r.axes["replay"] for r in cpt) == [0.0, 0.25]
    weights = {r.axes["replay"]: {n: c["weight"] for n, c in r.config["data"]["train"].items()} for r in cpt}
    assert weights == {0.0: {"math": 1.0, "general": 0.0}, 0.25: {"math": 0.75, "general": 0.25}}
    # every run, CPT included, is evaluated on the suite's downstream task
    assert spec.eval.tasks == ["rg:gcd:200"] and all(r.eval.tasks == ["rg:gcd:200"] for r in runs)
    assert next(r for r in runs if r.stage == "sft").config["data"]["train"] == ["data/sft"]
    assert len(runs) == 7 and [r.name for r in demo.lifecycle.demo_runs(runs)][-2:] == [
        "pretrain/cpt[replay=0.25]/sft", "pretrain/cpt[replay=0.25]/sft/rl"]
    assert len(demo.lifecycle.demo_runs(runs)) == 5 and demo.lifecycle.demo_runs(runs, all_chains=True) == runs

    # the spec is written once: a user's edit survives the next demo
    spec_path.write_text(spec_path.read_text().replace("0.25", "0.5"))
    demo.write_suite(tmp_path, 600, 5, log=lambda _: None)
    assert "0.5" in spec_path.read_text()


@pytest.mark.slow
def test_life_cycle_runs_every_stage_and_a_rerun_does_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.run_demo(out, seed=5, scale=0.01, vocab_size=600, sizes=TINY_CYCLE)
    cycle = result.life_cycle
    assert cycle.ok, cycle.problems
    rows = {r["chain"]: r for r in cycle.rows}
    # SFT and RL continue from the last CPT run (with replay) only
    assert list(rows) == ["pretrain", "pretrain/cpt[replay=0.0]", "pretrain/cpt[replay=0.25]",
                          "pretrain/cpt[replay=0.25]/sft", "pretrain/cpt[replay=0.25]/sft/rl"]
    for chain, row in rows.items():
        m = row["metrics"]
        if row["stage"] in ("pretrain", "cpt"):
            assert {"loss/general", "loss/math"} <= set(m), chain
        assert demo.lifecycle.accuracy_key(m), chain  # every row, CPT included
        if row["stage"] == "rl":
            assert {"reward/first", "reward/last"} <= set(m), chain
    printed = capsys.readouterr().out
    assert "loss/general" in printed and "pretrain/cpt[replay=0.25]/sft/rl" in printed
    table = cycle.table().splitlines()
    cpt_line = next(line for line in table if line.split()[0] == "pretrain/cpt[replay=0.0]")
    assert cpt_line.split()[3] != "-"  # the CPT row's accuracy
    # progress while a run trains: its first and its last step line, under the run's TRAIN line
    assert re.search(r"^TRAIN   pretrain-\w+ .*\n(?:        \.\.\. .*\n)*        step +1/4 .*\n(?:.*\n)*?"
                     r"        step +4/4 ", printed, re.M), printed
    assert (out / "suite" / "results.md").is_file() and cycle.plots
    assert any("replay" in p for p in cycle.plots)

    # a rerun trains and evaluates nothing and prints the same table
    again = demo.run_demo(out, seed=5, scale=0.01, vocab_size=600, sizes=TINY_CYCLE)
    assert again.life_cycle.trained == [] and again.life_cycle.evaluated == []
    assert again.life_cycle.table() == cycle.table()
