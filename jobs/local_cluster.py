"""A real multi-node Ray cluster on one machine: a head and extra nodes joined with
``ray start --address``, each a separate raylet with its own CPUs and object store.

Used by tests/test_cluster.py and benchmarks/scaling.py, and handy to try
jobs/submit.py without a cluster:

    python jobs/local_cluster.py --nodes 2 --num-cpus 1     # prints the addresses; Ctrl-C stops it

The cluster is isolated from any other Ray on the machine: its own temporary directory
and its own ports, and ``stop()`` kills only the processes it started (never
``ray stop``, which stops every Ray process of the machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

PYTHON_BIN = Path(sys.executable).parent

# Notice a lost node in a few seconds rather than the default half minute.
FAST_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


class LocalRayCluster:
    """``nodes`` Ray nodes on this machine with ``num_cpus`` CPUs each (node 0 is the head).

    Attributes once started: ``address`` (GCS, for ray.init), ``dashboard`` (HTTP, for
    the Jobs API), ``env`` (the environment the nodes run with: use it for anything
    that talks to the cluster), ``procs`` (one ``ray start --block`` process per node,
    each in its own process group).
    """

    def __init__(self, nodes: int = 2, num_cpus: int = 1, object_store_mb: int = 256,
                 env: Optional[dict] = None) -> None:
        self.nodes, self.num_cpus, self.object_store_mb = nodes, num_cpus, object_store_mb
        # Short: Ray's Unix socket paths live under it and must stay under ~100 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.env = dict(os.environ if env is None else env,
                        PATH=f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        RAY_AUTH_MODE="disabled", **FAST_HEALTH_CHECK)
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _common(self, index: int) -> list[str]:
        return [str(PYTHON_BIN / "ray"), "start", "--block", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                f"--temp-dir={self.temp_dir}/n{index}", *_node_ports()]

    def _launch(self, command: list[str], index: int) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"start_{index}.log", "wb")
        return subprocess.Popen(command, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 180) -> "LocalRayCluster":
        head = self._common(0) + [
            "--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
        ]
        self.procs.append(self._launch(head, 0))
        self._wait(lambda: self.alive_nodes() >= 1, timeout, "the head node")
        for index in range(1, self.nodes):
            self.add_node(index)
        self._wait(lambda: self.alive_nodes() == self.nodes, timeout, f"{self.nodes} nodes")
        return self

    def add_node(self, index: int) -> subprocess.Popen:
        proc = self._launch(self._common(index) + [f"--address={self.address}"], index)
        self.procs.append(proc)
        return proc

    def alive_nodes(self) -> int:
        """Nodes the cluster's GCS counts as alive (0 while it is not up)."""
        from ray.util.state import list_nodes

        try:
            return sum(n.state == "ALIVE"
                       for n in list_nodes(address=self.dashboard, timeout=5, raise_on_missing_output=False))
        except Exception:  # dashboard not up yet
            return 0

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited early: {dead}\n{self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(Path(self.temp_dir).glob("start_*.log")))

    def kill_node(self, index: int) -> None:
        """SIGKILLs node ``index`` and everything it started, as if the machine were lost."""
        kill_tree(self.procs[index])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs ``proc`` and all its descendants (Ray's workers run in their own
    sessions, so a process-group kill alone would miss them)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with_root = [proc.pid, *(p.pid for p in family)]
    for pid in with_root:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs([p for p in family if p.is_running()], timeout=10)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs per node (ray start takes whole numbers)")
    args = parser.parse_args()
    # Ctrl-C and `kill` both stop the nodes. A shell starts background jobs with SIGINT
    # ignored, and Python keeps an inherited SIG_IGN: restore the default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with LocalRayCluster(args.nodes, args.num_cpus) as cluster:
        print(f"Ray {args.nodes} nodes up: ray.init(address='{cluster.address}'); "
              f"python jobs/submit.py --address {cluster.dashboard} ...", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
