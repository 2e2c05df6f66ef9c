"""Data pipeline: indexed token files, tokenizers, preprocessing, GPT samples, blending, sampling."""
from megaevo.errors import UserError


class DataError(UserError):
    """Data that cannot give what a run asks of it (a blend, a split, a sample length, a tokenizer);
    the message names the corpus or file and the setting to change."""
