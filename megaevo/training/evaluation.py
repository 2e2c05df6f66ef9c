"""In-loop evaluation: the stage's loss on its validation sets (``val/NAME``) and the downstream tasks of
``train.eval_tasks`` on the live model (``eval/TASK/METRIC``)."""
from __future__ import annotations

import torch

from megaevo.config import Config, ConfigError
from megaevo.data.tokenizer_files import check_tokenizer_fits
from megaevo.data.tokenizers import load_tokenizer
from megaevo.eval.lm_loss import LossTask
from megaevo.eval.tasks import GenerativeTask, resolve_task
from megaevo.inference.model import Model
from megaevo.training.stage import Stage
from megaevo.training.unit import TrainUnit


def eval_tasks(cfg: Config) -> tuple | None:
    """(tokenizer, tasks) for train.eval_tasks, resolved at start so that a bad spec fails at once."""
    t = cfg.train
    if not t.eval_tasks:
        return None
    tasks = [resolve_task(spec, t.eval_tasks_data_dir, limit=t.eval_tasks_limit) for spec in t.eval_tasks]
    if not cfg.data.tokenizer:
        texts = [spec for spec, task in zip(t.eval_tasks, tasks) if not isinstance(task, LossTask)]
        if texts:
            raise ConfigError(f"train.eval_tasks: {', '.join(texts)} need the tokenizer: set data.tokenizer")
        return None, tasks
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer_fits(tokenizer, cfg.model.vocab_size, cfg.data.tokenizer)
    return tokenizer, tasks


class Evaluation:
    """The run's evaluation at ``train.eval_interval``, its tasks resolved when it is built."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tasks = eval_tasks(cfg)

    @torch.no_grad()
    def __call__(self, actor: TrainUnit, stage: Stage) -> dict[str, float]:
        """``val/NAME`` (the stage's loss on each validation set) and ``eval/TASK/METRIC`` (train.eval_tasks)."""
        actor.module.eval()
        out = {f"val/{name}": actor.forward_backward(batches(), stage.loss, forward_only=True)
               for name, batches in stage.valid.items()}
        if self.tasks:
            out.update(self._run_tasks(actor))
        actor.module.train()
        return out

    def _run_tasks(self, actor: TrainUnit) -> dict[str, float]:
        """The eval tasks on the live model (TP shards as they are; DP splits the problems)."""
        t = self.cfg.train
        tokenizer = self.tasks[0]
        model = Model(actor.chunks[0], self.cfg.model, actor.state, actor.device, actor.dtype, tokenizer=tokenizer,
                      eos_ids=(tokenizer.eos_id,) if tokenizer is not None and tokenizer.eos_id is not None else ())
        out = {}
        for task in self.tasks[1]:
            if isinstance(task, GenerativeTask):
                result = task.run(model, batch_size=t.eval_tasks_limit, progress=False,
                                  max_length=t.eval_tasks_max_length, seed=t.seed)
            else:
                result = task.run(model, batch_size=8, progress=False)
            out.update({f"eval/{task.name}/{k}": float(v) for k, v in result["metrics"].items()
                        if isinstance(v, (int, float)) and k != "n"})
        return out
