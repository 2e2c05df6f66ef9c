"""Evaluation: generative tasks (EvoLM's downstream sets, reasoning-gym), answer extraction and grading,
metrics, and the runner behind `megaevo eval`. Multiple choice, loss and the lm-eval adapter live beside."""
from megaevo.eval.answers import extract_answer
from megaevo.eval.grading import Grader, GradingPool, math_equal
from megaevo.eval.metrics import pass_at_k, summarize
from megaevo.eval.tasks import EvalError, GenerativeTask, register, resolve_task

__all__ = ["EvalError", "GenerativeTask", "Grader", "GradingPool", "extract_answer", "math_equal", "pass_at_k",
           "register", "resolve_task", "summarize"]
