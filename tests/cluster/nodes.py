"""Two "nodes" on this machine for the cluster tier: network namespaces joined by a veth pair, each with its own
address, host name and hosts file; every process of a node enters them with nsenter + unshare (not `ip netns
exec`, which remounts /sys and breaks slurmd's cgroup detection). Root only; everything made is removed again."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).parents[2]
SUBNET = "10.213.7"  # a private /30, only ever inside the namespaces made here
IFNAME = "sim0"  # the veth end's name inside each namespace (the same on both, like eth0 on real nodes)
TINY = ["--config", str(REPO / "configs/quickstart.yaml"), "dataset.name=synthetic", "dataset.synthetic_size=96",
        "dataset.input_shape=(16,16,3)", "model.small_stem=true", "model.out_dim=16", "model.base_model=resnet18",
        "batch_size=16", "epochs=2", "log_every_n_steps=1", "eval.final_probe=false", "eval.knn_monitor=false",
        "amp=off", "optim.warmup_epochs=1", "device=cpu", "dist_timeout_s=20"]
RUN = [*TINY, "epochs=4", "checkpoint_every_n_steps=2"]  # 16 steps: room to inject a fault mid-run
STEPS = 16  # 64 of the 96 synthetic images train (the rest are held out): 4 steps per epoch
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("MASTER_", "GLOO_", "NCCL_", "TORCHELASTIC_", "NNODES", "NODE_RANK", "SLURM_"))}
BASE_ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NPROC="1")
CHECKSUM = re.compile(r"\[rank (\d+)\] step (\d+): parameter checksum ([-+.0-9e]+)")  # two ranks may share a line


def unavailable() -> str | None:
    """Why this machine cannot host the namespace nodes (one line), or None."""
    if os.geteuid() != 0:
        return "cluster tier: needs root (network namespaces, veth pairs, bind-mounted hosts files)"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"cluster tier: {', '.join(missing)} not installed (bash launch/install.sh --test installs iproute2)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cluster tier: cannot make network/UTS/mount namespaces here: {probe.stderr.strip()[:120]}"
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Node:
    name: str  # host name inside the node
    netns: str
    addr: str
    hosts: Path  # the hosts file bind-mounted over /etc/hosts inside the node

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this node: its network namespace, a UTS namespace with its host name, a mount namespace
        with its hosts file."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount", "--propagation",
                "private", "--", "sh", "-c", script, "sh", str(self.hosts), self.name, *argv]

    def popen(self, argv: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
        """Started in its own process group (so that a test can end everything it started); output to `log`."""
        with open(log, "w") as out:  # the child writes to its own copy of the descriptor; ours closes here
            return subprocess.Popen(self.command(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def write_hosts(self, others: list["Node"], debian_default: bool) -> None:
        """Every node's name on its address; Debian's default also maps this host's own name to 127.0.1.1 first."""
        lines = ["127.0.0.1 localhost"]
        if debian_default:
            lines.append(f"127.0.1.1 {self.name}")
        lines += [f"{n.addr} {n.name}" for n in others if n is not self or not debian_default]
        self.hosts.write_text("\n".join(lines) + "\n")

    def link(self, up: bool) -> None:
        sh("ip", "-n", self.netns, "link", "set", IFNAME, "up" if up else "down")


@contextlib.contextmanager
def two_nodes(tmp: Path):
    """nodeA (10.213.7.1) and nodeB (10.213.7.2) joined by a veth pair; removed at the end whatever happens."""
    tag = uuid.uuid4().hex[:6]
    nodes = [Node(f"simclr-node-{c}", f"simclr-{c}-{tag}", f"{SUBNET}.{i}", tmp / f"hosts-{c}")
             for i, c in ((1, "a"), (2, "b"))]
    made: list[str] = []
    try:
        for node in nodes:
            sh("ip", "netns", "add", node.netns)
            made.append(node.netns)
        a_end, b_end = f"sa{tag}", f"sb{tag}"
        sh("ip", "link", "add", a_end, "netns", nodes[0].netns, "type", "veth", "peer", "name", b_end, "netns",
           nodes[1].netns)
        for node, end in zip(nodes, (a_end, b_end)):
            sh("ip", "-n", node.netns, "link", "set", end, "name", IFNAME)
            sh("ip", "-n", node.netns, "addr", "add", f"{node.addr}/30", "dev", IFNAME)
            sh("ip", "-n", node.netns, "link", "set", IFNAME, "up")
            sh("ip", "-n", node.netns, "link", "set", "lo", "up")
            node.write_hosts(nodes, debian_default=False)
        yield nodes
    finally:
        for netns in made:  # deleting a namespace deletes its veth end, and the peer with it
            kill_netns_processes(netns)
            sh("ip", "netns", "delete", netns, check=False)


def kill_netns_processes(netns: str) -> None:
    """SIGKILL to whatever still runs in the namespace (a test that failed midway)."""
    pids = sh("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group a test started (its own session), then reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def checksums(text: str) -> dict[int, tuple[int, str]]:
    """{rank: (step, checksum)} from the trainer's final lines; the last one per rank counts."""
    return {int(r): (int(s), c) for r, s, c in CHECKSUM.findall(text)}


def children(pid: int) -> list[int]:
    return [int(p) for p in sh("pgrep", "-P", str(pid), check=False).stdout.split()]


def wait_for(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"a node ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
