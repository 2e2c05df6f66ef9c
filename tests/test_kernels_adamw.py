"""Fused AdamW step and sum of squares (Triton) against the references and torch.optim.AdamW."""
import pytest
import torch

from megaevo.kernels import adamw_step, adamw_step_reference, sum_of_squares, sum_of_squares_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def _state(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(n, generator=gen)
    exp_avg = torch.randn(n, generator=gen) * 0.1
    exp_avg_sq = torch.rand(n, generator=gen) * 0.01
    return [t.to(DEVICE) for t in (params, exp_avg, exp_avg_sq)]


@pytest.mark.parametrize("n", [1, 1000, 5003])
@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, None), (torch.float16, torch.float16),
                                                  (torch.float32, torch.float16)])
def test_triton_matches_reference(n, grad_dtype, out_dtype):
    got, want = _state(n), _state(n)
    out_got = torch.empty(n, dtype=out_dtype, device=DEVICE) if out_dtype else None
    out_want = torch.empty(n, dtype=out_dtype, device=DEVICE) if out_dtype else None
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2, 3):
        grads = torch.randn(n, generator=gen).to(DEVICE, grad_dtype)
        kwargs = dict(HYPER, weight_decay=0.1 if step != 2 else 0.0, step=step, grad_scale=0.5 if step == 3 else 1.0)
        adamw_step(*got[:1], grads, *got[1:], **kwargs, out=out_got, backend="triton")
        adamw_step_reference(*want[:1], grads, *want[1:], **kwargs, out=out_want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    if out_dtype:
        torch.testing.assert_close(out_got, out_want, atol=0, rtol=0)
        torch.testing.assert_close(out_got, got[0].to(out_dtype), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_torch_optim_adamw(backend):
    """Several steps from zero moments agree with torch.optim.AdamW on the same gradients."""
    params = torch.randn(777, device=DEVICE)
    param = torch.nn.Parameter(params.clone())
    opt = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    exp_avg, exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 5):
        grads = torch.randn(777, generator=gen).to(DEVICE)
        param.grad = grads.clone()
        opt.step()
        adamw_step(params, grads, exp_avg, exp_avg_sq, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6,
                   weight_decay=0.05, step=step, backend=backend)
    torch.testing.assert_close(params, param.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exp_avg, opt.state[param]["exp_avg"], atol=1e-6, rtol=1e-6)


def test_bad_buffers_are_clear_errors():
    params, m, v = _state(10)
    with pytest.raises(ValueError, match="params must be a contiguous float32"):
        adamw_step(params.half(), params, m, v, **HYPER, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="grads"):
        adamw_step(params, params[:5], m, v, **HYPER, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step(params, params, m, v, **HYPER, weight_decay=0.0, step=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sum_of_squares(backend):
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(9000, generator=gen), torch.randn(3, 70, generator=gen).half(), torch.zeros(0),
               torch.randn(1, generator=gen)]
    tensors = [t.to(DEVICE) for t in tensors]
    expected = sum(float(t.double().pow(2).sum()) for t in tensors)
    got = sum_of_squares(tensors, backend=backend)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert sum_of_squares(tensors[0], backend=backend).item() == pytest.approx(sum_of_squares_reference(tensors[0]).item(), rel=1e-5)
    assert sum_of_squares([torch.zeros(0, device=DEVICE)], backend=backend).item() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_large_bf16_copy():
    n = (1 << 24) + 3
    got, want = _state(n), _state(n)
    grads = torch.randn(n, device="cuda")
    out_got = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    out_want = torch.empty_like(out_got)
    adamw_step(*got[:1], grads, *got[1:], **HYPER, weight_decay=0.1, step=10, grad_scale=0.8, out=out_got, backend="triton")
    adamw_step_reference(*want[:1], grads, *want[1:], **HYPER, weight_decay=0.1, step=10, grad_scale=0.8, out=out_want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert (out_got != out_want).sum() <= n // 10000  # last-bit rounding of the bf16 copy at most rarely
    assert sum_of_squares(grads, backend="triton").item() == pytest.approx(grads.double().pow(2).sum().item(), rel=1e-4)
