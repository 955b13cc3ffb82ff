"""A real SLURM (Debian's slurm-wlm 22.05) on the two namespace nodes: munged, slurmctld on node A and one slurmd
per node, all children of the test with a generated slurm.conf in a temporary folder, stopped by pid at the end."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from nodes import Node, stop_group

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo")


def unavailable() -> str | None:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        return (f"SLURM tier: {', '.join(missing)} not installed "
                "(bash launch/install.sh --test installs slurm-wlm, munge)")
    return None


CONF = """\
ClusterName=simclrtest
SlurmctldHost={a.name}({a.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={tmp}/munge.sock
CredType=cred/munge
StateSaveLocation={tmp}/ctld
SlurmdSpoolDir={tmp}/spool-%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=20
NodeName={a.name} NodeAddr={a.addr} CPUs=2 RealMemory=1000 State=UNKNOWN
NodeName={b.name} NodeAddr={b.addr} CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    tmp: Path
    nodes: list[Node]
    env: dict
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *argv: str, node: int = 0, check: bool = True, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM command on node A (the controller's network) by default."""
        proc = subprocess.run(self.nodes[node].command(list(argv)), env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} " \
                                                f"({info.get('Reason')}) after {timeout_s:.0f} s"
            time.sleep(1)

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace") if path.exists() else ""


def _start(node: Node, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return node.popen(argv, env, log, cwd=log.parent)


@contextlib.contextmanager
def slurm_cluster(tmp: Path, nodes: list[Node], base_env: dict):
    """munged (host network: it only has a unix socket), slurmctld on node A, slurmd on each node; yields Slurm."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "ctld").mkdir()
    key = tmp / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = tmp / "slurm.conf"
    conf.write_text(CONF.format(a=nodes[0], b=nodes[1], tmp=tmp))
    env = {**base_env, "SLURM_CONF": str(conf)}
    cluster = Slurm(tmp, nodes, env)
    try:
        with open(tmp / "munged.err", "w") as err:  # munged writes to its own copy; ours closes here
            munged = subprocess.Popen(["munged", "--foreground", "--force", f"--key-file={key}",
                                       f"--socket={tmp}/munge.sock", f"--pid-file={tmp}/munged.pid",
                                       f"--log-file={tmp}/munged.log", f"--seed-file={tmp}/munge.seed"],
                                      stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        cluster.daemons.append(munged)
        deadline = time.monotonic() + 20
        while not (tmp / "munge.sock").exists():
            assert munged.poll() is None, (tmp / "munged.err").read_text() + cluster.log("munged.log")
            assert time.monotonic() < deadline, "munged did not start"
            time.sleep(0.1)
        cluster.daemons.append(_start(nodes[0], ["slurmctld", "-D", "-i", "-f", str(conf)], env,
                                      tmp / "slurmctld.out"))
        for node in nodes:
            (tmp / f"spool-{node.name}").mkdir()
            cluster.daemons.append(_start(node, ["slurmd", "-D", "-N", node.name, "-f", str(conf)], env,
                                          tmp / f"slurmd-{node.name}.out"))
        deadline = time.monotonic() + 60
        while True:
            for proc in cluster.daemons:
                assert proc.poll() is None, f"{proc.args[-6:]} ended: " + "".join(
                    cluster.log(n)[-1500:] for n in ("slurmctld.out", "slurmctld.log", "slurmd-simclr-node-a.log",
                                                     "slurmd-simclr-node-b.log", "slurmd-simclr-node-a.out"))
            info = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in info.stdout.splitlines() if line.strip())
            if len(states) == 2 and all(s in ("idle", "mix", "alloc") for s in states.values()):
                break
            assert time.monotonic() < deadline, f"SLURM nodes not idle: {info.stdout}{info.stderr}"
            time.sleep(0.5)
        yield cluster
    finally:
        for proc in reversed(cluster.daemons):  # by pid, each in its own session
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, 15)
        for proc in reversed(cluster.daemons):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            stop_group(proc)
