"""Prompt templates for generative evaluation.

- ``evolm``: EvoLM's SFT template (LLaMA-Factory ``default``), ``Human: {problem}\\nAssistant:``; no BOS,
  no system prompt.
- ``chat``: megaevo's chat tokens, ``<|user|>{problem}<|end|><|assistant|>``.
- ``raw``: the problem as it is.
"""
from __future__ import annotations

from megaevo.errors import UserError

TEMPLATES = {
    "evolm": "Human: {problem}\nAssistant:",
    "chat": "<|user|>{problem}<|end|><|assistant|>",
    "raw": "{problem}",
}

# Where a completion under each template ends: the next turn's markers.
STOP_STRINGS = {
    "evolm": ("Human", "Human:", "Assistant", "Assistant:"),
    "chat": ("<|user|>", "<|end|>", "<|assistant|>"),
    "raw": (),
}


def render(problem: str, template: str = "evolm") -> str:
    """``problem`` in ``template``'s prompt."""
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].replace("{problem}", problem)
