"""The generative runner with a fake model, `megaevo eval --predictions` end to end, and task errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from megaevo.cli import main  # noqa: E402
from megaevo.eval.runner import run_eval  # noqa: E402
from megaevo.eval.tasks import EvalError, resolve_task  # noqa: E402

EVALS = Path(__file__).resolve().parents[2] / "shared" / "evolm-evals"  # ../shared beside the repository


@dataclass
class FakeCompletion:
    prompt_token_ids: list
    token_ids: list
    text: str
    logprobs: list
    finish_reason: str = "stop"


class FakeModel:
    """Answers each prompt deterministically: problem i (by its number in the prompt) gets \\boxed{i*2}
    except that every third one is wrong; with n > 1, sample j adds j to the wrong ones."""

    class args:
        max_seq_len = 1024

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        out = []
        for prompt in prompts:
            i = int(prompt.split("#")[1].split()[0])
            comps = []
            for j in range(params.n):
                value = i * 2 if i % 3 or j % 2 else i * 2 + 1
                comps.append(FakeCompletion([1, 2], [5] * (j + 3), f"Work.\nThe answer is \\boxed{{{value}}}", []))
            out.append(comps)
        return out


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "Toy.jsonl"
    rows = [{"id": f"t{i}", "problem": f"What is twice #{i} ?", "gt_solution": f"so \\boxed{{{2 * i}}}",
             "gt_answer": None} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_runner_with_fake_model_writes_results(task_file, tmp_path):
    model = FakeModel()
    out = tmp_path / "out"
    results = run_eval([str(task_file)], out, model=model, batch_size=4, progress=False, workers=0)
    assert [len(p) for p, _ in model.calls] == [4, 2]
    params = model.calls[0][1]
    assert params.temperature == 0 and params.repetition_penalty == 1.1 and params.max_length == 1024
    assert params.stop == ("Human", "Human:", "Assistant", "Assistant:") and not params.add_bos
    assert model.calls[0][0][0] == "Human: What is twice #0 ?\nAssistant:"
    metrics = results["tasks"]["Toy"]
    assert metrics["n"] == 6 and metrics["accuracy"] == pytest.approx(4 / 6)  # i = 0 and 3 are wrong
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"]["Toy"]["accuracy"] == pytest.approx(4 / 6)
    rows = [json.loads(line) for line in (out / "samples" / "Toy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(6)]
    assert rows[1]["answers"] == ["2"] and rows[1]["correct"] == [True] and rows[0]["correct"] == [False]
    assert rows[1]["prompt"].startswith("Human: ") and rows[1]["finish_reasons"] == ["stop"]


def test_runner_sampled_metrics(task_file, tmp_path):
    results = run_eval([str(task_file)], tmp_path / "o", model=FakeModel(), samples=4, progress=False, workers=0)
    m = results["tasks"]["Toy"]
    # i = 0, 3: samples 1 and 3 right (c = 2 of 4); others all right.
    assert m["pass@1"] == pytest.approx((4 + 2 * 0.5) / 6) and m["pass@4"] == 1.0
    assert m["maj@4"] == pytest.approx(4 / 6)  # a 2-2 tie goes to the first cluster (the wrong answer)


def test_predictions_end_to_end(tmp_path, capsys):
    if not EVALS.is_dir():
        pytest.skip("EvoLM eval copies not present")
    rows = [json.loads(line) for line in (EVALS / "GSM8KPlatinum.jsonl").read_text().splitlines()[:8]]
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w") as f:
        for k, r in enumerate(rows):
            f.write(json.dumps({"id": r["id"], "completion": r["gt_solution"] if k % 2 == 0 else "I give up."}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--predictions", str(preds), "--tasks", "GSM8KPlatinum", "--data-dir", str(EVALS),
                 "--out", str(out), "--quiet", "--workers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["tasks"]["GSM8KPlatinum"]
    assert m["n"] == 8 and m["accuracy"] == 0.5 and m["no_answer"] == 0.5 and m["timeouts"] == 0
    samples = [json.loads(line) for line in (out / "samples" / "GSM8KPlatinum.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and samples[0]["correct"] == [True] and samples[1]["answers"] == [None]
    assert "GSM8KPlatinum" in capsys.readouterr().out


def test_predictions_several_sets_report_domain_averages(tmp_path):
    if not EVALS.is_dir():
        pytest.skip("EvoLM eval copies not present")
    from megaevo.eval.runner import averages

    avg = averages({"MATHLevel1": {"n": 2, "accuracy": 1.0}, "GSM8KPlatinum": {"n": 2, "accuracy": 0.5},
                    "CRUXEval": {"n": 2, "accuracy": 0.25}}, {"MATHLevel1": "id", "GSM8KPlatinum": "id", "CRUXEval": "ood"})
    assert avg["id_avg"]["accuracy"] == 0.75 and avg["ood_avg"]["accuracy"] == 0.25
    assert averages({"MATHLevel1": {"accuracy": 1.0}}, {"MATHLevel1": "id"}) == {}


def test_unknown_task_lists_known(tmp_path, capsys):
    (tmp_path / "MATHLevel1.jsonl").write_text("{}\n")
    (tmp_path / "Mine.jsonl").write_text("{}\n")
    with pytest.raises(EvalError, match="unknown task 'Nope'.*MATHLevel1, Mine"):
        resolve_task("Nope", tmp_path)
    assert main(["eval", "--predictions", "x.jsonl", "--tasks", "Nope", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "MATHLevel1, Mine" in capsys.readouterr().err


def test_bad_task_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "problem": "p", "gt_solution": "\\\\boxed{1}", "gt_answer": null}\n{oops\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: not valid JSON"):
        resolve_task(str(bad))
    bad.write_text('{"id": 1, "problem": "p"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:1: missing field\(s\) gt_answer or gt_solution"):
        resolve_task(str(bad))
    with pytest.raises(EvalError, match="expected rg:NAME"):
        resolve_task("rg:")
    with pytest.raises(EvalError, match="unknown reasoning-gym task 'nope'"):
        resolve_task("rg:nope")


def test_reasoning_gym_task_scored_by_its_own_scorer(tmp_path):
    pytest.importorskip("reasoning_gym")
    task = resolve_task("rg:basic_arithmetic:6:3")
    assert task.name == "rg_basic_arithmetic" and len(task.problems) == 6
    preds = tmp_path / "p.jsonl"
    with open(preds, "w") as f:
        for k, p in enumerate(task.problems):
            answer = p.gold["answer"] if k < 3 else "nonsense"
            f.write(json.dumps({"id": p.id, "completions": [f"The answer is {answer}", "\\boxed{0.123}"]}) + "\n")
    res = run_eval(["rg:basic_arithmetic:6:3"], tmp_path / "o", predictions=str(preds), progress=False, workers=0)
    m = res["tasks"]["rg_basic_arithmetic"]
    assert m["n"] == 6 and m["pass@2"] == 0.5 and m["pass@1"] == 0.25 and "score" in m and "maj@2" in m
