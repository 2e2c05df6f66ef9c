"""megaevo: a Megatron-style 3D-parallel trainer for the whole life of a language model."""


def __getattr__(name: str):
    # `megaevo.__version__`: the installed distribution's version (pyproject.toml), looked up on
    # first use so that importing megaevo does not read package metadata.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("megaevo")
        except PackageNotFoundError:  # a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    if name == "load":  # `megaevo.load(path)`: a checkpoint or HF directory, ready to generate
        # lazy: importing inference loads torch, which `import megaevo` (and every command) must not pay for
        from megaevo.inference import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
