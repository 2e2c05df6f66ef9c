"""Build megaevo: the Python packages, kernels/ as megaevo.kernels, and the C++ extension megaevo._C.

The extension uses pybind11 and NumPy arrays only (no torch headers), so building it never needs
torch in the build environment.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

kernel_packages = ["megaevo.kernels"] + [f"megaevo.kernels.{p}" for p in find_packages("kernels")]

ext_modules = [
    Pybind11Extension(
        "megaevo._C",
        sorted(glob("csrc/*.cpp")),
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
    )
]

setup(
    packages=find_packages(include=["megaevo", "megaevo.*"]) + kernel_packages,
    package_dir={"megaevo.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
