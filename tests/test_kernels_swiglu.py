"""SwiGLU (Triton) against the plain-torch reference, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from megaevo.kernels import swiglu, swiglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _check(fused, backend="triton"):
    """gate and up as the two halves of one tensor (strided views), grads w.r.t. the whole."""
    gate, up = fused.chunk(2, dim=-1)
    out = swiglu(gate, up, backend=backend)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, fused, grad)
    ref_fused = fused.detach().float().requires_grad_()
    ref = swiglu_reference(*ref_fused.chunk(2, dim=-1))
    (rg,) = torch.autograd.grad(ref, ref_fused, grad.float())
    assert out.dtype == fused.dtype and g.dtype == fused.dtype
    torch.testing.assert_close(out.float(), ref, **TOL[fused.dtype])
    torch.testing.assert_close(g.float(), rg, **TOL[fused.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 2 * 1100), (17, 2 * 64)], ids=str)
def test_triton_matches_reference(shape, dtype):
    fused = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(DEVICE, dtype)
    _check(fused.requires_grad_())


def test_contiguous_inputs():
    gate = torch.randn(6, 40, device=DEVICE).requires_grad_()
    up = torch.randn(6, 40, device=DEVICE).requires_grad_()
    out = swiglu(gate, up, backend="triton")
    torch.testing.assert_close(out, F.silu(gate) * up)
    out.sum().backward()
    torch.testing.assert_close(up.grad, F.silu(gate).detach())


def test_reference_is_silu_times_up():
    gate, up = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(swiglu_reference(gate, up), gate * torch.sigmoid(gate) * up)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.ones(2, 3), torch.ones(2, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16():
    _check(torch.randn(4096, 2 * 4896, device="cuda", dtype=torch.bfloat16).requires_grad_())
