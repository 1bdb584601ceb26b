"""slurm.conf for the emulated cluster, as pure text: no files, no processes here.

Everything a daemon writes (state, spool, logs, pid files) lives under the cluster's own folder, so
two clusters never share a file and teardown is one rmtree. Plugins are the ones that need nothing
from the host: proctrack/linuxproc finds a job's processes by parent pid, task/none pins nothing,
and no accounting database. No cgroup plugin: a container rarely lets slurmd create cgroups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Names, addresses and ports of one emulated cluster."""
    folder: Path                # the cluster's temp folder
    controller_addr: str        # slurmctld's address: the bridge, in the root namespace
    node_names: tuple[str, ...]
    node_addrs: tuple[str, ...]
    ctld_port: int
    slurmd_port: int
    cpus: int                   # what each node says it has (config_overrides: not checked)
    memory_mb: int

    def __post_init__(self) -> None:
        if len(self.node_names) != len(self.node_addrs) or not self.node_names:
            raise ValueError(f"{len(self.node_names)} node names for {len(self.node_addrs)} addresses")
        if self.cpus < 1:
            raise ValueError(f"{self.cpus} CPUs per node: use at least 1")

    @property
    def conf_path(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.folder / "munge" / "munge.socket"


def slurm_conf(lay: Layout) -> str:
    f = lay.folder
    lines = [
        "# written by python -m tpi_mpi.slurm_emulator: one machine, one network namespace per node",
        "ClusterName=tpi",
        f"SlurmctldHost=tpi-controller({lay.controller_addr})",
        f"SlurmctldPort={lay.ctld_port}",
        f"SlurmdPort={lay.slurmd_port}",          # the same on every node: each has its own address
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={lay.munge_socket}",    # our munged, not the host's
        f"StateSaveLocation={f / 'ctld-state'}",
        f"SlurmdSpoolDir={f / 'spool' / '%n'}",
        f"SlurmctldPidFile={f / 'slurmctld.pid'}",
        f"SlurmdPidFile={f / 'spool' / '%n.pid'}",
        f"SlurmctldLogFile={f / 'slurmctld.log'}",
        f"SlurmdLogFile={f / 'spool' / '%n.log'}",
        f"TmpFS={f / 'tmp' / '%n'}",               # node-local scratch: srun's PMIx plugin makes its folders here
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "SlurmdParameters=config_overrides",      # nodes claim `cpus`, whatever this machine has
        "ReturnToService=2",
        "MinJobAge=600",                          # finished jobs stay in `scontrol show job` 10 min
        "KillWait=5",
        "InactiveLimit=0",
        "MailProg=/bin/true",
        "PropagatePrioProcess=1",                 # jobs keep the nice value of the sbatch that sent them
    ]
    for name, addr in zip(lay.node_names, lay.node_addrs):
        lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={lay.cpus} "
                     f"RealMemory={lay.memory_mb} State=UNKNOWN")
    lines.append("PartitionName=tpi Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"
