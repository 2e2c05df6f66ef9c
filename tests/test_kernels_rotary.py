"""Rotary embedding (Triton) against the plain-torch reference, and the reference's own properties."""
import pytest
import torch

from megaevo.kernels import apply_rotary, apply_rotary_reference, rotary_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _fused_qk(batch, seq, kv_heads, q_per_kv, dim, dtype, seed=0):
    """q and k as the model takes them from a fused QKV projection: q copied, k a strided view."""
    fused = torch.randn(batch, seq, kv_heads, q_per_kv + 2, dim, generator=torch.Generator().manual_seed(seed))
    fused = fused.to(DEVICE, dtype).requires_grad_()
    q = fused[:, :, :, :q_per_kv].reshape(batch, seq, kv_heads * q_per_kv, dim)
    return fused, q, fused[:, :, :, q_per_kv]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim,with_positions", [(32, False), (64, True), (20, True)])
def test_triton_matches_reference(dim, with_positions, dtype):
    batch, seq = 2, 11
    cos, sin = rotary_tables(dim, 64, device=DEVICE)
    positions = torch.randint(0, 64, (batch, seq), device=DEVICE) if with_positions else None
    fused, q, k = _fused_qk(batch, seq, 2, 3, dim, dtype)
    qo, ko = apply_rotary(q, k, cos, sin, positions, backend="triton")
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    (grad,) = torch.autograd.grad((qo, ko), fused, (dq, dk))
    ref_fused, rq, rk = _fused_qk(batch, seq, 2, 3, dim, torch.float32)
    with torch.no_grad():
        ref_fused.copy_(fused.float())
    rqo, rko = apply_rotary_reference(rq, rk, cos, sin, positions)
    (ref_grad,) = torch.autograd.grad((rqo, rko), ref_fused, (dq.float(), dk.float()))
    assert qo.dtype == dtype and ko.shape == k.shape and qo.is_contiguous()
    torch.testing.assert_close(qo.float(), rqo, **TOL[dtype])
    torch.testing.assert_close(ko.float(), rko, **TOL[dtype])
    torch.testing.assert_close(grad.float(), ref_grad, **TOL[dtype])


def test_reference_rotation_properties():
    """Norm preserved, position 0 is the identity, scores depend only on the relative position."""
    cos, sin = rotary_tables(16, 40)
    q = torch.randn(1, 1, 1, 16).expand(1, 40, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 40, 1, 16)
    qo, ko = apply_rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(qo[:, 0], q[:, 0])
    scores = torch.einsum("bihd,bjhd->ij", qo, ko)
    torch.testing.assert_close(scores[10, 3], scores[30, 23], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[5, 5], scores[39, 39], atol=1e-4, rtol=1e-4)


def test_rotate_half_convention():
    """Element i pairs with i + dim/2, as in Hugging Face Llama."""
    cos, sin = rotary_tables(4, 3, theta=10000.0)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    qo, _ = apply_rotary_reference(q, q, cos, sin)
    angle = torch.tensor(2.0)  # position 2, frequency 1 for the first pair
    torch.testing.assert_close(qo[0, 2, 0], torch.stack([angle.cos(), torch.tensor(0.0), angle.sin(), torch.tensor(0.0)]))


def test_tables_too_short_is_an_error():
    cos, sin = rotary_tables(8, 4)
    q = torch.zeros(1, 5, 1, 8)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, q, cos, sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_bf16(dim):
    cos, sin = rotary_tables(dim, 4096, device="cuda")
    fused, q, k = _fused_qk(2, 2048, 4, 8, dim, torch.bfloat16)
    qo, ko = apply_rotary(q, k, cos, sin, backend="triton")
    rqo, rko = apply_rotary_reference(q.float(), k.float(), cos, sin)
    torch.testing.assert_close(qo.float(), rqo, **TOL[torch.bfloat16])
    torch.testing.assert_close(ko.float(), rko, **TOL[torch.bfloat16])
