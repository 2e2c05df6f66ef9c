"""Fused kernels (Triton) with plain-torch references; imported as megaevo.kernels.

Every public op dispatches through :mod:`megaevo.kernels.dispatch`: ``backend=`` on the call,
else ``MEGAEVO_KERNEL_BACKEND``, else :func:`set_backend` (``auto`` by default: Triton on CUDA
tensors, the reference elsewhere). Importing this package never imports Triton; the Triton
kernels (``megaevo.kernels.jit``) load on first use.
"""
if __name__ == "kernels":
    # This folder is megaevo.kernels. Python started in the repository root finds it first as a
    # top-level `kernels`, which would hide an installed distribution of that name (Hugging Face's
    # `kernels`, which transformers imports): hand the import over to that one.
    import sys

    from ._shadow import hand_over

    sys.modules.pop("kernels._shadow", None)
    sys.modules["kernels"] = hand_over("kernels", __file__)
else:
    from .adamw import adamw_step, adamw_step_reference, sum_of_squares, sum_of_squares_reference
    from .attention import attention_sdpa, flash_attention, flash_attention_reference
    from .cross_entropy import cross_entropy, cross_entropy_reference
    from .dispatch import (BACKENDS, autotune_enabled, get_backend, resolve, set_autotune, set_backend, settings,
                           triton_available)
    from .rmsnorm import rms_norm, rms_norm_reference
    from .rotary import apply_rotary, apply_rotary_reference, rotary_tables
    from .swiglu import swiglu, swiglu_reference

    __all__ = [
        "BACKENDS",
        "adamw_step",
        "adamw_step_reference",
        "apply_rotary",
        "apply_rotary_reference",
        "attention_sdpa",
        "autotune_enabled",
        "cross_entropy",
        "cross_entropy_reference",
        "flash_attention",
        "flash_attention_reference",
        "get_backend",
        "resolve",
        "rms_norm",
        "rms_norm_reference",
        "rotary_tables",
        "set_autotune",
        "set_backend",
        "settings",
        "sum_of_squares",
        "sum_of_squares_reference",
        "swiglu",
        "swiglu_reference",
        "triton_available",
    ]
