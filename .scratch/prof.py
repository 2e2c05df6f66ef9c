import torch
from torch.profiler import profile, ProfilerActivity
from megaevo.kernels import rms_norm, rotary_tables, apply_rotary


def show(title, step):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(title)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


for hidden in (2048, 4096):
    x = torch.randn(16384, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        x.grad = w.grad = None
        torch.autograd.backward(rms_norm(x, w, backend="triton"), dy)
    show(f"rmsnorm hidden {hidden}", step)
for dim in (64, 128):
    cos, sin = rotary_tables(dim, 4096, device="cuda")
    q = torch.randn(4, 4096, 32, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 4096, 4, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def step():
        q.grad = k.grad = None
        torch.autograd.backward(apply_rotary(q, k, cos, sin, backend="triton"), (gq, gk))
    show(f"rotary dim {dim}", step)
