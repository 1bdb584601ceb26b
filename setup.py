"""The one compiled part: tpi_mpi._qdot, the int8 matmul kernels (tpi_mpi/csrc/qdot.c).

Optional: where no C compiler is found (or the build fails) the package installs without it and
quant.py computes with its numba/torch kernels instead (docs/quant-kernels.md).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tpi_mpi._qdot", ["tpi_mpi/csrc/qdot.c"],
                             extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-function"],
                             libraries=["m"], optional=True)])
