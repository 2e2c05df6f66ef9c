"""Answer extraction, equivalence, the grading pool (timeouts) and the metrics of generative evaluation."""
from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from megaevo.eval.answers import extract_answer  # noqa: E402
from megaevo.eval.grading import Grader, GradingPool, Job, choice_label, grade_job, literal_equal, math_equal  # noqa: E402
from megaevo.eval.metrics import pass_at_k, summarize  # noqa: E402
from megaevo.eval.tasks import EVOLM_SETS, load_generative  # noqa: E402

EVALS = Path(__file__).resolve().parents[2] / "shared" / "evolm-evals"  # ../shared beside the repository
SUBSET = 50


@pytest.mark.parametrize("text, bare, expected", [
    (r"so $x = \boxed{\frac{1}{2}}$ and finally \boxed{\frac{\sqrt{3}}{2}}.", False, r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\{1, \{2\}\}}", False, r"\{1, \{2\}\}"),
    (r"\boxed{3} then \boxed{unclosed", False, "3"),
    (r"\fbox{7}", False, "7"),
    ("The answer is: 42.", False, "42"),
    ("I think the answer is 3.5 dollars. Next we check.", False, "3.5 dollars"),
    ("the answer is 5, then the Answer is $-2$.\nmore", False, "-2"),
    ("Step 1 ...\n#### 1,234", False, "1,234"),
    (r"#### 5 and the answer is 6 \boxed{7}", False, "7"),
    ("no marker here\n12", False, None),
    ("no marker here\n12", True, "12"),
    ("['a', None]", True, "['a', None]"),
    ("", True, None),
])
def test_extract_answer(text, bare, expected):
    assert extract_answer(text, bare=bare) == expected


@pytest.mark.parametrize("a, b, equal", [
    (r"\frac{1}{2}", "0.5", True),
    ("2x+1", "1+2x", True),
    (r"\frac{9}{7}", "9/7", True),
    ("8,696", "8696", True),
    ("7.20", "7.2", True),
    (r"\text{nonlinear}", "nonlinear", True),
    ("3", "4", False),
    ("2x+1", "2x-1", False),
    (r"\frac{1}{3}", "0.5", False),
    ("yes", "no", False),
])
def test_math_equal(a, b, equal):
    assert math_equal(a, b) is equal
    assert math_equal(b, a) is equal


def test_choice_and_literal():
    labels = ("True", "False", "Uncertain")
    assert choice_label("The statement is false.", labels) == "False"
    assert choice_label("Yes", labels) == "True"
    assert choice_label("unknown", labels) == "Uncertain"
    assert choice_label("maybe", labels) is None
    assert literal_equal("['a',None]", "['a', None]")
    assert literal_equal("{'x': 1, 'y': 2}", "{'y': 2, 'x': 1}")
    assert not literal_equal("1", "True") and not literal_equal("1", "1.0")
    assert literal_equal(" not a literal", "not a literal") and not literal_equal("abc", "abd")


def slow_equal(a: str, b: str) -> bool:  # top level: the spawned grading workers import it by name
    time.sleep(30)
    return True


def test_timeout_counts_as_wrong():
    """slow_equal would say "equal" after 30 s: wrong and one timeout means the 0.5 s limit cut it off."""
    with GradingPool(workers=1, timeout=0.5, equal_fn=slow_equal) as pool:
        graded = pool.grade(Grader("math"), [Job("1", [r"\boxed{1}"])])
    assert graded[0].correct == [False] and graded[0].timeouts == 1


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=2) as p:
        yield p


def _accuracy(graded) -> float:
    return summarize([g.correct for g in graded])["accuracy"]


@pytest.mark.skipif(not EVALS.is_dir(), reason="EvoLM eval copies not present")
@pytest.mark.parametrize("name", list(EVOLM_SETS))
def test_gold_solutions_score_and_shifted_do_not(name, pool):
    # Measured on the first 50 problems (and on whole sets): gold 1.000 everywhere; shifted <= 0.02 for the
    # math, literal and TabMWP sets, chance level for the label sets (BoardgameQA 0.38, StrategyQA 0.60).
    task = load_generative(EVALS / f"{name}.jsonl", limit=SUBSET)
    ps = task.problems
    gold = pool.grade(task.grader, [Job(p.gold, [p.solution]) for p in ps])
    assert _accuracy(gold) >= 0.98, [(p.id, g.answers) for p, g in zip(ps, gold) if not g.correct]
    shifted = pool.grade(task.grader, [Job(p.gold, [ps[(i + 1) % len(ps)].solution]) for i, p in enumerate(ps)])
    if task.grader.kind == "choice":
        assert _accuracy(shifted) <= 0.7
        other = {lab: next(x for x in task.grader.labels if x != lab) for lab in task.grader.labels}
        wrong = pool.grade(task.grader, [Job(p.gold, [f"So the answer is {other[p.gold]}."]) for p in ps])
        assert _accuracy(wrong) == 0.0
    else:
        assert _accuracy(shifted) <= 0.05


def test_pass_at_k_matches_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(flags, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_sampled_metrics_against_brute_force():
    grader = Grader("literal", bare=True)
    problems = [("1", ["1", "2", "1", "3"]), ("'a'", ["'b'", "'b'", "'a'", "'c'"]), ("[]", ["x", "y", "z", "[]"]),
                ("5", ["6", "7", "6", "8"])]
    graded = [grade_job(grader, Job(gold, comps), majority=True) for gold, comps in problems]
    metrics = summarize([g.correct for g in graded], majority=[g.majority_correct for g in graded], sampled=True)
    correct = [[literal_equal(c, gold) for c in comps] for gold, comps in problems]
    assert metrics["pass@1"] == pytest.approx(sum(sum(c) / len(c) for c in correct) / len(correct))
    assert metrics["pass@4"] == pytest.approx(sum(any(c) for c in correct) / len(correct))
    maj = [Counter(comps).most_common(1)[0][0] == gold for gold, comps in problems]  # ties: first seen wins
    assert metrics["maj@4"] == pytest.approx(sum(maj) / len(maj)) == 0.25
    assert [g.majority_answer for g in graded] == ["1", "'b'", "x", "6"]


def test_majority_clusters_by_equivalence():
    # 0.5 and \frac{1}{2} form one cluster of two, larger than 3 alone; the vote reads the last 128 characters.
    comps = ["x" * 500 + r"\boxed{3}", r"\boxed{0.5}", r"so \boxed{\frac{1}{2}}", r"\boxed{3}" + "y" * 200]
    g = grade_job(Grader("math"), Job("1/2", comps), majority=True)
    assert g.correct == [False, True, True, False]
    assert g.majority_answer == "0.5" and g.majority_correct
