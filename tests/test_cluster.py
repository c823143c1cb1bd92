"""A real Ray cluster on this machine: `ray start --head` plus a second node, token auth on.

The head advertises 2 CPUs and runs the dashboard (the Jobs API lives there) on 127.0.0.1; the
second node advertises 2 CPUs and the custom resource the manifests in deploy/ give generator
nodes. The tiny preset asks for 3 CPUs (generator, scorer, learner: one each), more than either
node has, so its job can only pass if the driver joined the cluster through RAY_ADDRESS (which
Ray sets for a job's driver) and the actors were spread over both nodes; the generator asks for
the custom resource, and the test checks it ran on the second node.

The cluster gets its own token (a file under its own temp dir, RAY_AUTH_MODE=token) and is
stopped by killing the processes that carry its temp dir on their command line, never with
`ray stop`, which stops every Ray process on the machine: the session's own cluster
(conftest's `ray_cluster`) must still work afterwards, and the test checks that it does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the venv's bin: `ray` and `rlhf-ray` of the interpreter running the tests
VENV_BIN = Path(sys.executable).parent
GENERATOR_RESOURCE = "generator_node"  # the name deploy/ gives generator nodes (test_deploy)
JOB_TIMEOUT_S = 300


@dataclass
class Cluster:
    root: Path
    dashboard_url: str
    token: str
    env: dict  # the environment the cluster was started with (token path, PATH)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mark(root: Path) -> str:
    """What every process of the cluster has on its command line: its temp dir (as a folder)."""
    return str(root) + os.sep


def _processes_of(mark: str) -> list:
    """This cluster's processes: those with `mark` (its temp dir) on their command line, and
    their children (workers, the job's driver)."""
    import psutil

    me = os.getpid()
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and any(mark in arg for arg in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _stop(mark: str) -> None:
    import psutil

    procs = _processes_of(mark)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _run(cmd: list[str], env: dict, timeout: float) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")


@contextmanager
def local_cluster():
    """A head and one more node, in a fresh temp dir, with a token of their own."""
    import secrets

    # a short path: Ray's unix sockets live under it (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's driver finds rlhf-ray
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    gcs, dashboard, client, agent_head, agent_worker = _free_ports(5)
    ray = str(VENV_BIN / "ray")
    try:
        t0 = time.perf_counter()
        _run([ray, "start", "--head", f"--temp-dir={root / 'ray'}", f"--port={gcs}",
              "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
              f"--dashboard-agent-listen-port={agent_head}", f"--ray-client-server-port={client}",
              "--object-store-memory=200000000", "--disable-usage-stats"], env, timeout=240)
        t1 = time.perf_counter()
        _run([ray, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--num-gpus=0",
              "--resources", json.dumps({GENERATOR_RESOURCE: 1}),
              f"--dashboard-agent-listen-port={agent_worker}",
              "--object-store-memory=200000000", "--disable-usage-stats"], env, timeout=180)
        print(f"\nhead started in {t1 - t0:.1f}s, worker in {time.perf_counter() - t1:.1f}s")
        yield Cluster(root, f"http://127.0.0.1:{dashboard}", token, env)
    finally:
        _stop(_mark(root))
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_nodes(cluster: Cluster, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        status, body = _get(f"{cluster.dashboard_url}/api/v0/nodes", cluster.headers)
        if status == 200:
            nodes = json.loads(body)["data"]["result"]["result"]
            alive = [n for n in nodes if n["state"] == "ALIVE"]
            if len(alive) == 2 and any(GENERATOR_RESOURCE in n["resources_total"] for n in alive):
                return alive
        time.sleep(2)
    raise AssertionError(f"the two nodes did not come up in {timeout}s: {nodes}")


def _actors(cluster: Cluster) -> list[dict]:
    status, body = _get(f"{cluster.dashboard_url}/api/v0/actors?limit=1000&detail=1",
                        cluster.headers)
    assert status == 200, body
    return json.loads(body)["data"]["result"]["result"]


def _submit(client, timeout: float = 120, **kwargs) -> str:
    """submit_job, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def _wait_for_job(client, job_id: str, timeout: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job_id)
        print(f"job {job_id} ended {status}; its logs:\n{logs}")
        pytest.fail(f"job {job_id}: {status} after at most {timeout}s; logs:\n{logs[-4000:]}")
    return status


@pytest.mark.timeout(600)
def test_tiny_job_on_a_two_node_cluster_with_token_auth(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    from rlhf_ray.metrics import read_metrics

    t_start = time.perf_counter()
    with local_cluster() as cluster:
        nodes = _wait_for_nodes(cluster)
        assert sorted(n["resources_total"]["CPU"] for n in nodes) == [2.0, 2.0]

        # token auth is on: the Jobs API refuses a request without the token, or a wrong one
        jobs = f"{cluster.dashboard_url}/api/jobs/"
        assert _get(jobs)[0] == 401
        assert _get(jobs, {"Authorization": "Bearer " + "0" * 64})[0] == 403
        assert _get(jobs, cluster.headers)[0] == 200

        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
        out = cluster.root / "runs"
        run_dir = out / "job"
        t_job = time.perf_counter()
        job_id = _submit(
            client,
            # the generator is pinned to the second node by its custom resource
            entrypoint=f"rlhf-ray train --preset tiny run.output_dir={out} run.name=job "
                       f"run.steps=3 run.progress=false generator.resources.{GENERATOR_RESOURCE}=1",
            # the driver's ray.init brings env_vars of its own (HF_HUB_OFFLINE among them when
            # set); RAY_OVERRIDE_JOB_RUNTIME_ENV lets Ray merge the two instead of failing
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}},
        )
        _wait_for_job(client, job_id, JOB_TIMEOUT_S)
        print(f"job {job_id} succeeded in {time.perf_counter() - t_job:.1f}s")

        records = read_metrics(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3]
        # each step's trained batch has a reward; steps that scored new rollouts log their mean
        assert all(math.isfinite(r["learner/batch_reward_mean"]) for r in records)
        rollout_rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
        assert rollout_rewards and all(math.isfinite(x) for x in rollout_rewards)
        assert f"run directory: {run_dir}" in client.get_job_logs(job_id)
        worker = next(n["node_id"] for n in nodes if GENERATOR_RESOURCE in n["resources_total"])
        actors = _actors(cluster)
        generators = [a for a in actors if a["class_name"] == "Generator"]
        assert generators and all(a["node_id"] == worker for a in generators), generators
        # and the run used both nodes (3 CPUs' worth of actors, 2 CPUs per node)
        assert len({a["node_id"] for a in actors if a["class_name"] in (
            "Generator", "RewardScorer", "Learner")}) == 2, actors

        # deploy/submit.sh against the same cluster: address and token from the environment,
        # this repository uploaded as the working dir, the arguments passed to `rlhf-ray train`.
        # A config error ends the job at once, which is all this needs.
        t_sh = time.perf_counter()
        env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard_url}
        done = subprocess.run(["bash", str(REPO / "deploy" / "submit.sh"), "--preset", "tiny",
                               "run.steps=0"], env=env, capture_output=True, text=True,
                              timeout=180, cwd=cluster.root)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output  # `ray job submit` exits 1 for a failed job
        assert "rlhf-ray: error: run.steps=0: must be > 0" in output, output
        print(f"submit.sh round trip in {time.perf_counter() - t_sh:.1f}s")

    assert _processes_of(_mark(cluster.root)) == [], "processes of the test's cluster outlived it"
    # the session's own cluster was left alone
    assert ray_cluster.get(ray_cluster.remote(num_cpus=0)(lambda: 42).remote(), timeout=120) == 42
    print(f"total {time.perf_counter() - t_start:.1f}s")
