"""The error of the converters: input that cannot be converted."""
from megaevo.errors import UserError


class ConvertError(UserError):
    """Input that cannot be converted: unsupported, inconsistent, or in the way of the output."""
