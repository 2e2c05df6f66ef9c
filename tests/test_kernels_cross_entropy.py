"""Cross-entropy (Triton) against the reference and F.cross_entropy, also vocab-parallel over gloo."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megaevo.kernels import cross_entropy, cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _data(shape, vocab, dtype, ignore_index=-100, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(device, dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    target.view(-1)[::5] = ignore_index
    return logits, target.to(device)


def _loss_and_grad(logits, target, **kwargs):
    logits = logits.detach().requires_grad_()
    loss = cross_entropy(logits, target, **kwargs)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    return loss, grad


def _expected(logits, target, ignore_index=-100):
    """F.cross_entropy on the float32 upcast: loss and gradient (same grad_out as above)."""
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction="none").view(target.shape)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss, grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,vocab", [((13,), 100), ((7,), 5000), ((2, 5), 300), ((3,), 1)], ids=str)
def test_matches_f_cross_entropy(shape, vocab, dtype, backend):
    logits, target = _data(shape, vocab, dtype)
    loss, grad = _loss_and_grad(logits, target, backend=backend)
    exp_loss, exp_grad = _expected(logits, target)
    assert loss.dtype == torch.float32 and loss.shape == target.shape and grad.dtype == dtype
    torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])
    torch.testing.assert_close(grad.float(), exp_grad, **TOL[dtype])
    assert (loss[target == -100] == 0).all() and (grad[target == -100] == 0).all()


def test_custom_ignore_index_and_strided_logits():
    wide, target = _data((9,), 140, torch.float32, ignore_index=3)
    logits = wide[:, :130]  # row stride 140
    target = target.clamp(max=129)
    loss, grad = _loss_and_grad(logits, target, ignore_index=3, backend="triton")
    exp_loss, exp_grad = _expected(logits, target, ignore_index=3)
    torch.testing.assert_close(loss, exp_loss)
    torch.testing.assert_close(grad, exp_grad)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits, _ = _data((4,), 50, torch.float32)
    target = torch.full((4,), -100, device=DEVICE)
    loss, grad = _loss_and_grad(logits, target, backend="triton")
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_of_range_targets_give_nan_not_a_finite_loss(backend):
    """Ids at or past the vocab, or negative (other than ignore_index), poison only their own rows."""
    logits, target = _data((8,), 40, torch.float32)
    target[1], target[4], target[6] = 40, -7, 1000
    loss, grad = _loss_and_grad(logits, target, backend=backend)
    bad = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    bad[[1, 4, 6]] = True
    assert loss[bad].isnan().all()
    assert loss[~bad].isfinite().all()
    keep = ~bad
    exp_loss, exp_grad = _expected(logits[keep], target[keep])
    torch.testing.assert_close(loss[keep], exp_loss)
    assert grad.isfinite().all()


def test_reference_matches_direct_formula():
    logits, target = _data((6,), 20, torch.float32, ignore_index=-1)
    target[target < 0] = 0
    expected = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]
    torch.testing.assert_close(cross_entropy_reference(logits, target), expected)


def _vocab_parallel_worker(rank, world, init_file):
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels load on first use, after this
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for dtype in (torch.float32, torch.float16):
            full, target = _data((3, 7), 2 * 150, dtype, device="cpu")
            exp_loss, exp_grad = _expected(full, target)
            shard = full[..., rank * 150:(rank + 1) * 150]
            for backend in ("triton", "torch"):
                loss, grad = _loss_and_grad(shard, target, group=dist.group.WORLD, backend=backend)
                torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])
                torch.testing.assert_close(grad.float(), exp_grad[..., rank * 150:(rank + 1) * 150], **TOL[dtype])
                # an id past the full vocab is owned by no rank: NaN on every rank, not lse - 0
                wrong = target.clone()
                wrong[0, 1], wrong[2, 3] = 300, -2
                loss = cross_entropy(shard, wrong, group=dist.group.WORLD, backend=backend)
                assert loss[0, 1].isnan() and loss[2, 3].isnan()
                assert loss.isnan().sum() == 2
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_over_two_ranks(tmp_path):
    """Each rank holds half the vocab; losses and gradient shards match the full-vocab result."""
    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_and_memory():
    """bf16 at the 1B shape; peak extra memory well under a float32 copy of the logits."""
    logits, target = _data((4096,), 32000, torch.bfloat16)
    exp_loss, exp_grad = _expected(logits, target)
    del exp_grad
    logits.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = cross_entropy(logits, target, backend="triton")
    loss.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= logits.numel() * 2 + (8 << 20)  # the bf16 gradient and small per-row buffers
    torch.testing.assert_close(loss, exp_loss, atol=2e-2, rtol=2e-2)
