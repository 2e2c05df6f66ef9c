"""`megaevo eval`: run tasks on a model (or grade predictions made elsewhere), write results and samples.

``OUT/results.json`` = ``{"model": ..., "settings": {...}, "tasks": {NAME: {"n": ..., METRIC: value}}}``
with ``id_avg`` / ``ood_avg`` (each metric's mean over EvoLM's in-domain / out-of-domain sets) when
several of those sets ran; ``OUT/samples/NAME.jsonl`` holds one line per problem. Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from megaevo.eval.base import EvalError, Problem, read_jsonl
from megaevo.eval.generative import (MAX_LENGTH, GenerativeTask, grade_completions, prompt_template, rank,
                                     render_problem)
from megaevo.eval.tasks import resolve_task


def _load_model(path: str, tp: int | None, device: str | None, dtype: str | None, tasks: Sequence = ()):
    import megaevo

    if not hasattr(megaevo, "load"):
        raise EvalError("evaluating a model needs megaevo.load (megaevo.inference), which this installation lacks")
    text = any(getattr(t, "encodes_text", True) for t in tasks)  # all but loss tasks (LossTask) encode text
    return megaevo.load(path, tp=tp, device=device, dtype=dtype, require_tokenizer=text)


def read_predictions(path: str | Path, task: GenerativeTask) -> tuple[list[Problem], list[list[str]]]:
    """The task's problems named in a predictions jsonl (``id`` and ``completion`` or ``completions``),
    in the file's order, with their completions."""
    by_id = {str(p.id): p for p in task.problems}
    problems, completions = [], []
    for line_no, row in read_jsonl(Path(path)):
        where = f"{path}:{line_no}"
        if "id" not in row:
            raise EvalError(f"{where}: missing field id")
        if "completions" in row:
            c = row["completions"]
            if not isinstance(c, list) or not c or not all(isinstance(x, str) for x in c):
                raise EvalError(f"{where}: completions must be a non-empty list of strings")
        elif "completion" in row:
            if not isinstance(row["completion"], str):
                raise EvalError(f"{where}: completion must be a string")
            c = [row["completion"]]
        else:
            raise EvalError(f"{where}: missing field completion (or completions)")
        problem = by_id.get(str(row["id"]))
        if problem is None:
            raise EvalError(f"{where}: id {row['id']!r} is not a problem of task {task.name}")
        problems.append(problem)
        completions.append(c)
    if not problems:
        raise EvalError(f"{path}: no predictions in the file")
    if len({len(c) for c in completions}) > 1:
        raise EvalError(f"{path}: every problem needs the same number of completions "
                        f"(found {sorted({len(c) for c in completions})})")
    return problems, completions


def averages(tasks: dict[str, dict], domains: dict[str, str | None]) -> dict[str, dict]:
    """``id_avg``/``ood_avg``: each metric's mean over the tasks of that domain (when two or more of
    EvoLM's sets ran)."""
    ran = [n for n, d in domains.items() if d]
    if len(ran) < 2:
        return {}
    out = {}
    for domain in ("id", "ood"):
        names = [n for n in ran if domains[n] == domain]
        if not names:
            continue
        metrics = [k for k, v in tasks[names[0]].items() if isinstance(v, float) and k not in ("no_answer",)]
        out[f"{domain}_avg"] = {"tasks": len(names), **{
            k: sum(tasks[n][k] for n in names) / len(names) for k in metrics if all(k in tasks[n] for n in names)}}
    return out


def _unique(name: str, taken: dict) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def format_table(results: dict) -> str:
    rows = [(name, m) for name, m in results["tasks"].items()]
    rows += [(k, v) for k, v in results.items() if k.endswith("_avg")]
    lines = []
    for name, m in rows:
        cells = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
                 if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
        lines.append(f"{name:<20} " + "  ".join(cells))
    return "\n".join(lines)


def run_eval(tasks: Sequence[str], out: str | Path, load: str | None = None, predictions: str | None = None,
             data_dir: str | None = None, limit: int | None = None, batch_size: int = 8, samples: int = 0,
             template: str = "evolm", tp: int | None = None, device: str | None = None, dtype: str | None = None,
             max_length: int = MAX_LENGTH, seed: int = 0, workers: int | None = None, progress: bool = True,
             model: Any = None) -> dict:
    """Evaluate ``tasks`` on the model at ``load`` (or ``model``), or grade the ``predictions`` file for
    one task; write ``out``/results.json and ``out``/samples/*.jsonl (rank 0) and return the results."""
    if not tasks:
        raise EvalError("no tasks given")
    if samples < 0 or (limit is not None and limit < 1):
        raise EvalError("--samples must be >= 0 and --limit >= 1")
    if predictions is not None and (load is not None or model is not None):
        raise EvalError("give either --load (generate) or --predictions (grade given completions), not both")
    if predictions is None and load is None and model is None:
        raise EvalError("give --load CKPT_OR_HF_DIR to evaluate a model, or --predictions FILE to grade completions")
    if predictions is not None and len(tasks) != 1:
        raise EvalError(f"--predictions grades one task; got {len(tasks)}: {', '.join(tasks)}")
    resolved = [resolve_task(spec, data_dir, limit=limit) for spec in tasks]  # every spec checked before a model loads
    results: dict = {"model": load if predictions is None else None,
                     "settings": {"template": template, "samples": samples, "limit": limit, "max_length": max_length},
                     "tasks": {}}
    domains, all_samples = {}, {}
    if predictions is not None:
        task = resolved[0]
        if not isinstance(task, GenerativeTask):
            raise EvalError(f"--predictions needs a generative task; {tasks[0]} is not one")
        problems, completions = read_predictions(predictions, task)
        results["predictions"] = str(predictions)
        sampled = len(completions[0]) > 1
        chat = prompt_template(template)
        out_ = grade_completions(task, completions, sampled, prompts=[render_problem(p.problem, chat) for p in problems],
                                 problems=problems, workers=workers, progress=progress)
        name = task.name
        results["tasks"][name], all_samples[name], domains[name] = out_["metrics"], out_["samples"], task.domain
    else:
        if model is None:
            model = _load_model(load, tp, device, dtype, resolved)
        for task in resolved:
            if isinstance(task, GenerativeTask):
                res = task.run(model, batch_size=batch_size, progress=progress, samples=samples, template=template,
                               max_length=max_length, seed=seed, workers=workers)
            else:
                res = task.run(model, batch_size=batch_size, progress=progress)
            name = _unique(task.name, results["tasks"])
            results["tasks"][name], all_samples[name] = res["metrics"], res["samples"]
            domains[name] = getattr(task, "domain", None)
    results.update(averages(results["tasks"], domains))
    if rank() == 0:
        write_results(results, all_samples, out)
    return results


def write_results(results: dict, samples: dict[str, list[dict]], out: str | Path) -> None:
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, rows in samples.items():
        with open(out / "samples" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out / "results.json")
