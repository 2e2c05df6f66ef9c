"""RL prompts and rewards (megaevo.stages.rl.rewards): known scores on fixed completions for an EvoLM set and
a reasoning-gym task, truncation, grading timeouts, custom rewards by dotted path."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from megaevo.errors import UserError
from megaevo.eval.grading import GradingPool
from megaevo.eval.tasks import load_reasoning_gym
from megaevo.stages.rl.rewards import (
    CustomReward,
    RewardResult,
    VerifiableReward,
    build_reward,
    load_callable,
    load_prompts,
)

EVALS = Path(__file__).resolve().parents[2] / "shared" / "evolm-evals"  # ../shared beside the repository
MATH1 = EVALS / "MATHLevel1.jsonl"
needs_evals = pytest.mark.skipif(not MATH1.is_file(), reason="EvoLM eval copies not present")


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=1) as p:
        yield p


@pytest.fixture(scope="module")
def math_prompts():
    return load_prompts(str(MATH1), limit=3)


@needs_evals
def test_load_prompts_evolm(math_prompts):
    first = json.loads(MATH1.read_text().splitlines()[0])
    assert len(math_prompts) == 3
    rec = math_prompts[0]
    assert rec["id"] == first["id"] and rec["problem"] == first["problem"]
    assert rec["answer"] == "10"  # gt_answer is null: the \boxed{} of gt_solution
    assert rec["grader"] == {"kind": "math", "labels": [], "bare": False} and rec["source"] == "MATHLevel1"
    by_name = load_prompts("MATHLevel1", data_dir=str(EVALS), limit=1)
    assert by_name[0]["answer"] == "10"


@needs_evals
def test_evolm_rewards(pool, math_prompts):
    rec = math_prompts[0]  # gold 10
    completions = [r"The difference is 36 - 26, so the answer is $\boxed{10}$.", r"So $\boxed{11}$.",
                   r"It is $\boxed{\frac{20}{2}}$", "no answer stated here"]
    with VerifiableReward(pool=pool) as reward:
        out = reward([rec] * 4, completions, [False] * 4)
    assert isinstance(out, RewardResult)
    assert out.scores == [1.0, 0.0, 1.0, 0.0] and out.correct == [True, False, True, False]
    assert out.answers == ["10", "11", r"\frac{20}{2}", None] and out.timeouts == 0


def test_reasoning_gym_rewards():
    prompts = load_prompts("rg:chain_sum:4:0")
    assert [p["id"] for p in prompts] == [f"chain_sum-{i}" for i in range(4)]
    entry = prompts[0]["entry"]
    assert prompts[0]["problem"] == entry["question"] and prompts[0]["task"] == "chain_sum"
    gold = entry["answer"]
    completions = [rf"... = \boxed{{{gold}}}", f"The answer is {int(gold) + 1}.", gold, ""]
    with VerifiableReward(workers=0) as reward:
        out = reward([prompts[0]] * 4, completions, [False] * 4)
    assert out.scores == [1.0, 0.0, 1.0, 0.0] and out.correct == [True, False, True, False]
    # the same scores as evaluation gives
    task = load_reasoning_gym("rg:chain_sum:4:0")
    assert out.scores == [task.grader.score_fn(a, entry) for a in out.answers]


@needs_evals
def test_mixed_sources_and_truncation(pool, math_prompts):
    rg = load_prompts("rg:chain_sum:2:0")
    prompts = [math_prompts[0], rg[1], math_prompts[0], rg[1]]
    completions = [r"\boxed{10}", rf"\boxed{{{rg[1]['entry']['answer']}}}"] * 2
    truncated = [False, False, True, True]
    graded = VerifiableReward(pool=pool)(prompts, completions, truncated)
    assert graded.scores == [1.0] * 4 and graded.correct == [True] * 4  # None: truncated graded as usual
    penalised = VerifiableReward(truncated_reward=-0.5, pool=pool)(prompts, completions, truncated)
    assert penalised.scores == [1.0, 1.0, -0.5, -0.5] and penalised.correct == [True, True, False, False]
    assert penalised.answers[2:] == [None, None]  # not graded
    with pytest.raises(ValueError, match="one of each"):
        VerifiableReward(pool=pool)(prompts, completions, truncated[:3])


def slow_equal(a: str, b: str) -> bool:
    time.sleep(30)
    return True


def test_grading_timeout_scores_zero_and_is_counted():
    """slow_equal would say "equal" after 30 s: 0 and one timeout means the limit cut it off. Graded in this
    process (workers=0, the main thread: the same per-comparison alarm as in the workers, without a spawn;
    the worker-process timeout itself is tested with the grading pool)."""
    prompt = {"id": "p", "problem": "1 + 0?", "answer": "1", "grader": {"kind": "math"}}
    with VerifiableReward(workers=0, timeout=0.3, equal_fn=slow_equal) as reward:
        out = reward([prompt], [r"\boxed{1}"], [False])
    assert out.scores == [0.0] and out.correct == [False] and out.timeouts == 1


CUSTOM = '''
def reward(prompt, completion):
    return 1.0 if prompt["answer"] in completion else 0.25

def flag(prompt, completion):
    return completion.endswith("!")

def bad(prompt, completion):
    return "high"

NOT_CALLABLE = 3
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "rl_custom_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_custom_rewards"


def test_custom_reward_by_dotted_path(custom_module):
    prompts = [{"id": 1, "problem": "?", "answer": "42"}] * 3
    completions = ["it is 42", "it is 41", "it is 42"]
    for path in (f"{custom_module}:reward", f"{custom_module}.reward"):
        out = build_reward(path, truncated_reward=-1.0)(prompts, completions, [False, False, True])
        assert isinstance(out, RewardResult)
        assert out.scores == [1.0, 0.25, -1.0] and out.correct == [True, False, False] and out.timeouts == 0
    flags = CustomReward(f"{custom_module}:flag")(prompts[:2], ["yes!", "no"], [False, False])
    assert flags.scores == [1.0, 0.0]
    with pytest.raises(UserError, match="must return a number"):
        CustomReward(f"{custom_module}:bad")(prompts[:1], ["x"], [False])
    assert isinstance(build_reward(None), VerifiableReward) and isinstance(build_reward("verifiable"), VerifiableReward)


@pytest.mark.parametrize("path,match", [
    ("no_such_module_for_rl:reward", "cannot import module 'no_such_module_for_rl'"),
    ("rl_custom_rewards:missing", "has no attribute 'missing'"),
    ("rl_custom_rewards.NOT_CALLABLE", "is a int, not a function"),
    ("reward", "expected package.module:function"),
    ("", "expected a dotted path"),
])
def test_bad_dotted_path_is_one_clear_line(custom_module, path, match):
    with pytest.raises(UserError, match=match) as info:
        load_callable(path)
    assert "\n" not in str(info.value)


def test_load_prompts_rejects_other_task_kinds(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "2 + 2 =", "choices": ["3", "4"], "gold": 1}) + "\n")
    with pytest.raises(UserError, match="not a set of problems with answers"):
        load_prompts(str(mc))
    with pytest.raises(UserError, match="unknown reasoning-gym task"):
        load_prompts("rg:no_such_task")


def test_prompts_need_a_problem_and_gt_answer_or_gt_solution(tmp_path):
    """gt_answer alone, gt_solution alone (its stated answer), no id (the line number): all accepted and graded
    against that answer."""
    rows = [{"id": "a", "problem": "1 + 1?", "gt_answer": "2"},
            {"id": "s", "problem": "2 + 2?", "gt_solution": r"2 + 2 = \boxed{4}"},
            {"problem": "3 + 3?", "gt_answer": "6", "gt_solution": None}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(str(path))
    assert [(p["id"], p["answer"]) for p in prompts] == [("a", "2"), ("s", "4"), (3, "6")]
    with VerifiableReward(workers=0) as reward:
        out = reward(prompts * 2, [r"\boxed{2}", r"\boxed{4}", r"\boxed{6}", r"\boxed{3}", r"\boxed{5}", "7"],
                     [False] * 6)
    assert out.scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    path.write_text(json.dumps({"id": "x", "problem": "?"}) + "\n")
    with pytest.raises(UserError, match=r"mixed.jsonl:1: missing field\(s\) gt_answer or gt_solution"):
        load_prompts(str(path))


def test_a_missing_prompt_set_names_the_rl_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGAEVO_EVAL_DIR", raising=False)
    (tmp_path / "Mine.jsonl").write_text(json.dumps({"problem": "1 + 1?", "gt_answer": "2"}) + "\n")
    cases = [(str(tmp_path / "nope.jsonl"), None, rf"^rl\.prompts: {tmp_path}/nope\.jsonl: no such file$"),
             ("nope", None, r"^rl\.prompts: 'nope' is not a file \(a set's name is looked up as NAME\.jsonl in "
                            r"rl\.prompts_data_dir or \$MEGAEVO_EVAL_DIR, and neither is set\)$"),
             ("nope", str(tmp_path), rf"^rl\.prompts: 'nope' is not a file, and rl\.prompts_data_dir={tmp_path} has "
                                     rf"no nope\.jsonl \(it has Mine\)$")]
    for spec, data_dir, match in cases:
        with pytest.raises(UserError, match=match) as info:
            load_prompts(spec, data_dir=data_dir)
        assert "--data-dir" not in str(info.value)
    assert load_prompts("Mine", data_dir=str(tmp_path))[0]["answer"] == "2"
    monkeypatch.setenv("MEGAEVO_EVAL_DIR", str(tmp_path))
    with pytest.raises(UserError, match=rf"\$MEGAEVO_EVAL_DIR={tmp_path} has no nope\.jsonl"):
        load_prompts("nope")
