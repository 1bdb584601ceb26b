"""A Slurm cluster on this machine: python -m tpi_mpi.slurm_emulator --help (cluster.py)."""
