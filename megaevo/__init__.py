"""megaevo: a Megatron-style 3D-parallel trainer for the whole life of a language model."""

__version__ = "0.1.0"
