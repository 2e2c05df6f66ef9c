"""Reinforcement learning with verifiable rewards (PPO and GRPO).

:mod:`~megaevo.stages.rl.algorithms` holds the arithmetic as pure tensor functions (advantages, KL
estimators, policy and value losses, loss aggregation as the engine's ``(loss_sum, count)``);
:mod:`~megaevo.stages.rl.rewards` the prompt records and the reward functions that score completions;
:mod:`~megaevo.stages.rl.rollout` the prompt stream and sampling with the live policy;
:mod:`~megaevo.stages.rl.critic` PPO's value model (a second train unit); :mod:`~megaevo.stages.rl.stage` the
stage the engine runs (``stage: rl``, registered in :mod:`megaevo.stages`).
"""
from megaevo.stages.rl.algorithms import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    SumCount,
    aggregate,
    aggregation,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    policy_loss,
    token_level_rewards,
    token_mult_prob_error,
    truncated_importance_weights,
    value_loss,
)
from megaevo.stages.rl.rewards import (
    CustomReward,
    RewardFunction,
    RewardResult,
    VerifiableReward,
    build_reward,
    load_callable,
    load_prompts,
)

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "CustomReward",
    "RewardFunction",
    "RewardResult",
    "SumCount",
    "VerifiableReward",
    "aggregate",
    "aggregation",
    "build_reward",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "load_callable",
    "load_prompts",
    "masked_whiten",
    "policy_loss",
    "token_level_rewards",
    "token_mult_prob_error",
    "truncated_importance_weights",
    "value_loss",
]
