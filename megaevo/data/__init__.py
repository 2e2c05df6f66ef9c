"""Data pipeline: indexed token files, tokenizers, preprocessing, GPT samples, blending, sampling."""
