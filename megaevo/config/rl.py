"""The `rl` section (reinforcement learning, `stage: rl`) with PPO's critic `rl.critic`, its checks, and
the values it derives: the rollout batch that is the run's global batch, and the critic's warmup in
iterations (`cfg` below is a megaevo.config.Config)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from megaevo.data.templates import TEMPLATE_NAMES

if TYPE_CHECKING:  # annotations only: the root imports this module
    from megaevo.config.root import Config


@dataclass
class RLCriticConfig:
    """PPO's critic (`rl.critic`): the actor's architecture with a fresh scalar value head.

    `load`: the checkpoint its body starts from (null: the checkpoint the actor started from, i.e.
    `checkpoint.load`; without one, the actor's initial weights). Its AdamW takes `lr` and `min_lr`
    with the actor's `optim.schedule`, betas and eps; `warmup` / `warmup_fraction` / `weight_decay` /
    `clip_grad` left null take the actor's (`optim.*`); `warmup_fraction`, when set, replaces `warmup`
    by that share of the run's iterations, as the actor's does (a resolved config holds the count in
    `warmup`). `value_clip`: the value loss's clip range around the rollout's values (null: no clip)."""

    load: Optional[str] = None
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup: Optional[int] = None
    warmup_fraction: Optional[float] = None
    weight_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    value_clip: Optional[float] = 0.5


@dataclass
class RLConfig:
    """Reinforcement learning with verifiable rewards (`stage: rl`, megaevo.stages.rl).

    One iteration is one rollout batch: `prompts_per_step` prompts (from `prompts`: EvoLM-format jsonl
    sets, each record a `problem` with `gt_answer` or `gt_solution`, or `rg:NAME[:COUNT[:SEED]]`; a set's
    name is looked up in `prompts_data_dir`; shuffled by train.seed each pass over the set; prompts longer
    than `max_prompt_len` tokens are left out, null: what fits, model.max_seq_len - `max_new_tokens`)
    rendered with `template`, `n` samples each of at most
    `max_new_tokens` tokens at `temperature` / `top_p` (stopping at EOS or a `stop` string; null: the
    template's own, e.g. `Human:` for evolm, as in evaluation), scored by
    `reward` (`verifiable`: the evaluation graders, `grader_timeout` seconds per comparison; or a dotted
    path to `fn(prompt: dict, completion: str) -> float`; a truncated response gets `truncated_reward`
    when set), then `epochs` passes over `mini_batches` mini-batches, one optimizer update each.
    `train.global_batch_size` is derived: prompts_per_step x n samples; `train.micro_batch_size` is the
    samples per micro-batch of the training forward.

    `algorithm`: `grpo` (group-relative advantages; `normalize_std` false is Dr. GRPO) or `ppo` (GAE with
    `gamma`, `lam` over a critic, `rl.critic`; `whiten_advantages` over the global batch). The policy loss
    is PPO's clipped surrogate (`clip_low`, `clip_high`, `dual_clip` > 1 or null) aggregated by `loss_agg`
    (token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm), minus `entropy_coef`
    x entropy. `kl_coef` > 0 adds a KL to the frozen `reference` policy (null: the checkpoint the actor
    started from): in the loss, estimated by `kl_estimator` (k1, k2, k3), or with `kl_in_reward` (PPO)
    as a per-token penalty on the reward, estimated by `kl_reward_estimator` (default k1, so the shaped
    reward is -kl_coef x log(pi / pi_ref)); k3 is clamped to at most 10 per token. `tis_cap`: truncated
    importance sampling of the rollout engine's log-probabilities (the weight min(p_train / p_rollout,
    cap); null: off). `max_prob_error`: a step whose `token_mult_prob_error` (the mean exp|log p_rollout -
    log p_train| over the response tokens, 1 when the sampler and the training forward agree) exceeds
    1 + max_prob_error stops the run before its updates, since its rollouts were not sampled from the
    policy being trained (checked where the metric is logged, `temperature` 1; null: never). The
    default 0.1 sits above what rounding gives (fp32 stays within 1e-4 of 1, bf16 typically within a few
    percent) and below what sampling with out-of-date weights gave (1.13 to 170 in fp32 runs).
    `generation_batch`:
    prompts generated together (null: all of a data-parallel rank's prompts of the step); the samples
    are fixed by train.seed, the iteration and each generation batch's first prompt, so a value that
    divides every layout's prompts per rank gives the same rollouts on any layout."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    prompts: list[str] = field(default_factory=list)
    prompts_data_dir: Optional[str] = None
    template: str = "evolm"
    prompts_per_step: int = 64
    n: int = 8
    max_prompt_len: Optional[int] = None
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Optional[list[str]] = None
    generation_batch: Optional[int] = None
    epochs: int = 1
    mini_batches: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False
    kl_reward_estimator: Literal["k1", "k2", "k3"] = "k1"
    reference: Optional[str] = None
    normalize_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    reward: str = "verifiable"
    truncated_reward: Optional[float] = None
    grader_timeout: Optional[float] = 4.0
    grader_workers: Optional[int] = None
    tis_cap: Optional[float] = None
    max_prob_error: Optional[float] = 0.1
    critic: RLCriticConfig = field(default_factory=RLCriticConfig)

    def prompt_len(self, max_seq_len: int) -> int:
        """The longest prompt a run samples: `max_prompt_len`, or when null what `max_seq_len` (the
        model's) leaves beside `max_new_tokens`."""
        return self.max_prompt_len if self.max_prompt_len is not None else max_seq_len - self.max_new_tokens



# ---------------------------------------------------------------- derived values


def with_rl_batch(cfg: "Config") -> "Config":
    """With `stage: rl`, a copy of `cfg` whose `train.global_batch_size` is the rollout batch of an
    iteration, `rl.prompts_per_step` x `rl.n` samples; other stages unchanged."""
    if cfg.stage != "rl" or not (cfg.rl.prompts_per_step >= 1 and cfg.rl.n >= 1):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, global_batch_size=cfg.rl.prompts_per_step * cfg.rl.n))


def resolve_critic_warmup(r: RLConfig, iters: int) -> RLConfig:
    """`r` with `critic.warmup` the iterations `critic.warmup_fraction` (when set and valid) comes to in a
    run of `iters`. A critic with neither takes the actor's `optim.warmup`, resolved beside it."""
    c = r.critic
    if c.warmup_fraction is None or not 0 <= c.warmup_fraction < 1:
        return r
    return dataclasses.replace(r, critic=dataclasses.replace(c, warmup=int(round(c.warmup_fraction * iters))))


# ---------------------------------------------------------------- checks


def rl_errors(cfg: "Config") -> list[str]:
    """The `rl` section, and what `stage: rl` asks of the others."""
    r, c, errors = cfg.rl, cfg.rl.critic, []
    if not r.prompts:
        errors.append("rl.prompts is empty: give the prompt sets, e.g. rl.prompts=[data/math_train.jsonl] or "
                      "rl.prompts=[rg:basic_arithmetic:1000]")
    if not cfg.data.tokenizer:
        errors.append("stage=rl needs data.tokenizer (prompts are rendered and responses graded as text)")
    if r.template not in TEMPLATE_NAMES:
        errors.append(f"rl.template={r.template!r} is not a chat template: use one of {', '.join(TEMPLATE_NAMES)}")
    if cfg.parallel.pp > 1 or cfg.parallel.virtual_pp > 1:
        errors.append(f"stage=rl generates with the training model, which pipeline parallelism cannot do yet: "
                      f"set parallel.pp=1 (got {cfg.parallel.pp}) and parallel.virtual_pp=1; use parallel.tp instead")
    if cfg.train.epochs is not None:
        errors.append("train.epochs: stage=rl counts train.iters rollout steps; set train.epochs=null")
    for name in ("prompts_per_step", "n", "max_prompt_len", "max_new_tokens", "epochs", "mini_batches"):
        if getattr(r, name) is not None and getattr(r, name) < 1:
            errors.append(f"rl.{name}={getattr(r, name)} must be at least 1")
    if r.algorithm == "grpo" and r.n < 2:
        errors.append(f"rl.n={r.n}: GRPO compares the samples of a prompt with each other and needs rl.n >= 2")
    if r.max_prompt_len is not None and r.max_prompt_len + r.max_new_tokens > cfg.model.max_seq_len:
        errors.append(f"rl.max_prompt_len + rl.max_new_tokens = {r.max_prompt_len} + {r.max_new_tokens} exceed "
                      f"model.max_seq_len={cfg.model.max_seq_len}")
    elif r.max_prompt_len is None and r.max_new_tokens >= cfg.model.max_seq_len:
        errors.append(f"rl.max_new_tokens={r.max_new_tokens} leaves no room for a prompt within model.max_seq_len="
                      f"{cfg.model.max_seq_len} (rl.max_prompt_len=null takes what is left): lower rl.max_new_tokens")
    if not r.temperature > 0 or not 0 < r.top_p <= 1:
        errors.append(f"rl.temperature={r.temperature} must be positive (rollouts are sampled) and rl.top_p="
                      f"{r.top_p} in (0, 1]")
    if r.generation_batch is not None and r.generation_batch < 1:
        errors.append(f"rl.generation_batch={r.generation_batch} must be at least 1 (or null)")
    if r.clip_low < 0 or r.clip_high < 0:
        errors.append(f"rl.clip_low={r.clip_low} and rl.clip_high={r.clip_high} must not be negative")
    if r.dual_clip is not None and not r.dual_clip > 1:
        errors.append(f"rl.dual_clip={r.dual_clip} must be greater than 1 (or null: off)")
    if r.kl_coef < 0 or r.entropy_coef < 0:
        errors.append(f"rl.kl_coef={r.kl_coef} and rl.entropy_coef={r.entropy_coef} must not be negative")
    if r.kl_in_reward and r.algorithm != "ppo":
        errors.append("rl.kl_in_reward puts the KL into PPO's per-token rewards; with rl.algorithm=grpo keep the KL "
                      "in the loss (rl.kl_in_reward=false)")
    if not (0 <= r.gamma <= 1 and 0 <= r.lam <= 1):
        errors.append(f"rl.gamma={r.gamma} and rl.lam={r.lam} must lie in [0, 1]")
    if r.max_prob_error is not None and not r.max_prob_error > 0:
        errors.append(f"rl.max_prob_error={r.max_prob_error} must be positive (or null: never stop)")
    if r.tis_cap is not None and not r.tis_cap > 0:
        errors.append(f"rl.tis_cap={r.tis_cap} must be positive (or null: off)")
    elif r.tis_cap is not None and r.temperature != 1.0:
        errors.append(f"rl.tis_cap needs rl.temperature=1 (got {r.temperature}): the sampler's log-probabilities are "
                      f"those of the untempered model")
    if r.grader_timeout is not None and not r.grader_timeout > 0:
        errors.append(f"rl.grader_timeout={r.grader_timeout} must be positive seconds (or null: none)")
    return errors + critic_errors(c)


def critic_errors(c: RLCriticConfig) -> list[str]:
    """PPO's critic, `rl.critic`."""
    errors = []
    if c.lr < 0 or c.min_lr < 0 or c.lr < c.min_lr:
        errors.append(f"rl.critic.lr={c.lr} and rl.critic.min_lr={c.min_lr} must not be negative, lr >= min_lr")
    if c.warmup is not None and c.warmup < 0:
        errors.append(f"rl.critic.warmup={c.warmup} must not be negative")
    if c.warmup_fraction is not None and not 0 <= c.warmup_fraction < 1:
        errors.append(f"rl.critic.warmup_fraction={c.warmup_fraction} must be at least 0 and below 1")
    if (c.weight_decay is not None and c.weight_decay < 0) or (c.clip_grad is not None and c.clip_grad < 0):
        errors.append("rl.critic.weight_decay and rl.critic.clip_grad must not be negative")
    if c.value_clip is not None and not c.value_clip > 0:
        errors.append(f"rl.critic.value_clip={c.value_clip} must be positive (or null: no clip)")
    return errors


def rollout_batch_errors(cfg: "Config", dp: int) -> list[str]:
    """How the rollout batch of `stage: rl` splits over `dp` data-parallel ranks and `rl.mini_batches` (both
    at least 1, as `rl.n`)."""
    r, t = cfg.rl, cfg.train
    if r.prompts_per_step % (dp * r.mini_batches):
        return [f"rl.prompts_per_step={r.prompts_per_step} must be a multiple of the data-parallel size x "
                f"rl.mini_batches = {dp} x {r.mini_batches}: each rank samples whole prompts, the same "
                f"number for each mini-batch"]
    if (rows := r.prompts_per_step // (dp * r.mini_batches) * r.n) % t.micro_batch_size:
        return [f"a mini-batch gives each data-parallel rank {rows} samples (rl.prompts_per_step / DP / "
                f"rl.mini_batches x rl.n), not a multiple of train.micro_batch_size={t.micro_batch_size}"]
    return []
