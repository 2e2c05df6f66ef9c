"""Named model shapes: the EvoLM release (Llama family, GQA) and a tiny model for CPU runs.

`model.preset: evolm-1b` in a config (or `ModelArgs.from_preset("evolm-1b")`) fills these fields;
fields given beside the preset win.
"""
from __future__ import annotations

from typing import Any

from megaevo.configio import ConfigError, did_you_mean

_EVOLM = dict(num_heads=32, num_kv_heads=4, vocab_size=32000, max_seq_len=2048,
              rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "evolm-0.5b": dict(_EVOLM, num_layers=20, hidden_size=1536, ffn_hidden_size=3216),
    "evolm-1b": dict(_EVOLM, num_layers=22, hidden_size=2048, ffn_hidden_size=4896),
    "evolm-2b": dict(_EVOLM, num_layers=26, hidden_size=2816, ffn_hidden_size=6180),
    "evolm-4b": dict(_EVOLM, num_layers=28, hidden_size=4096, ffn_hidden_size=7792),
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_heads=4, num_kv_heads=2,
                 vocab_size=4096, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                 tie_embeddings=False),
}


def preset_values(name: str, key: str = "model.preset") -> dict[str, Any]:
    """The fields of model preset `name` (a copy); ConfigError naming `key` if there is none."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{key}: unknown model preset {name!r}{did_you_mean(name, PRESETS)}; "
                          f"known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
