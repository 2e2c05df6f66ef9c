"""The `sft` section (supervised fine-tuning, `stage: sft`) and its checks, with those of `train.epochs`,
the length SFT counts in epochs of its conversations (`cfg` below is a megaevo.config.Config)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:  # annotations only: the root imports this module
    from megaevo.config.root import Config


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`stage: sft`, megaevo.stages.sft).

    `packing`: several conversations per sequence of seq_len tokens, attention kept within each
    conversation; false: one conversation per sequence, padded to seq_len. `cutoff`: the most tokens
    of a conversation (null: seq_len; at most seq_len); longer ones are cut to it with `truncate`,
    else dropped. `loss_normalization`: `global_tokens` divides the loss summed over the step's loss
    tokens by their number (every micro-batch and DP rank); `micro_batch_mean` averages each
    micro-batch's mean over its own loss tokens (a micro-batch without loss tokens is left out).
    """

    packing: bool = True
    cutoff: Optional[int] = None
    truncate: bool = True
    loss_normalization: Literal["global_tokens", "micro_batch_mean"] = "global_tokens"



def epochs_errors(cfg: "Config") -> list[str]:
    """`train.epochs`: a positive number, for the stage that counts epochs."""
    epochs = cfg.train.epochs
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        return [f"train.epochs={epochs} must be a positive number (or null to count train.iters)"]
    if epochs is not None and cfg.stage == "pretrain":
        return ["train.epochs counts epochs of SFT conversations (stage=sft): pre-training runs "
                "train.iters iterations; set train.epochs=null"]
    return []


def sft_errors(cfg: "Config") -> list[str]:
    """The `sft` section with `stage: sft`."""
    cutoff = cfg.sft.cutoff
    if cfg.stage == "sft" and cutoff is not None and not 2 <= cutoff <= cfg.seq_len:
        return [f"sft.cutoff={cutoff} must be between 2 and data.seq_len={cfg.seq_len}: a conversation has to "
                f"fit one sequence; lower sft.cutoff (null means data.seq_len) or raise data.seq_len"]
    return []
