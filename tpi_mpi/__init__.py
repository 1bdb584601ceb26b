"""tpi_mpi: tensor-parallel Llama-family inference across small devices, over MPI."""

__version__ = "0.1.0"
