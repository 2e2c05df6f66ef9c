"""Flash attention (Triton) against the explicit-math reference: GQA, causal and document masks."""
import math

import pytest
import torch

from megaevo.kernels import attention_sdpa, flash_attention, flash_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(batch, seq_q, seq_k, heads, kv_heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=gen)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=gen)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=gen)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


def _sorted_docs(batch, seq, n_docs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, n_docs, (batch, seq), generator=gen), dim=1).values.to(DEVICE)


def _check(q, k, v, causal, doc_ids=None, scale=None, backend="triton"):
    """Output and all three gradients against the float32 reference on the same inputs."""
    out = flash_attention(q, k, v, causal, scale, doc_ids, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = flash_attention_reference(*ref_in, causal, scale, doc_ids)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.float(), r, **tol, msg=lambda m: f"d{name}: {m}")


# The larger cases take seconds each under Triton's CPU interpreter: `slow` there.
_SLOW_ON_CPU = pytest.mark.slow if DEVICE == "cpu" else ()
CASES = [
    # batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, docs
    pytest.param((2, 37, 37, 4, 2, 16, True, 0), marks=_SLOW_ON_CPU),    # GQA 2, length not a block multiple
    pytest.param((1, 64, 64, 4, 1, 32, False, 0), marks=_SLOW_ON_CPU),   # MQA, exact blocks, not causal
    pytest.param((1, 100, 100, 4, 4, 64, True, 0), marks=_SLOW_ON_CPU),  # MHA, head_dim 64
    pytest.param((2, 50, 50, 6, 2, 16, True, 3), marks=_SLOW_ON_CPU),    # GQA 3 with packed documents
    (1, 45, 45, 4, 1, 32, False, 4),    # document mask alone
    (1, 33, 70, 2, 1, 16, True, 0),     # decoding-style: fewer queries than keys, causal at the end
    (1, 20, 50, 2, 2, 16, False, 0),    # cross lengths, no mask
    (1, 1, 1, 2, 1, 16, True, 0),       # a single token
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_matches_reference(case, dtype):
    batch, seq_q, seq_k, heads, kv_heads, dim, causal, docs = case
    q, k, v = _inputs(batch, seq_q, seq_k, heads, kv_heads, dim, dtype)
    _check(q, k, v, causal, _sorted_docs(batch, seq_q, docs) if docs else None)


def test_interleaved_document_ids_and_custom_scale():
    """Equal ids attend to each other even when not contiguous (the mask is equality, not runs)."""
    q, k, v = _inputs(1, 40, 40, 2, 1, 16, torch.float32, seed=3)
    doc_ids = (torch.arange(40, device=DEVICE) // 3 % 2).view(1, 40)
    _check(q, k, v, True, doc_ids, scale=0.3)
    _check(q, k, v, False, doc_ids, scale=0.3)


def test_strided_views_of_a_fused_projection():
    """q, k, v as non-contiguous views of one (batch, seq, groups, q_per_kv + 2, dim) tensor."""
    fused = torch.randn(2, 30, 2, 4, 16, device=DEVICE).requires_grad_()
    q = fused[:, :, :, :2].reshape(2, 30, 4, 16)
    k, v = fused[:, :, :, 2], fused[:, :, :, 3]
    out = flash_attention(q, k, v, backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), fused)
    ref = flash_attention_reference(q, k, v)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), fused)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32])


def test_documents_do_not_leak():
    """Changing one document's keys and values leaves every other document's output unchanged."""
    q, k, v = (t.detach() for t in _inputs(1, 48, 48, 2, 2, 16, torch.float32, seed=5))
    doc_ids = torch.tensor([0] * 20 + [1] * 17 + [2] * 11, device=DEVICE).view(1, 48)
    base = flash_attention(q, k, v, doc_ids=doc_ids, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, 20:37] += 1.0
    v2[:, 20:37] -= 2.0
    moved = flash_attention(q, k2, v2, doc_ids=doc_ids, backend="triton")
    torch.testing.assert_close(moved[:, :20], base[:, :20], atol=0, rtol=0)
    torch.testing.assert_close(moved[:, 37:], base[:, 37:], atol=0, rtol=0)
    assert (moved[:, 20:37] - base[:, 20:37]).abs().max() > 0.1


def test_reference_is_softmax_attention():
    """The reference itself against a hand-written loop for one query."""
    q, k, v = (t.detach() for t in _inputs(1, 6, 6, 2, 1, 8, torch.float32))
    out = flash_attention_reference(q, k, v, causal=True)
    i, h = 4, 1
    scores = torch.stack([q[0, i, h] @ k[0, j, 0] for j in range(i + 1)]) / math.sqrt(8)
    expected = (torch.softmax(scores, 0)[:, None] * v[0, : i + 1, 0]).sum(0)
    torch.testing.assert_close(out[0, i, h], expected)


@pytest.mark.parametrize("causal,docs", [(True, 0), (False, 0), (True, 3), (False, 2)])
def test_torch_backend_matches_reference(causal, docs):
    q, k, v = _inputs(2, 29, 29, 4, 2, 16, torch.float32)
    doc_ids = _sorted_docs(2, 29, docs) if docs else None
    torch.testing.assert_close(attention_sdpa(q, k, v, causal, None, doc_ids),
                               flash_attention_reference(q, k, v, causal, None, doc_ids), **TOL[torch.float32])
    _check(q, k, v, causal, doc_ids, backend="torch")


def test_bad_shapes_are_clear_errors():
    q, k, v = _inputs(1, 8, 8, 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention(q, k, v)
    q, k, v = _inputs(1, 9, 8, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="seq_q"):
        flash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="doc_ids"):
        flash_attention(q, k, v, causal=False, doc_ids=torch.zeros(1, 9, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dim", [8, 24])
def test_odd_head_dims(dim):
    q, k, v = _inputs(1, 21, 21, 4, 2, dim, torch.float32)
    _check(q, k, v, True, _sorted_docs(1, 21, 2))


def test_huge_head_dim_falls_back_unless_forced():
    q, k, v = _inputs(1, 5, 5, 2, 1, 300, torch.float32)
    torch.testing.assert_close(flash_attention(q, k, v, backend="auto"), flash_attention_reference(q, k, v))
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q, k, v, backend="triton")


def _tile_runs():
    """(head dim, fwd tile, dK/dV tile, dQ tile): every tile of every list runs at least once."""
    try:
        from megaevo.kernels.jit import attention as jit
    except ImportError:  # no triton: the test is reported as skipped (empty parameter set)
        return []
    runs = []
    for dim in (64, 128, 256):
        lists = [jit.candidate_tiles(name, dim) for name in ("fwd", "dkdv", "dq")]
        runs += [(dim, *(tiles[i % len(tiles)] for tiles in lists)) for i in range(max(map(len, lists)))]
    return runs


def _tile_id(run) -> str:
    return f"d{run[0]}-" + "-".join("x".join(map(str, tile)) for tile in run[1:])


@pytest.mark.slow
@pytest.mark.parametrize("run", _tile_runs(), ids=_tile_id)
def test_every_tile_a_gpu_may_launch_matches_reference(run):
    """Each (BLOCK_M, BLOCK_N) that autotuning may pick, or that runs with autotuning off, on a
    length that is no multiple of it, with GQA, under the causal and the document mask."""
    from megaevo.kernels.jit.attention import attention_backward, attention_forward

    dim, fwd_tile, dkdv_tile, dq_tile = run
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    seq = 150 if dim < 256 else 90
    q, k, v = (t.detach() for t in _inputs(1, seq, seq, 4, 2, dim, dtype, seed=dim))
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    scale = 1.0 / math.sqrt(dim)
    for doc_ids in (None, _sorted_docs(1, seq, 3).to(torch.int32)):
        out, lse = attention_forward(q, k, v, True, scale, doc_ids, tile=fwd_tile)
        grad = torch.randn_like(out)
        grads = attention_backward(grad, q, k, v, out, lse, True, scale, doc_ids, tiles=(dkdv_tile, dq_tile))
        ref = flash_attention_reference(*ref_in, True, scale, doc_ids)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])
        for name, g, r in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g.float(), r, **TOL[dtype], msg=lambda m: f"d{name}: {m}")


def test_tile_lists_and_autotune_pruning():
    """The autotuner is offered, per head dim, exactly that head dim's list; the fixed tile is its first."""
    triton = pytest.importorskip("triton")
    jit = pytest.importorskip("megaevo.kernels.jit.attention")
    for name in ("fwd", "dkdv", "dq"):
        every = sorted({t for tiles in jit.TILES[name].values() for t in tiles})
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in every]
        for dim, expected in ((48, 64), (64, 64), (96, 128), (128, 128), (256, 256)):
            kept = jit._prune(name)(configs, {}, HEAD_DIM=dim)
            got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
            assert got == set(jit.TILES[name][expected]), (name, dim)
            assert jit.candidate_tiles(name, dim)[0] == jit.TILES[name][expected][0]
            assert len(set(jit.TILES[name][expected])) == len(jit.TILES[name][expected])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fixed_tiles_are_bit_reproducible(monkeypatch):
    """With autotuning off, the same inputs give bit-identical outputs and gradients, and the
    result equals a launch forced to the first tile of each list."""
    monkeypatch.setenv("MEGAEVO_KERNEL_AUTOTUNE", "0")
    q, k, v = _inputs(2, 1024, 1024, 16, 4, 128, torch.bfloat16)
    runs = []
    for _ in range(2):
        out = flash_attention(q, k, v, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    from megaevo.kernels.jit.attention import attention_forward, candidate_tiles

    forced, _ = attention_forward(q.detach(), k.detach(), v.detach(), True, 1 / math.sqrt(128), None,
                                  tile=candidate_tiles("fwd", 128)[0])
    assert torch.equal(forced, runs[0][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal,docs", [(True, 0), (True, 5), (False, 0)])
def test_gpu_bf16(dim, causal, docs):
    q, k, v = _inputs(2, 1000, 1000, 32, 4, dim, torch.bfloat16)
    _check(q, k, v, causal, _sorted_docs(2, 1000, docs) if docs else None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp16_matches_sdpa_flash():
    q, k, v = _inputs(1, 2048, 2048, 16, 4, 128, torch.float16)
    out = flash_attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, attention_sdpa(q, k, v), atol=2e-3, rtol=2e-3)
