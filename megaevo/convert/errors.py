"""The error of the converters: input that cannot be converted (defined with megaevo's other errors,
since the safetensors reader below the converters raises it too)."""
from megaevo.errors import ConvertError

__all__ = ["ConvertError"]
