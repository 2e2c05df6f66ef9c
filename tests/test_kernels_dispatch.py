"""Backend resolution for the fused kernels: argument > environment > configured default."""
import sys

import pytest
import torch

import megaevo.kernels as K
from megaevo.kernels import dispatch

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_default(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    saved = dispatch._default_backend
    dispatch.set_backend("auto")
    yield
    dispatch._default_backend = saved


def test_auto_on_cpu_is_torch():
    assert K.get_backend() == "auto"
    assert dispatch.resolve("rms_norm", CPU) == "torch"
    assert dispatch.resolve("flash_attention", CPU, "auto") == "torch"


def test_precedence_argument_then_env_then_default(monkeypatch):
    K.set_backend("triton")
    assert K.get_backend() == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert K.get_backend() == "torch"
    assert dispatch.resolve("swiglu", CPU) == "torch"
    if dispatch.triton_available():
        assert dispatch.resolve("swiglu", CPU, "triton") == "triton"


def test_names_are_case_insensitive_and_checked(monkeypatch):
    K.set_backend(" Torch ")
    assert K.get_backend() == "torch"
    with pytest.raises(ValueError, match="kernels.backend.*'cuda'"):
        K.set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MEGAEVO_KERNEL_BACKEND.*'fast'"):
        K.get_backend()
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(ValueError, match="rms_norm"):
        K.rms_norm(torch.ones(2, 3), torch.ones(3), backend="nope")


def test_env_forces_triton_on_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if not dispatch.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.randn(3, 8, requires_grad=True)
    y = K.rms_norm(x, torch.ones(8))
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert type(K.rms_norm(x, torch.ones(8)).grad_fn).__name__ != "RMSNormFunctionBackward"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.swiglu(torch.ones(4), torch.ones(4), backend="triton")


@pytest.mark.skipif(dispatch.apex_available(), reason="apex is installed")
def test_apex_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match="apex"):
        K.rms_norm(torch.ones(2, 3), torch.ones(3), backend="apex")


def test_apex_only_for_norm_and_optimizer():
    with pytest.raises(RuntimeError, match="only for rms_norm, adamw"):
        dispatch.resolve("flash_attention", CPU, "apex")
    K.set_backend("apex")  # configured: apex where it exists, auto elsewhere
    assert dispatch.resolve("flash_attention", CPU) == "torch"


def test_works_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    for name in [n for n in sys.modules if n == "megaevo.kernels" or n.startswith("megaevo.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    import megaevo.kernels as fresh

    assert fresh.dispatch is not dispatch and not fresh.triton_available()
    x, w = torch.randn(4, 6), torch.rand(6)
    torch.testing.assert_close(fresh.rms_norm(x, w), fresh.rms_norm_reference(x, w))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.rms_norm(x, w, backend="triton")


def test_autotune_switch_env_then_default(monkeypatch):
    monkeypatch.delenv(dispatch.AUTOTUNE_ENV_VAR, raising=False)
    saved = dispatch._default_autotune
    try:
        assert K.autotune_enabled() is True
        K.set_autotune(False)
        assert K.autotune_enabled() is False
        monkeypatch.setenv(dispatch.AUTOTUNE_ENV_VAR, "on")
        assert K.autotune_enabled() is True
        monkeypatch.setenv(dispatch.AUTOTUNE_ENV_VAR, "0")
        K.set_autotune(True)
        assert K.autotune_enabled() is False
        monkeypatch.setenv(dispatch.AUTOTUNE_ENV_VAR, "sometimes")
        with pytest.raises(ValueError, match="MEGAEVO_KERNEL_AUTOTUNE.*'sometimes'"):
            K.autotune_enabled()
    finally:
        dispatch._default_autotune = saved

