"""A real Ray cluster on one machine: head + workers, each in its own network and mount namespace.

Every node is a Linux network namespace with its own address on a bridge (veth pairs) and
its own mount namespace, in which ``/tmp``, ``/dev/shm``, ``$HOME`` and ``/var/tmp`` are
private and the checkout is read-only. Nothing can pass between nodes through a local path:
what one node writes, the others see only through the network (S3, MLflow, Ray), as on a
real cluster (KubeRay, the cluster launcher).

A services node on the same bridge runs the S3-compatible server (moto) and an MLflow
tracking server (SQLite backend on the services node's private disk, artifacts in the
bucket, proxied by the server). Addresses come from 198.18.0.0/15, the range reserved for
network tests (RFC 2544): never the machine's own or a private range.

    robustseg cluster up
    eval "$(robustseg cluster env)"
    ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml -- python -m deploy.job_entry ...
    robustseg cluster down

Only what `up` started is stopped: the namespaces, links and processes recorded in
``<state>/cluster.json`` (all names carry the cluster's prefix). Needs root.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STATE_FILE = "cluster.json"
#: S3 credentials of the cluster's own moto server (it accepts any; these are not secrets).
S3_KEYS = {"AWS_ACCESS_KEY_ID": "robustseg", "AWS_SECRET_ACCESS_KEY": "robustseg-local", "AWS_REGION": "us-east-1"}
S3_PORT, MLFLOW_PORT, GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 9000, 5000, 6379, 8265, 8000
#: Held while a cluster's network is claimed and its processes start. Namespaces and links are
#: global to the machine, so two `up`s (two CI runs, two shells) must not interleave there.
LOCK_FILE = Path("/run/lock/robustseg-cluster.lock")


class ClusterError(RuntimeError):
    """The cluster cannot be started, found or stopped (the message says what and why)."""


class ClusterTaken(ClusterError):
    """The prefix or the subnet belongs to a cluster that is running (choose another)."""


@dataclass
class ClusterSpec:
    """What to start.

    Attributes:
        state_dir: Private folders, logs and ``cluster.json`` (outside the checkout).
        prefix: Prefix of every namespace, link and bridge name (<= 6 characters).
        subnet: First three octets of the /24 in 198.18.0.0/15.
        workers: Worker nodes.
        head_cpus: Logical CPUs of the head (drivers, Tune trials).
        worker_cpus: Logical CPUs per worker (Train workers plus Ray Data).
        bucket: The S3 bucket created on the services node.
        worker_resources: Custom resources of every worker (how work is placed on workers).
    """

    state_dir: str
    prefix: str = "rs"
    subnet: str = "198.18.0"
    workers: int = 2
    head_cpus: int = 1
    worker_cpus: int = 3
    bucket: str = "robustseg"
    worker_resources: Dict[str, float] = field(default_factory=lambda: {"fold_worker": 1.0, "serve_node": 1.0})


@dataclass
class Node:
    """One node: namespace, address, host end of its link, private folder, main process."""

    name: str
    netns: str
    ip: str
    veth: str
    private: str
    pids: Dict[str, int] = field(default_factory=dict)


@dataclass
class Cluster:
    """A started cluster, as recorded in ``<state_dir>/cluster.json``."""

    spec: ClusterSpec
    bridge: str
    host_ip: str
    nodes: Dict[str, Node]
    started_s: float = 0.0

    # ------------------------------------------------------------------ addresses
    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def services(self) -> Node:
        return self.nodes["svc"]

    @property
    def workers(self) -> List[Node]:
        return [n for k, n in sorted(self.nodes.items()) if k.startswith("worker")]

    @property
    def ray_address(self) -> str:
        """The dashboard address for ``ray job submit --address``."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.services.ip}:{S3_PORT}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.services.ip}:{MLFLOW_PORT}"

    @property
    def storage_uri(self) -> str:
        return f"s3://{self.spec.bucket}/runs"

    def client_env(self) -> Dict[str, str]:
        """Environment for a client on the host (and for every node): Ray, S3, MLflow, storage."""
        return {"RAY_ADDRESS": self.ray_address, "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": self.tracking_uri,
                "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "AWS_ENDPOINT_URL": self.s3_endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "ROBUSTSEG_STORAGE_URI": self.storage_uri, **S3_KEYS}

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        path = Path(self.spec.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: str) -> "Cluster":
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"{path}: no cluster recorded there (start one with `robustseg cluster up`)")
        d = json.loads(path.read_text())
        return cls(spec=ClusterSpec(**d["spec"]), bridge=d["bridge"], host_ip=d["host_ip"],
                   nodes={k: Node(**v) for k, v in d["nodes"].items()}, started_s=d.get("started_s", 0.0))


# ---------------------------------------------------------------------- commands
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


def namespaces_available() -> Optional[str]:
    """None when this machine can make network and mount namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "the `ip` (iproute2) and `unshare` (util-linux) commands are needed"
    probe = f"rsprobe{os.getpid() % 10000}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"the kernel refused a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    res = subprocess.run(["unshare", "--mount", "--net", "--fork", "true"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"the kernel refused a mount namespace: {res.stderr.strip()}"
    return None


def _plan(spec: ClusterSpec) -> Cluster:
    if len(spec.prefix) > 6 or not spec.prefix.isalnum():
        raise ClusterError(f"prefix {spec.prefix!r}: use at most 6 letters or digits (Linux link names are short)")
    octets = spec.subnet.split(".")
    if len(octets) != 3 or octets[0] != "198" or octets[1] not in ("18", "19"):
        raise ClusterError(f"subnet {spec.subnet!r}: use a /24 inside 198.18.0.0/15 (reserved for network tests)")
    state = Path(spec.state_dir).resolve()
    if state == REPO or REPO in state.parents:
        raise ClusterError(f"{state}: the state folder must be outside the checkout (nodes see the checkout read-only)")
    names = [("svc", 10), ("head", 2)] + [(f"worker{i + 1}", 3 + i) for i in range(spec.workers)]
    nodes = {}
    for name, host in names:
        short = name[0] + (name[-1] if name.startswith("worker") else "")
        nodes[name] = Node(name=name, netns=f"{spec.prefix}-{name}", ip=f"{spec.subnet}.{host}",
                           veth=f"{spec.prefix}{short}h", private=str(state / "nodes" / name))
    return Cluster(spec=spec, bridge=f"{spec.prefix}br0", host_ip=f"{spec.subnet}.1", nodes=nodes)


@contextlib.contextmanager
def _machine_lock():
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the holder exits, even by SIGKILL
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _namespaces_of(prefix: str) -> Dict[str, List[str]]:
    """This prefix's network namespaces and the pids in each."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    return {ns: _ip("netns", "pids", ns, check=False).stdout.split() for ns in names if ns.startswith(f"{prefix}-")}


def _reclaim(prefix: str, bridge: str) -> List[str]:
    """Remove a cluster's network left behind by a killed owner (no process in any of its namespaces).

    The caller holds the machine lock, so no `up` is between making a network and starting its
    processes: a network without processes is nobody's.
    """
    spaces = _namespaces_of(prefix)
    busy = {ns: len(pids) for ns, pids in spaces.items() if pids}
    if busy:
        raise ClusterTaken(f"bridge {bridge} exists and a cluster with prefix {prefix!r} is running "
                           f"({', '.join(f'{ns}: {n} processes' for ns, n in sorted(busy.items()))}): "
                           "`robustseg cluster down` with its --state-dir, or choose another --prefix")
    for ns in spaces:
        _ip("netns", "del", ns, check=False)  # takes the node's end of each veth pair with it
    for link in _links_of(prefix):  # the host ends of the veth pairs, then the bridge (listed last)
        _ip("link", "del", link, check=False)
    # The kernel tears a deleted namespace's links down in the background: wait until the names
    # are free, or the network made next under them fails with "File exists".
    deadline = time.time() + 10.0
    while _links_of(prefix) and time.time() < deadline:
        time.sleep(0.1)
    return sorted(spaces) + [bridge]


def _links_of(prefix: str) -> List[str]:
    """Host links named for this prefix (its bridge and the host ends of its veth pairs)."""
    rows = _ip("-o", "link", "show", check=False).stdout.splitlines()
    names = [r.split(":")[1].strip().split("@")[0] for r in rows if r.count(":") >= 2]
    ours = [n for n in names if n.startswith(prefix) and re.fullmatch(r"br0|sh|hh|w\d+h", n[len(prefix):])]
    return sorted(ours, key=lambda n: n.endswith("br0"))  # the bridge last


def free_name(base: str, tries: int = 60) -> Tuple[str, str]:
    """The first ``(prefix, subnet)`` pair ``(base<i>, 198.19.<i>)`` that no running cluster holds.

    A pair whose network a killed owner left behind counts as free (`up` reclaims it). Two
    callers can pick the same pair; `up` lets only one have it (the other gets ClusterTaken).
    """
    for i in range(1, tries + 1):
        prefix, subnet = f"{base}{i}", f"198.19.{i}"
        if any(_namespaces_of(prefix).values()):
            continue
        on = _ip("-4", "-o", "addr", "show", "to", f"{subnet}.0/24", check=False).stdout.split()
        if on and on[1] != f"{prefix}br0":
            continue
        return prefix, subnet
    raise ClusterTaken(f"no free prefix {base}1..{base}{tries}: clusters are running on all of them")


def _make_network(c: Cluster) -> List[str]:
    """Bridge, namespaces and links; returns what a killed earlier cluster left and was reclaimed."""
    reclaimed: List[str] = []
    if _ip("link", "show", c.bridge, check=False).returncode == 0:
        reclaimed = _reclaim(c.spec.prefix, c.bridge)
    # A second bridge on the same /24 would split the routes between two clusters.
    used = _ip("-4", "-o", "addr", "show", "to", f"{c.spec.subnet}.0/24", check=False).stdout.split()
    if used:
        raise ClusterTaken(f"subnet {c.spec.subnet}.0/24 is in use on this machine (on {used[1]}): "
                           "choose another --subnet")
    _ip("link", "add", c.bridge, "type", "bridge")
    _ip("addr", "add", f"{c.host_ip}/24", "dev", c.bridge)
    _ip("link", "set", c.bridge, "up")
    for n in c.nodes.values():
        _ip("netns", "add", n.netns)
        peer = n.veth[:-1] + "n"
        _ip("link", "add", n.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", n.netns)
        _ip("link", "set", n.veth, "master", c.bridge, "up")
        for args in (("link", "set", "lo", "up"), ("link", "set", peer, "name", "eth0"),
                     ("addr", "add", f"{n.ip}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                     ("route", "add", "default", "via", c.host_ip)):
            _ip("-n", n.netns, *args)
    return reclaimed


#: Runs inside a node's fresh mount namespace before its command: private /tmp (the node's
#: own folder), /dev/shm (Ray's object store), $HOME and /var/tmp; the checkout read-only.
_MOUNTS = """set -e
mount --bind "$NODE_PRIVATE" /tmp
mount -t tmpfs -o size=4g,mode=1777 tmpfs /dev/shm
mount -t tmpfs tmpfs /var/tmp
mkdir -p /tmp/home /tmp/work
mount --bind "$REPO" "$REPO" && mount -o remount,bind,ro "$REPO"
if [ -d "$STATE_NODES" ]; then mount -t tmpfs tmpfs "$STATE_NODES"; fi
cd /tmp/work
exec "$@"
"""


def _node_env(c: Cluster, n: Node) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "ROBUSTSEG_"))}
    env.update(c.client_env(), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", HOME="/tmp/home", TMPDIR="/tmp",
               PYTHONDONTWRITEBYTECODE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_USAGE_STATS_ENABLED="0",
               NODE_PRIVATE=n.private, REPO=str(REPO), STATE_NODES=str(Path(c.spec.state_dir).resolve() / "nodes"))
    env.pop("RAY_ADDRESS")  # a node's own processes find their cluster from `ray start`
    return env


def node_exec(c: Cluster, n: Node, argv: Sequence[str], log_name: str) -> subprocess.Popen:
    """Start ``argv`` inside node ``n`` (its network namespace and a private mount namespace).

    Returns:
        The process; its output goes to ``<private>/<log_name>.log`` (visible from the host).
    """
    Path(n.private).mkdir(parents=True, exist_ok=True)
    log = open(Path(n.private) / f"{log_name}.log", "ab")
    cmd = ["ip", "netns", "exec", n.netns, "unshare", "--mount", "--propagation", "private", "--",
           "/bin/sh", "-c", _MOUNTS, "node", *argv]
    return subprocess.Popen(cmd, env=_node_env(c, n), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _services_argv(c: Cluster) -> Dict[str, List[str]]:
    mlflow = [str(BIN / "mlflow"), "server", "--host", c.services.ip, "--port", str(MLFLOW_PORT), "--workers", "1",
              "--backend-store-uri", "sqlite:////tmp/mlflow.db",
              "--artifacts-destination", f"s3://{c.spec.bucket}/mlflow", "--serve-artifacts",
              # MLflow 3 refuses Host headers other than localhost/private ranges by default.
              "--allowed-hosts", f"{c.services.ip},{c.services.ip}:{MLFLOW_PORT},localhost"]
    return {"s3": [str(BIN / "moto_server"), "-H", c.services.ip, "-p", str(S3_PORT)], "mlflow": mlflow}


def start_service(c: Cluster, which: str) -> int:
    """(Re)start the services node's ``s3`` or ``mlflow`` server; returns its pid once it answers."""
    n = c.services
    proc = node_exec(c, n, _services_argv(c)[which], which)
    url = f"{c.s3_endpoint}/" if which == "s3" else f"{c.tracking_uri}/health"
    _wait(lambda: _http_ok(url), 120, f"{which} server at {url}", proc, Path(n.private) / f"{which}.log")
    n.pids[which] = proc.pid
    c.save()
    return proc.pid


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _wait(ready, timeout_s: float, what: str, proc: Optional[subprocess.Popen] = None,
          log: Optional[Path] = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise ClusterError(f"{what} exited with status {proc.returncode}:\n{tail}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout_s:.0f} s")


def s3_client(c: Cluster) -> object:
    """A boto3 S3 client for the cluster's own S3 server."""
    import boto3

    return boto3.client("s3", endpoint_url=c.s3_endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name=S3_KEYS["AWS_REGION"])


def _make_bucket(c: Cluster) -> None:
    s3_client(c).create_bucket(Bucket=c.spec.bucket)


def _ray_argv(c: Cluster, n: Node) -> List[str]:
    common = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={n.ip}", "--disable-usage-stats"]
    if n.name == "head":
        return common + ["--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0", f"--dashboard-port={DASHBOARD_PORT}",
                         "--include-dashboard=true", f"--num-cpus={c.spec.head_cpus}", '--resources={"head": 1}']
    res = dict(c.spec.worker_resources, **{n.name: 1.0})
    return common + [f"--address={c.gcs_address}", f"--num-cpus={c.spec.worker_cpus}", f"--resources={json.dumps(res)}"]


def start_node(c: Cluster, name: str) -> int:
    """(Re)start the Ray node ``name`` (``head`` or ``workerK``); returns its pid once it joined."""
    n = c.nodes[name]
    before = alive_nodes(c)
    proc = node_exec(c, n, _ray_argv(c, n), "ray")
    # A restarted node joins with a new node id (the dead one may still be listed as alive).
    _wait(lambda: any(ip == n.ip for ip, _ in alive_nodes(c) - before), 180, f"Ray node {name}", proc,
          Path(n.private) / "ray.log")
    n.pids["ray"] = proc.pid
    c.save()
    return proc.pid


def alive_nodes(c: Cluster) -> set:
    """``(address, node id)`` of the Ray nodes the head counts as alive (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{c.ray_address}/nodes?view=summary", timeout=3) as r:
            data = json.loads(r.read())
    except Exception:  # noqa: BLE001 - head not up
        return set()
    rows = data.get("data", {}).get("summary", [])
    return {(row.get("raylet", {}).get("nodeManagerAddress") or row.get("ip"), row.get("raylet", {}).get("nodeId"))
            for row in rows if row.get("raylet", {}).get("state") == "ALIVE"}


def up(spec: ClusterSpec) -> Cluster:
    """Start the bridge, the namespaces, S3 + MLflow, the Ray head and the workers.

    Raises:
        ClusterTaken: a running cluster has this prefix or subnet. (A network whose processes
            are all gone, as a killed owner leaves it, is reclaimed with a warning instead.)
        ClusterError: namespaces unavailable, or a
            process that does not come up (its log tail is in the message). What was started
            is stopped again before raising.
    """
    why = namespaces_available()
    if why:
        raise ClusterError(f"cannot start a namespaced cluster: {why}")
    t0 = time.time()
    c = _plan(spec)
    Path(spec.state_dir).mkdir(parents=True, exist_ok=True)
    with _machine_lock():
        # Raises before recording when the prefix or subnet is taken: nothing of ours to stop.
        reclaimed = _make_network(c)
        if reclaimed:
            warnings.warn(f"reclaimed the network of a cluster whose processes were all gone: {', '.join(reclaimed)}",
                          RuntimeWarning, stacklevel=2)
        c.save()
        try:
            start_service(c, "s3")
            _make_bucket(c)
            start_service(c, "mlflow")
            start_node(c, "head")
            for w in c.workers:
                start_node(c, w.name)
        except BaseException:
            down(spec.state_dir)
            raise
    c.started_s = round(time.time() - t0, 1)
    c.save()
    return c


def kill_node(c: Cluster, name: str, sig: int = signal.SIGKILL) -> List[int]:
    """Send ``sig`` to every process in node ``name``'s network namespace; returns the pids."""
    res = _ip("netns", "pids", c.nodes[name].netns, check=False)
    pids = [int(p) for p in res.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def kill_service(c: Cluster, which: str, sig: int = signal.SIGKILL) -> None:
    """Kill the services node's ``s3`` or ``mlflow`` server (its whole process group)."""
    pid = c.services.pids.get(which)
    if pid:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def set_link(c: Cluster, name: str, up_: bool) -> None:
    """Take node ``name``'s link to the bridge down (cut off) or up (reconnected)."""
    _ip("link", "set", c.nodes[name].veth, "up" if up_ else "down")


def _wait_gone(netns: str, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not _ip("netns", "pids", netns, check=False).stdout.split():
            return True
        time.sleep(0.3)
    return False


def down(state_dir: str, grace_s: float = 10.0) -> List[str]:
    """Stop exactly what `up` recorded: processes by namespace, then namespaces, links, bridge.

    Returns:
        What was stopped or removed, one line each.
    """
    c = Cluster.load(state_dir)
    done: List[str] = []
    existing = set(_ip("netns", "list", check=False).stdout.split())
    order = [w.name for w in c.workers] + ["head", "svc"]
    for name in order:
        n = c.nodes[name]
        if n.netns not in existing:
            continue
        if kill_node(c, name, signal.SIGTERM) and not _wait_gone(n.netns, grace_s):
            kill_node(c, name, signal.SIGKILL)
            _wait_gone(n.netns, 5.0)
        _ip("netns", "del", n.netns, check=False)  # removes the node's end of its veth pair too
        done.append(f"node {name} ({n.netns}, {n.ip})")
    for n in c.nodes.values():
        if _ip("link", "show", n.veth, check=False).returncode == 0:
            _ip("link", "del", n.veth, check=False)
    if _ip("link", "show", c.bridge, check=False).returncode == 0:
        _ip("link", "del", c.bridge, check=False)
        done.append(f"bridge {c.bridge}")
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return done


def status(state_dir: str) -> Dict[str, object]:
    """Per node: address, whether its namespace has processes, and the Ray nodes alive."""
    c = Cluster.load(state_dir)
    alive = alive_nodes(c)
    nodes = {}
    for name, n in c.nodes.items():
        pids = _ip("netns", "pids", n.netns, check=False).stdout.split()
        nodes[name] = {"ip": n.ip, "netns": n.netns, "processes": len(pids),
                       "ray": ("alive" if n.ip in {ip for ip, _ in alive} else "not alive") if name != "svc" else "-"}
    return {"ray_address": c.ray_address, "tracking_uri": c.tracking_uri, "s3_endpoint": c.s3_endpoint,
            "storage_uri": c.storage_uri, "started_s": c.started_s, "nodes": nodes}


def env_lines(state_dir: str) -> str:
    """``export`` lines that point a host shell at the cluster."""
    c = Cluster.load(state_dir)
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(c.client_env().items()))


def default_state_dir() -> str:
    """``$ROBUSTSEG_CLUSTER_DIR`` or ``/var/tmp/robustseg-cluster`` (outside any checkout)."""
    return os.environ.get("ROBUSTSEG_CLUSTER_DIR", "/var/tmp/robustseg-cluster")


