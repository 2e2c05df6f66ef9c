"""RMSNorm (Triton) against the plain-torch reference, forward and backward."""
import pytest
import torch

from megaevo.kernels import rms_norm, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _check(x, weight, eps=1e-6):
    out = rms_norm(x, weight, eps, backend="triton")
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, weight), grad)
    rx, rw = (t.detach().float().requires_grad_() for t in (x, weight))
    ref = rms_norm_reference(rx, rw, eps)
    rgx, rgw = torch.autograd.grad(ref, (rx, rw), grad.float())
    assert out.dtype == x.dtype and gx.dtype == x.dtype and gw.dtype == weight.dtype
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(gx.float(), rgx, **tol)
    # the weight gradient sums over every row: compare relative to its scale
    torch.testing.assert_close(gw.float(), rgw, atol=tol["atol"] * x[..., 0].numel() ** 0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (3, 5, 300), (70, 64), (1100, 300)], ids=str)
def test_triton_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype).requires_grad_()
    _check(x, weight, eps=1e-5)


def test_backward_programs_walk_several_row_groups():
    """More row groups than backward programs, the last one partial: every row and partial sum counts."""
    from megaevo.kernels.jit.rmsnorm import launch_config
    from megaevo.kernels.jit import num_sms

    cfg = launch_config(300, num_sms(torch.device(DEVICE)))
    rows = 3 * cfg["programs"] * cfg["rows"] + 5
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 300, generator=gen).to(DEVICE).requires_grad_()
    weight = (1 + 0.2 * torch.randn(300, generator=gen)).to(DEVICE).requires_grad_()
    _check(x, weight)


def test_strided_input_and_float32_weight():
    """A column slice of a wider tensor (row stride != hidden) with a float32 weight on fp16 input."""
    wide = torch.randn(9, 130, device=DEVICE, dtype=torch.float16)
    x = wide[:, :100].requires_grad_()
    weight = torch.rand(100, device=DEVICE).requires_grad_()
    _check(x, weight)


def test_reference_normalises_rms_to_one():
    x = torch.randn(4, 256) * 7
    y = rms_norm_reference(x, torch.ones(256), eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4))


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.ones(2, 4), torch.ones(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [2048, 4096])
def test_gpu_bf16(hidden):
    x = torch.randn(4096, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    _check(x, weight)
