"""The one compiled part, tpi_mpi._qdot: the int8 matmul kernels (tpi_mpi/csrc/qdot.c; the K-quants'
in kquants.c, 16-bit float rows' in floats.c, their threads in pool.c), a decode layer's row steps (rowops.c: RMSNorm, RoPE, SiLU,
one-row attention) and its half-layers in one call each (layer.c).

Optional: where no C compiler is found (or a build fails) the package installs without it and
computes with its numba/torch kernels instead (docs/quant-kernels.md).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tpi_mpi._qdot", ["tpi_mpi/csrc/qdot.c", "tpi_mpi/csrc/kquants.c", "tpi_mpi/csrc/pool.c",
                                                  "tpi_mpi/csrc/floats.c", "tpi_mpi/csrc/rowops.c", "tpi_mpi/csrc/layer.c"],
                             depends=["tpi_mpi/csrc/qdot.h", "tpi_mpi/csrc/dotp.inc", "tpi_mpi/csrc/kpack.inc"],
                             extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-function"],
                             libraries=["m"], optional=True)])
