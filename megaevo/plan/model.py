"""Per-GPU memory and step time of one parallel layout (the formulas are in :mod:`megaevo.plan`).

Nothing here imports torch: a plan of thousands of layouts takes well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from megaevo.common import activation_bound
from megaevo.model.args import ModelArgs
from megaevo.model.flops import flops_per_token

GB = 2**30  # memory is reported in GiB, as megaevo's mem_gb and torch.cuda report it
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "temporary")


@dataclass(frozen=True)
class Hardware:
    """One GPU and the links between GPUs: memory in bytes, dense bf16 peak in FLOP/s, bandwidths in
    bytes/s (``intra``: within a node, per GPU; ``inter``: between nodes, per GPU; ``hbm``: device memory)."""

    name: str
    memory: float
    peak_flops: float
    hbm: float
    intra: float = 450e9
    inter: float = 50e9
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Candidate:
    """A parallel layout and the settings that change its memory and speed."""

    tp: int
    pp: int
    dp: int
    virtual_pp: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    pp_layers: tuple[int, ...] | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def overrides(self) -> list[str]:
        """The dotted config overrides that launch this layout."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.virtual_pp={self.virtual_pp}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
               f"train.micro_batch_size={self.micro_batch_size}", f"model.recompute={self.recompute}"]
        return out


@dataclass(frozen=True)
class Workload:
    """What a step trains: the model, its sample length and the global batch (samples); ``dtype_bytes``
    of the parameters and activations (2 for bf16, 4 for fp32); ``kernels`` the fused ops' backend
    (``triton`` on a GPU, ``torch`` for the plain-torch references of a CPU run); ``bucket_size_mb``
    as ``parallel.bucket_size_mb``."""

    model: ModelArgs
    seq_len: int
    global_batch: int
    dtype_bytes: int = 2
    kernels: str = "triton"
    bucket_size_mb: float = 25.0


@dataclass
class Estimate:
    candidate: Candidate
    memory: dict[str, float]  # term -> bytes, on the pipeline rank that needs the most
    fits: bool
    step_s: float
    tokens_per_s: float
    mfu: float
    efficiency: float  # the share of peak assumed for the compute
    time: dict[str, float] = field(default_factory=dict)  # term -> seconds

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def biggest_term(self) -> str:
        return max(self.memory, key=self.memory.get)


# -- parameters and their buffers -----------------------------------------------------------------------
def padded_vocab(shape: ModelArgs, tp: int) -> int:
    """The vocabulary rounded up to a multiple of vocab_pad_multiple x TP (megaevo.parallel.layers)."""
    step = shape.vocab_pad_multiple * tp
    return -(-shape.vocab_size // step) * step


def stage_layers(shape: ModelArgs, pp: int, virtual_pp: int, pp_layers) -> list[int]:
    """Layers of each virtual stage (an even split, or ``pp_layers``)."""
    stages = pp * virtual_pp
    return list(pp_layers) if pp_layers else [shape.num_layers // stages] * stages


def chunk_params(shape: ModelArgs, tp: int, layers: int, embedding: bool, head: bool,
                 tied_here: bool) -> list[tuple[str, int]]:
    """(name, local elements) of one model chunk, in the order LlamaStage registers them."""
    h, d = shape.hidden_size, shape.head_dim
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * d // tp
    vocab = padded_vocab(shape, tp) // tp
    out = [("embedding.weight", vocab * h)] if embedding else []
    for i in range(layers):
        out += [(f"{i}.attention_norm", h), (f"{i}.qkv", qkv * h)]
        out += [(f"{i}.qkv_bias", qkv)] if shape.qkv_bias else []
        out += [(f"{i}.dense", h * shape.num_heads * d // tp), (f"{i}.mlp_norm", h),
                (f"{i}.gate_up", 2 * shape.ffn_hidden_size // tp * h), (f"{i}.down", h * shape.ffn_hidden_size // tp)]
    if head:
        out.append(("norm.weight", h))
        if not tied_here:
            out.append(("output.weight", vocab * h))
    return out


@dataclass(frozen=True)
class Buffers:
    numel: int  # flat parameter / main-grad buffer, bucket padding included
    owned: int  # elements with fp32 master weights and Adam moments on this rank
    params: int  # parameters (no padding)
    largest: int  # the largest parameter (its transient .grad)


@lru_cache(maxsize=4096)
def rank_buffers(shape: ModelArgs, tp: int, pp: int, dp: int, virtual_pp: int, pp_layers, rank: int,
                 distributed: bool, bucket_size_mb: float) -> Buffers:
    """The flat buffers of pipeline rank ``rank`` exactly as megaevo.parallel.data_parallel.GradBuffers
    lays them out: parameters in reverse model order, a new bucket at ``bucket_size`` elements or where
    the model chunk (or the deferred tied embedding) changes, each bucket padded to a multiple of DP."""
    layers = stage_layers(shape, pp, virtual_pp, pp_layers)
    stages = pp * virtual_pp
    params: list[tuple[int, tuple[int, bool]]] = []
    tied = shape.tie_embeddings and pp > 1  # the two copies of the embedding wait for their sum
    for c in range(virtual_pp):
        stage = c * pp + rank
        emb, head = stage == 0, stage == stages - 1
        for name, n in chunk_params(shape, tp, layers[stage], emb, head, shape.tie_embeddings and emb and head):
            params.append((n, (c, tied and name in ("embedding.weight", "output.weight"))))
    bucket_size = int(bucket_size_mb * 2**20 / 4)
    order = list(reversed(params))
    buckets, offset, start = [], 0, 0
    for i, (n, key) in enumerate(order):
        offset += n
        if offset - start >= bucket_size or i == len(order) - 1 or order[i + 1][1] != key:
            offset = start + -(-(offset - start) // dp) * dp
            buckets.append(offset - start)
            start = offset
    owned = sum(b // dp for b in buckets) if distributed else offset
    return Buffers(offset, owned, sum(n for n, _ in params), max((n for n, _ in params), default=0))


# -- activations ---------------------------------------------------------------------------------------
def layer_activation_bytes(shape: ModelArgs, w: Workload, c: Candidate, micro: int) -> float:
    """Bytes one decoder layer saves for backward for one micro-batch (see the module docstring)."""
    b, s, h, e, t = micro, w.seq_len, shape.hidden_size, w.dtype_bytes, c.tp
    a, kv, d, f = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.ffn_hidden_size
    sp = t if c.sequence_parallel and t > 1 else 1
    bs = b * s
    if c.recompute == "full":
        return bs * h * e / sp  # the layer's input, kept by the checkpoint
    norm_in = 2 * (bs * h * e / sp + bs * 4 / sp)  # x and rstd (fp32) of both norms
    linear_in = 2 * bs * h * e  # the (gathered) inputs of qkv and gate_up
    qkv = bs * (a + 2 * kv) * d * e / t  # the fused projection (v is a view of it)
    rotated = bs * (a + kv) * d * e / t  # new q and k
    core = bs * a * d * e / t  # attention output = dense's input
    lse = 0 if c.recompute == "selective" else b * a * s * 4 / t
    mlp = bs * 2 * f * e / t + bs * f * e / t  # gate_up output, swiglu output = down's input
    total = norm_in + linear_in + qkv + rotated + core + lse + mlp
    if w.kernels == "torch":  # the references also keep each norm's normalised x and silu(gate)
        total += 2 * bs * h * e / sp + bs * f * e / t
    return total


def embedding_bytes(w: Workload, c: Candidate, micro: int) -> float:
    """The token ids the embedding keeps (int64; with TP the local ids and the out-of-slice mask)."""
    bs = micro * w.seq_len
    return bs * 8 + (bs if c.tp > 1 else 0)


def head_bytes(shape: ModelArgs, w: Workload, c: Candidate, micro: int) -> tuple[float, float]:
    """(activations, logits) the head keeps for one micro-batch: the final norm and the output layer's
    input; the logits (or softmax) the cross-entropy keeps, with its per-token buffers."""
    b, s, h, e, t = micro, w.seq_len, shape.hidden_size, w.dtype_bytes, c.tp
    sp = t if c.sequence_parallel and t > 1 else 1
    bs = b * s
    act = bs * h * e / sp + bs * 4 / sp + bs * h * e
    if w.kernels == "torch":
        act += bs * h * e / sp
    vocab = padded_vocab(shape, t) // t
    if w.kernels == "torch":  # float32 softmax (or log-softmax), target ids and two masks
        logits = bs * vocab * 4 + bs * 8 + 2 * bs
    else:  # the logits themselves, target ids and the log-sum-exp
        logits = bs * vocab * e + bs * 8 + bs * 4
    return act, logits


def rope_bytes(shape: ModelArgs) -> float:
    """The float32 cos and sin tables each chunk caches and the attention keeps."""
    return 2 * shape.max_seq_len * (shape.head_dim // 2) * 4


def chunk_activation_bytes(shape: ModelArgs, w: Workload, c: Candidate, stage: int) -> tuple[float, float]:
    """(activations, logits) that virtual stage ``stage`` saves for backward for one micro-batch."""
    layers = stage_layers(shape, c.pp, c.virtual_pp, c.pp_layers)
    stages = c.pp * c.virtual_pp
    m = c.micro_batch_size
    act = layers[stage] * layer_activation_bytes(shape, w, c, m) + (rope_bytes(shape) if layers[stage] else 0)
    logits = 0.0
    if stage == 0:
        act += embedding_bytes(w, c, m)
    if stage == stages - 1:
        head_act, logits = head_bytes(shape, w, c, m)
        act += head_act
    return act, logits


# -- memory --------------------------------------------------------------------------------------------
def rank_memory(w: Workload, c: Candidate, rank: int) -> dict[str, float]:
    """Bytes per term on pipeline rank ``rank``."""
    shape = w.model
    buf = rank_buffers(shape, c.tp, c.pp, c.dp, c.virtual_pp, c.pp_layers, rank, c.distributed_optimizer,
                       w.bucket_size_mb)
    num_micro = w.global_batch // (c.dp * c.micro_batch_size)
    live = activation_bound(num_micro, c.pp, rank, c.virtual_pp)
    chunks = [chunk_activation_bytes(shape, w, c, k * c.pp + rank) for k in range(c.virtual_pp)]
    # the in-flight sets are spread over the rank's chunks; the head's logits live for one at a time
    act = live * sum(a for a, _ in chunks) / c.virtual_pp
    logits = max(lg for _, lg in chunks)
    temporary = buf.largest * w.dtype_bytes  # a parameter's .grad before it joins the fp32 main grad
    if logits:
        temporary += logits * w.dtype_bytes / (4 if w.kernels == "torch" else w.dtype_bytes)  # grad of logits
    if c.distributed_optimizer and c.dp > 1:
        temporary += buf.numel // c.dp * w.dtype_bytes  # the updated shards, cloned for the all-gather
    if c.recompute == "full":  # one layer's activations, rebuilt during its backward
        temporary += layer_activation_bytes(shape, w, Candidate(**{**c.__dict__, "recompute": "none"}),
                                            c.micro_batch_size)
    return {"weights": buf.numel * w.dtype_bytes, "gradients": buf.numel * 4, "optimizer": buf.owned * 12,
            "activations": act, "logits": logits, "temporary": temporary}


def memory(w: Workload, c: Candidate) -> dict[str, float]:
    """The terms of the pipeline rank with the largest total (first and last ranks, or every rank of
    an uneven ``pp_layers`` split)."""
    ranks = range(c.pp) if c.pp_layers else sorted({0, c.pp - 1})
    return max((rank_memory(w, c, r) for r in ranks), key=lambda m: sum(m.values()))


# -- step time -----------------------------------------------------------------------------------------
def compute_efficiency(base: float, tokens_per_micro: int) -> float:
    """The share of peak a micro-batch's kernels reach: ``base`` for large ones, less for few tokens."""
    return base * tokens_per_micro / (tokens_per_micro + 1024)


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def step_time(w: Workload, c: Candidate, hw: Hardware, base_efficiency: float) -> tuple[dict[str, float], float]:
    """(seconds per term, the compute efficiency assumed) of one optimizer step."""
    shape, s, e = w.model, w.seq_len, w.dtype_bytes
    num_micro = w.global_batch // (c.dp * c.micro_batch_size)
    tokens = w.global_batch * s
    per_token = flops_per_token(shape, s)
    layers_share = 6 * shape.num_layers * (shape.hidden_size * (shape.hidden_size + 2 * shape.num_kv_heads *
                                           shape.head_dim) + shape.hidden_size ** 2 + 3 * shape.hidden_size *
                                           shape.ffn_hidden_size)
    attention = 3 * shape.num_layers * 2 * s * shape.hidden_size
    extra = {"none": 0.0, "selective": attention / 3, "full": (layers_share + attention) / 3}[c.recompute]
    eff = compute_efficiency(base_efficiency, c.micro_batch_size * s)
    compute = (per_token + extra) * tokens / (c.gpus * hw.peak_flops * eff)
    bubble = compute * (c.pp - 1) / (c.virtual_pp * num_micro)
    # TP: per layer and micro-batch 2 all-reduces forward and 2 backward (with SP: all-gathers and
    # reduce-scatters of the same volume), plus the recomputed forward's; not overlapped
    layers_here = shape.num_layers / c.pp
    act = c.micro_batch_size * s * shape.hidden_size * e
    collectives = 4 + (2 if c.recompute == "full" else 0)
    tp = num_micro * layers_here * collectives * 2 * _ring(c.tp) * act / hw.intra
    # PP: each virtual stage boundary sends activations forward and gradients back, not overlapped
    sp = c.tp if c.sequence_parallel else 1
    pp_link = hw.intra if c.tp * c.dp < hw.gpus_per_node else hw.inter
    pp = (num_micro * c.virtual_pp * 2 * act / sp / pp_link) if c.pp > 1 else 0.0
    # DP: fp32 gradients all-reduced (or reduce-scattered) bucket by bucket during the last micro-batch's
    # backward; the distributed optimizer then all-gathers the updated parameters
    buf = rank_buffers(shape, c.tp, c.pp, c.dp, c.virtual_pp, c.pp_layers, 0, c.distributed_optimizer,
                       w.bucket_size_mb)
    dp_link = hw.intra if c.tp * c.dp <= hw.gpus_per_node else hw.inter
    reduce = buf.numel * 4 * (1 if c.distributed_optimizer else 2) * _ring(c.dp) / dp_link
    last_backward = (compute + bubble) / max(num_micro, 1) * 2 / 3 / c.virtual_pp
    bucket = min(1.0, w.bucket_size_mb * 2**20 / 4 / max(buf.numel, 1))
    dp = max(reduce - last_backward, reduce * bucket)
    if c.distributed_optimizer:
        dp += buf.numel * e * _ring(c.dp) / dp_link
    # the optimizer step reads and writes master weights, moments, the gradient and the parameters
    optimizer = buf.owned * (3 * 4 * 2 + 4 + e) / hw.hbm
    return {"compute": compute, "bubble": bubble, "tp_comm": tp, "pp_comm": pp, "dp_comm": dp,
            "optimizer": optimizer}, eff


def estimate(w: Workload, c: Candidate, hw: Hardware, base_efficiency: float = 0.6) -> Estimate:
    mem = memory(w, c)
    times, eff = step_time(w, c, hw, base_efficiency)
    step = sum(times.values())
    tokens_per_s = w.global_batch * w.seq_len / step
    mfu = flops_per_token(w.model, w.seq_len) * tokens_per_s / (c.gpus * hw.peak_flops)
    return Estimate(c, mem, sum(mem.values()) <= hw.memory, step, tokens_per_s, mfu, eff, times)
