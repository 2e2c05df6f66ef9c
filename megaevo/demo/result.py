"""What `megaevo demo` made and ran: the data (:mod:`megaevo.demo.data`) and the training, a single run
(:mod:`megaevo.demo.training`) or the life-cycle suite (:mod:`megaevo.demo.lifecycle`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from megaevo.demo.data import DomainResult
from megaevo.demo.lifecycle import LifeCycleResult
from megaevo.demo.training import TrainingResult


@dataclass
class DemoResult:
    directory: str
    seed: int
    scale: float
    tokenizer: str
    vocab_size: int
    domains: list[DomainResult] = field(default_factory=list)
    seconds: float = 0.0
    training: TrainingResult | None = None  # the single pre-training run (life_cycle=False)
    life_cycle: LifeCycleResult | None = None  # the suite (the default)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [
            f"megaevo demo in {self.directory} (seed {self.seed}, scale {self.scale:g}, {self.seconds:.1f} s)",
            f"  tokenizer  {self.tokenizer}  (vocabulary {self.vocab_size:,})",
        ]
        for d in self.domains:
            lines.append(f"  {d.name:<9}  corpus {d.corpus}  ({d.corpus_documents:,} documents, {d.corpus_bytes / 1e6:.1f} MB)")
            lines.append(
                f"  {'':<9}  data   {d.data_prefix}.bin/.idx  ({d.documents:,} documents, {d.tokens:,} tokens, {d.dtype})"
            )
        lines.append(f"  summary    {Path(self.directory) / 'demo.json'}")
        return "\n".join(lines)
