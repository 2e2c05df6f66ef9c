"""Prompt templates for generative evaluation: the chat templates of :mod:`megaevo.data.templates`, so that
evaluation prompts are rendered by the same code that lays out SFT conversations.

- ``evolm``: EvoLM's SFT template (LLaMA-Factory ``default``), ``Human: {problem}\\nAssistant:``; no BOS,
  no system prompt.
- ``chat``: megaevo's chat tokens, ``<|user|>{problem}<|end|><|assistant|>``.
- ``raw``: the problem as it is.

``TEMPLATES`` maps each name to its one-turn prompt (``{problem}`` marks the problem), ``STOP_STRINGS``
to the strings where a completion ends, and ``render(problem, template)`` gives the prompt.
"""
from __future__ import annotations

from megaevo.data.templates import PROMPT_FORMATS as TEMPLATES
from megaevo.data.templates import STOP_STRINGS, render

__all__ = ["TEMPLATES", "STOP_STRINGS", "render"]
