"""Checkpoint conversion: Hugging Face import and export, and inspection of model directories.

    import_hf("Llama-3.2-1B/", "ckpt/", tp=2, pp=2)   # HF directory -> megaevo checkpoint (iteration 0)
    export_hf("runs/cpt/checkpoints", "hf-out/")       # megaevo checkpoint -> HF directory
    summarize_hf("Llama-3.2-1B/")                       # what `megaevo inspect` shows
    reshard("runs/4b/checkpoints", "ckpt/", tp=2, pp=4)  # checkpoint -> checkpoint cut for another layout

Writing a checkpoint for a target layout from logical tensors is :func:`write_checkpoint`, which
the importer and the resharder share.
"""
from .checkpoint_writer import ConvertError, TensorSource, check_layout, target_blocks, write_checkpoint
from .hf import export_hf, import_hf, is_hf_dir, summarize_hf
from .reshard import reshard

__all__ = [
    "ConvertError",
    "TensorSource",
    "check_layout",
    "export_hf",
    "import_hf",
    "is_hf_dir",
    "reshard",
    "summarize_hf",
    "target_blocks",
    "write_checkpoint",
]
