"""Edge-network emulation on one machine (root): each rank in a network namespace, links with a
delay and a rate. `python -m tpi_mpi.netem --help`; emulator.py runs the namespaces and mpirun,
switch.py forwards the frames. Not part of the runtime: nothing in tpi_mpi imports it."""
