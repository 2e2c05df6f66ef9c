"""The Llama stage: TP=1 vs TP=2 (with and without sequence parallelism), tying, padding, recompute.

The TP=2 checks share one spawn of 2 gloo processes; each process also builds the TP=1 model
in-process (no process group involved) and compares logical losses and gradients.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dist_utils import assert_check_passed, run_checks, run_distributed
from megaevo.model import ModelArgs, model_preset
from megaevo.model.fusion import fuse_qkv, join_parts, part_shapes, split_parts, split_qkv
from megaevo.model.llama import LlamaStage, build_chunks, build_stage, stage_layer_range
from megaevo.parallel import ParallelState, allreduce_sequence_parallel_grads, init_parallel_state

WORLD = 2
REL = 1e-5


def tiny_args(**kw) -> ModelArgs:
    base = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                max_seq_len=16)
    base.update(kw)
    return ModelArgs(**base)


def batch(args: ModelArgs, seq: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (2, seq), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, seq), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = args.vocab_size - 1
    return tokens, labels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_rel(a, b, what):
    err = rel_err(a, b)
    assert err <= REL, f"{what}: relative error {err:.3g} > {REL}"


def loss_and_grads(stage: LlamaStage, tokens, labels, **kw):
    """Per-token loss and the logical gradient of every parameter (gathered over TP)."""
    loss = stage(tokens, labels, **kw)
    (loss.sum() / (labels != -100).sum()).backward()
    state = stage.state
    allreduce_sequence_parallel_grads(stage.parameters(), state)
    grads = {}
    for name, param, meta in stage.named_parameters_with_meta():
        g = param.grad
        if state.tp_group is not None:
            parts = [torch.empty_like(g) for _ in range(state.tp_size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=state.tp_group)
        else:
            parts = [g]
        grads[name] = meta.layout.unshard(parts) if not meta.tp_replicated else parts[0]
        if meta.tp_replicated and state.tp_group is not None:
            for other in parts[1:]:
                torch.testing.assert_close(other, parts[0], rtol=0, atol=0, msg=f"{name} differs across TP")
    return loss.detach(), grads


def compare(ref, got):
    (ref_loss, ref_grads), (loss, grads) = ref, got
    assert_rel(loss, ref_loss, "loss")
    assert sorted(grads) == sorted(ref_grads)
    for name in ref_grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert_rel(grads[name], ref_grads[name], name)


# ---------------------------------------------------------------- TP=2 checks (run in the spawn)

def _tp_vs_single(args, sequence_parallel, seq=8, **fwd):
    tokens, labels = batch(args, seq)
    ref = loss_and_grads(LlamaStage(args, ParallelState.single(), seed=3), tokens, labels, **fwd)
    state = init_parallel_state(tp=WORLD, sequence_parallel=sequence_parallel, device_type="cpu")
    got = loss_and_grads(LlamaStage(args, state, seed=3), tokens, labels, **fwd)
    compare(ref, got)


def check_tp2_gqa2(rank, world):
    _tp_vs_single(tiny_args(), sequence_parallel=False)


def check_tp2_gqa2_sequence_parallel(rank, world):
    _tp_vs_single(tiny_args(), sequence_parallel=True)


def check_tp2_gqa4_tied(rank, world):
    _tp_vs_single(tiny_args(num_heads=8, num_kv_heads=2, tie_embeddings=True), sequence_parallel=False)


def check_tp2_gqa4_tied_sequence_parallel_bias_docs(rank, world):
    args = tiny_args(num_heads=8, num_kv_heads=2, tie_embeddings=True, qkv_bias=True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(6)) + [0, 1]])
    _tp_vs_single(args, sequence_parallel=True, doc_ids=doc_ids, position_ids=position_ids)


def check_tp2_recompute_full_sequence_parallel(rank, world):
    args = tiny_args()
    tokens, labels = batch(args)
    ref = loss_and_grads(LlamaStage(args, seed=3), tokens, labels)
    state = init_parallel_state(tp=WORLD, sequence_parallel=True, device_type="cpu")
    compare(ref, loss_and_grads(LlamaStage(args.replace(recompute="full"), state, seed=3), tokens, labels))


def check_tp2_recompute_selective(rank, world):
    args = tiny_args(num_heads=8, num_kv_heads=2)
    tokens, labels = batch(args)
    ref = loss_and_grads(LlamaStage(args, seed=3), tokens, labels)
    state = init_parallel_state(tp=WORLD, device_type="cpu")
    compare(ref, loss_and_grads(LlamaStage(args.replace(recompute="selective"), state, seed=3), tokens, labels))


def check_tp2_two_pipeline_stages_tied(rank, world):
    """Two stages chained in one process at TP=2 + SP: same loss; the tied copies' grads sum to the tied grad."""
    args = tiny_args(tie_embeddings=True)
    tokens, labels = batch(args)
    ref_loss, ref_grads = loss_and_grads(LlamaStage(args, seed=3), tokens, labels)
    state = init_parallel_state(tp=WORLD, sequence_parallel=True, device_type="cpu")
    first = LlamaStage(args, state, 0, 1, has_embedding=True, has_head=False, seed=3)
    last = LlamaStage(args, state, 1, 2, has_embedding=False, has_head=True, seed=3)
    torch.testing.assert_close(first.embedding.weight, last.output.weight, rtol=0, atol=0)
    hidden = first(tokens)
    assert hidden.shape == (2, 8 // WORLD, args.hidden_size)
    sent = hidden.detach().requires_grad_()
    loss = last(sent, labels)
    (loss.sum() / (labels != -100).sum()).backward()
    hidden.backward(sent.grad)
    assert_rel(loss.detach(), ref_loss, "loss")
    grads = {}
    for stage in (first, last):
        allreduce_sequence_parallel_grads(stage.parameters(), state)
        for name, param, meta in stage.named_parameters_with_meta():
            parts = [torch.empty_like(param.grad) for _ in range(WORLD)]
            torch.distributed.all_gather(parts, param.grad, group=state.tp_group)
            full = parts[0] if meta.tp_replicated else meta.layout.unshard(parts)
            assert meta.pipeline_tied == (stage is last and name == "embedding.weight")
            grads[name] = grads[name] + full if name in grads else full
    assert sorted(grads) == sorted(ref_grads)
    for name in ref_grads:
        assert_rel(grads[name], ref_grads[name], name)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def _run_all(rank, world):
    return run_checks(rank, world, CHECKS)


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_run_all, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tensor_parallel(dist_results, name):
    assert_check_passed(dist_results, name)


# ---------------------------------------------------------------- single process

def reference_llama_loss(stage: LlamaStage, tokens, labels):
    """The same network written out plainly from the logical weights in Hugging Face layout."""
    a = stage.args
    w = {name: meta.layout.unshard([p]) for name, p, meta in stage.named_parameters_with_meta()}
    emb = w["embedding.weight"]
    head = emb if a.tie_embeddings else w["output.weight"]

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * weight

    def rope(x):  # rotate-half convention
        hd = x.shape[-1]
        inv = 1.0 / a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = (torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv).float()
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    b, s = tokens.shape
    hd, rep = a.head_dim, a.num_heads // a.num_kv_heads
    h = emb[tokens]
    for i in range(a.num_layers):
        p = f"layers.{i}."
        x = norm(h, w[p + "attention_norm.weight"])
        wq, wk, wv = split_qkv(w[p + "attention.qkv.weight"], a.num_heads, a.num_kv_heads)
        q = rope((x @ wq.T).view(b, s, a.num_heads, hd))
        k = rope((x @ wk.T).view(b, s, a.num_kv_heads, hd)).repeat_interleave(rep, dim=2)
        v = (x @ wv.T).view(b, s, a.num_kv_heads, hd).repeat_interleave(rep, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + att.transpose(1, 2).reshape(b, s, -1) @ w[p + "attention.dense.weight"].T
        x = norm(h, w[p + "mlp_norm.weight"])
        gate, up = (x @ w[p + "mlp.gate_up.weight"].T).chunk(2, -1)
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down.weight"].T
    logits = norm(h, w["norm.weight"]) @ head.T
    return F.cross_entropy(logits.reshape(-1, a.vocab_size), labels.reshape(-1), reduction="none").view(b, s)


@pytest.mark.parametrize("kv,tied", [(2, False), (1, True)])
def test_matches_plain_llama(kv, tied):
    args = tiny_args(num_kv_heads=kv, tie_embeddings=tied)
    stage = LlamaStage(args, seed=1)
    tokens, labels = batch(args)
    with torch.no_grad():
        assert_rel(stage(tokens, labels), reference_llama_loss(stage, tokens, labels), "loss")


def test_padded_vocab_rows_get_no_probability():
    args = tiny_args()
    stage = LlamaStage(args, seed=1)
    assert stage.output.weight.shape[0] == 384 and stage.embedding.weight.shape[0] == 384
    tokens, labels = batch(args)
    logits = stage(tokens)
    assert logits.shape[-1] == 384
    probs = torch.softmax(logits.float(), dim=-1)
    assert probs[..., args.vocab_size:].max().item() == 0.0
    loss = stage(tokens, labels)
    loss.sum().backward()
    assert stage.output.weight.grad[args.vocab_size:].abs().max() == 0
    assert stage.embedding.weight.grad[args.vocab_size:].abs().max() == 0
    assert stage.output.weight[args.vocab_size:].abs().max() == 0  # padding rows start (and stay) zero


def test_tied_and_untied():
    tied = LlamaStage(tiny_args(tie_embeddings=True), seed=1)
    untied = LlamaStage(tiny_args(), seed=1)
    assert tied.output.weight is None
    names_t = [n for n, _, _ in tied.named_parameters_with_meta()]
    names_u = [n for n, _, _ in untied.named_parameters_with_meta()]
    assert "output.weight" not in names_t and names_u == names_t + ["output.weight"]
    torch.testing.assert_close(tied.embedding.weight, untied.embedding.weight)
    tokens, labels = batch(tied.args)
    tied(tokens, labels).sum().backward()
    g = tied.embedding.weight.grad
    # the tied gradient is the sum of the embedding's and the head's
    untied.output.weight.data.copy_(untied.embedding.weight.data)
    untied(tokens, labels).sum().backward()
    torch.testing.assert_close(g, untied.embedding.weight.grad + untied.output.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_matches_none(mode):
    args = tiny_args(num_heads=8, num_kv_heads=2)
    tokens, labels = batch(args)
    compare(loss_and_grads(LlamaStage(args, seed=2), tokens, labels),
            loss_and_grads(LlamaStage(args.replace(recompute=mode), seed=2), tokens, labels))


def test_pipeline_stages_start_from_the_same_weights():
    args = tiny_args(num_layers=4)
    whole = {n: p for n, p, _ in LlamaStage(args, seed=5).named_parameters_with_meta()}
    for rank in range(2):
        stage = build_stage(args, ParallelState(pp_size=2, pp_rank=rank), seed=5)
        assert (stage.has_embedding, stage.has_head) == (rank == 0, rank == 1)
        for name, p, _ in stage.named_parameters_with_meta():
            torch.testing.assert_close(p, whole[name], rtol=0, atol=0)
    assert stage_layer_range(4, 2, 1) == (2, 4)
    assert stage_layer_range(5, 2, 1, [3, 2]) == (3, 5)
    with pytest.raises(ValueError, match="pp_layers"):
        stage_layer_range(5, 2, 1, [3, 3])
    with pytest.raises(ValueError, match=r"parallel\.pp=2 does not divide the model's 5 layers"):
        stage_layer_range(5, 2, 0)


def test_build_chunks_checks_the_whole_layout():
    args = tiny_args(num_layers=6)
    with pytest.raises(ValueError, match=r"parallel\.pp × parallel\.virtual_pp = 2 × 2 = 4 does not divide the "
                                         r"model's 6 layers .* among 1, 2, 3, 6"):
        build_chunks(args, ParallelState(pp_size=2, pp_rank=0), virtual_pp=2, device="meta")
    with pytest.raises(ValueError, match=r"parallel\.pp_layers=\[3, 3\] must list 4 positive layer counts"):
        build_chunks(args, ParallelState(pp_size=2, pp_rank=0), virtual_pp=2, layers_per_stage=[3, 3], device="meta")
    assert len(build_chunks(args, ParallelState(pp_size=2, pp_rank=1), virtual_pp=2, layers_per_stage=[2, 1, 2, 1],
                            device="meta")) == 2


def test_parameter_metadata():
    args = tiny_args(qkv_bias=True)
    stage = LlamaStage(args, ParallelState(tp_size=2, tp_rank=1, sequence_parallel=True), 1, 2,
                       has_embedding=False, has_head=True)
    metas = {n: m for n, _, m in stage.named_parameters_with_meta()}
    assert sorted(metas) == sorted([
        "layers.1.attention_norm.weight", "layers.1.attention.qkv.weight", "layers.1.attention.qkv.bias",
        "layers.1.attention.dense.weight", "layers.1.mlp_norm.weight", "layers.1.mlp.gate_up.weight",
        "layers.1.mlp.down.weight", "norm.weight", "output.weight"])
    qkv = metas["layers.1.attention.qkv.weight"]
    assert (qkv.logical_shape, qkv.partition_dim, qkv.chunks) == ((64, 32), 0, None)
    gu = metas["layers.1.mlp.gate_up.weight"]
    assert (gu.logical_shape, gu.partition_dim, gu.chunks) == ((96, 32), 0, (48, 48))
    assert metas["layers.1.mlp.down.weight"].partition_dim == 1
    out = metas["output.weight"]
    assert out.logical_shape == (300, 32) and out.layout.padded_size == 512
    assert [f.shape for f in out.fragments((256, 32))] == [(44, 32)]  # rows 256..299 are real on rank 1
    for name, m in metas.items():
        is_norm = name.endswith("norm.weight")
        assert m.tp_replicated == is_norm
        assert m.weight_decay == (not is_norm and not name.endswith(".bias"))
        assert m.sequence_parallel == is_norm
    json.dumps([m.to_dict() for m in metas.values()])


def test_qkv_fuse_split_roundtrip():
    q, k, v = torch.randn(8 * 4, 5), torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    fused = fuse_qkv(q, k, v, 8, 2)
    assert fused.shape == (48, 5)
    torch.testing.assert_close(fused[16:20], k[:4])  # group 0: 4 query heads, then its key head
    for a, b in zip(split_qkv(fused, 8, 2), (q, k, v)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("how", ["same", "qkv", "gate_up"])
def test_joins_split_back_into_their_parts(how):
    """Import and export (and megaevo.load) make a fused tensor from Hugging Face parts and back by one rule."""
    a = tiny_args(num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
    shape = {"same": (32, 32), "qkv": ((4 + 2 * 2) * a.head_dim, 32), "gate_up": (96, 32)}[how]
    parts = [torch.randn(s) for s in part_shapes(how, shape, a)]
    full = join_parts(how, parts, a)
    assert tuple(full.shape) == shape
    for got, want in zip(split_parts(how, full, a), parts, strict=True):
        assert got.is_contiguous() and torch.equal(got, want)


@pytest.mark.parametrize("heads,kv,tp,field", [(4, 2, 4, "num_kv_heads"), (6, 6, 4, "num_heads"),
                                               (8, 4, 8, "num_kv_heads")])
def test_not_divisible_by_tp_is_a_clear_error(heads, kv, tp, field):
    args = tiny_args(hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv, ffn_hidden_size=64)
    with pytest.raises(ValueError, match=rf"parallel\.tp={tp} does not divide the model's \d+ .* \(model\.{field}=\d+\)"):
        LlamaStage(args, ParallelState(tp_size=tp, tp_rank=0))


def test_presets():
    for name, layers, hidden, ffn in [("evolm-0.5b", 20, 1536, 3216), ("evolm-1b", 22, 2048, 4896),
                                      ("evolm-2b", 26, 2816, 6180), ("evolm-4b", 28, 4096, 7792)]:
        a = model_preset(name)
        assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size,
                a.max_seq_len) == (layers, hidden, ffn, 32, 4, 32000, 2048)
        for tp in (1, 2, 4):
            a.validate(tp)
    with pytest.raises(ValueError, match="num_kv_heads"):
        model_preset("evolm-1b").validate(8)
    assert model_preset("tiny", rope_theta=5e5).rope_theta == 5e5
    cfg = SimpleNamespace(**{**vars(model_preset("evolm-1b")), "tie_embeddings": True})
    assert ModelArgs.from_config(cfg) == model_preset("evolm-1b", tie_embeddings=True)
    assert math.isclose(model_preset("evolm-1b").padded_vocab_size(8), 32768)
