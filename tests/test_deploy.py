"""The deployment files in deploy/ against the package: every YAML parses, the commands they run
are real `rlhf-ray` subcommands with config keys that load, the image and the custom resource
names agree across the files and docs/cluster.md, and nothing turns token authentication off or
exposes the dashboard.

Only parsing and the package's own parser and config are checked here; KubeRay and the cluster
launcher themselves are not run (tests/test_cluster.py runs a real local cluster).

Decision on the dashboard: it is bound to 127.0.0.1 on the head everywhere (reached through
`kubectl port-forward` or `ray dashboard`), so `0.0.0.0` appears nowhere in deploy/, and no
manifest has a LoadBalancer, NodePort or Ingress.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import build_parser
from rlhf_ray.config import load_config
from tests.test_cluster import GENERATOR_RESOURCE

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "cluster.md"
IMAGE = "rlhf-ray:latest"
LEARNER_RESOURCE = "learner_node"
RESOURCES = {"generators": GENERATOR_RESOURCE, "learners": LEARNER_RESOURCE}
YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
TEXT_FILES = [*YAML_FILES, DEPLOY / "submit.sh", DEPLOY / "Dockerfile"]


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return doc


def _raycluster_spec() -> dict:
    return _kind(DEPLOY / "kuberay" / "raycluster.yaml", "RayCluster")["spec"]


def _rayjob() -> dict:
    return _kind(DEPLOY / "kuberay" / "rayjob.yaml", "RayJob")


def _launcher() -> dict:
    return _docs(DEPLOY / "cluster-launcher.yaml")[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml", _raycluster_spec()),
            ("rayjob.yaml", _rayjob()["spec"]["rayClusterSpec"])]


def _custom_resources(params: dict) -> dict:
    """KubeRay's rayStartParams.resources: a JSON string quoted once more for the shell,
    '"{\\"name\\": 1}"' in YAML."""
    value = params.get("resources")
    if value is None:
        return {}
    inner = json.loads(value)
    return json.loads(inner) if isinstance(inner, str) else inner


def _console_script() -> tuple[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
        scripts = dict(re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', section, re.M))
    else:
        scripts = tomllib.loads(text)["project"]["scripts"]
    assert len(scripts) == 1, scripts
    return next(iter(scripts.items()))


SCRIPT = _console_script()[0]


def load_train_command(argv: list[str]):
    """Parses `rlhf-ray ARGV` the way rlhf_ray.cli.main does and, for `train`, builds and
    validates the Config it would run (without running it)."""
    args, extra = build_parser().parse_known_args(argv)
    assert args.command == "train", f"{argv}: not `{SCRIPT} train`"
    assert all("=" in e and not e.startswith("-") for e in extra), f"unknown arguments {extra}"
    overrides = [*args.overrides, *extra]
    if args.sync:
        overrides.append("run.sync=true")
    if args.address:
        overrides.append(f"run.ray_address={args.address}")
    assert not args.resume, "a deploy example resumes a run directory that does not exist here"
    return load_config(preset=args.preset, files=args.config or [], overrides=overrides)


def test_every_yaml_under_deploy_parses():
    assert {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "cluster-launcher.yaml"}
    for path in YAML_FILES:
        assert _docs(path), f"{path} is empty"


def test_console_script_is_rlhf_ray_and_resolves():
    name, target = _console_script()
    assert name == "rlhf-ray"
    module, func = target.split(":")
    assert module == "rlhf_ray.cli" and func == "main"
    import rlhf_ray.cli

    assert callable(getattr(rlhf_ray.cli, func))


def test_rayjob_entrypoint_is_a_real_train_command_whose_config_loads():
    job = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == SCRIPT
    cfg = load_train_command(argv[1:])
    assert cfg.run.ray_address is None  # the job's driver joins through RAY_ADDRESS
    # the run directory is on the shared volume of every pod of the job's cluster
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get(cfg.run.output_dir) in claims, (cfg.run.output_dir, mounts)
    # each role is pinned to its group's custom resource, and the groups (at their initial
    # replicas; the head advertises nothing) have what the run asks for: CPUs and units
    assert cfg.generator.resources == {GENERATOR_RESOURCE: 1.0}
    assert cfg.scorer.resources == {GENERATOR_RESOURCE: 1.0}
    assert cfg.learner.resources == {LEARNER_RESOURCE: 1.0}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group, roles in (("generators", (cfg.generator, cfg.scorer)), ("learners", (cfg.learner,))):
        g = groups[group]
        have_cpu = float(g["rayStartParams"]["num-cpus"]) * g["replicas"]
        have_units = _custom_resources(g["rayStartParams"])[RESOURCES[group]] * g["replicas"]
        need_cpu = sum(r.num * r.num_cpus for r in roles)
        need_units = sum(r.num * r.resources[RESOURCES[group]] for r in roles)
        assert need_cpu <= have_cpu and need_units <= have_units, (group, need_cpu, have_cpu,
                                                                   need_units, have_units)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_rayjob_pvc_is_shared_and_the_same_as_the_rayclusters():
    for path in (DEPLOY / "kuberay" / "raycluster.yaml", DEPLOY / "kuberay" / "rayjob.yaml"):
        pvc = _kind(path, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == "rlhf-ray-runs"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (_kind(DEPLOY / "kuberay" / "raycluster.yaml", "PersistentVolumeClaim")
            == _kind(DEPLOY / "kuberay" / "rayjob.yaml", "PersistentVolumeClaim"))


def test_rayjob_runs_the_same_cluster_as_raycluster():
    cluster = json.loads(json.dumps(_raycluster_spec()))
    job_cluster = json.loads(json.dumps(_rayjob()["spec"]["rayClusterSpec"]))
    # SidecarMode (the submitter in the head pod, which reaches the 127.0.0.1 dashboard) needs a
    # head pod that does not restart; that is the only difference
    assert _rayjob()["spec"]["submissionMode"] == "SidecarMode"
    assert job_cluster["headGroupSpec"]["template"]["spec"].pop("restartPolicy") == "Never"
    assert job_cluster == cluster


def _submit_sh(tmp_path: Path, *args: str, env: dict | None = None):
    """Runs deploy/submit.sh with a stand-in `ray` first on PATH that records its argv and cwd."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    record = tmp_path / "ray-argv.json"
    (fake / "ray").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        f"'mode': os.environ.get('RAY_AUTH_MODE')}}, open({str(record)!r}, 'w'))\n")
    (fake / "ray").chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "RLHF_RAY_OUTPUT", "RLHF_RAY_RUNTIME"))}
    base.update(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path),
                RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    base.update(env or {})
    done = subprocess.run(["bash", str(DEPLOY / "submit.sh"), *args], env=base,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    called = json.loads(record.read_text()) if record.exists() else None
    return done, called


def test_submit_sh_submits_rlhf_ray_train_with_the_arguments(tmp_path):
    done, called = _submit_sh(tmp_path, "--preset", "tiny", "run.steps=3", "generator.num=2")
    assert done.returncode == 0, done.stderr
    argv = called["argv"]
    sep = argv.index("--")
    submit, command = argv[:sep], argv[sep + 1:]
    assert submit[:2] == ["job", "submit"]
    flags = dict(zip(submit[2::2], submit[3::2]))
    assert flags["--address"] == "http://127.0.0.1:8265"
    assert flags["--working-dir"] == "." and Path(called["cwd"]) == REPO
    runtime_env = json.loads(flags["--runtime-env-json"])
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert {".venv", "runs", ".git"} <= set(runtime_env["excludes"])
    assert called["mode"] == "token"
    assert command[0] == SCRIPT
    cfg = load_train_command(command[1:])
    assert (cfg.run.steps, cfg.generator.num, cfg.model.name) == (3, 2, "tiny-llama")


def test_submit_sh_takes_address_and_output_dir_from_the_environment(tmp_path):
    done, called = _submit_sh(tmp_path, "--preset", "tiny", env={
        "RAY_ADDRESS": "http://10.1.2.3:8265", "RLHF_RAY_OUTPUT_DIR": "/mnt/runs"})
    assert done.returncode == 0, done.stderr
    argv = called["argv"]
    assert argv[argv.index("--address") + 1] == "http://10.1.2.3:8265"
    cfg = load_train_command(argv[argv.index("--") + 2:])
    assert cfg.run.output_dir == "/mnt/runs"


def test_submit_sh_refuses_disabled_auth_and_a_missing_token(tmp_path):
    done, called = _submit_sh(tmp_path, "--preset", "tiny", env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 2 and called is None
    assert "only token authentication" in done.stderr
    done, called = _submit_sh(tmp_path, "--preset", "tiny", env={"RAY_AUTH_TOKEN_PATH": ""})
    assert done.returncode == 2 and called is None
    assert "no Ray token" in done.stderr
    done, _ = _submit_sh(tmp_path, "--help")
    assert done.returncode == 0 and "usage: deploy/submit.sh" in done.stdout


def test_one_image_everywhere():
    images = set()
    for _, spec in _cluster_specs():
        pods = [spec["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
        images |= {c["image"] for pod in pods for c in pod["containers"]}
    assert images == {IMAGE}
    assert f"-t {IMAGE}" in (DEPLOY / "Dockerfile").read_text()
    assert IMAGE in DOCS.read_text()


def test_worker_groups_scale_separately_and_declare_their_resources():
    for name, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name  # no actors on the head
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == set(RESOURCES), name
        pods = [("head", head), *groups.items()]
        for group, g in pods:
            (container,) = g["template"]["spec"]["containers"]
            res = container["resources"]
            for part in ("requests", "limits"):
                assert "cpu" in res[part] and "memory" in res[part], (name, group, part)
            if group == "head":
                continue
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, group)
            params = g["rayStartParams"]
            # Ray advertises what the pod gets
            assert float(params["num-cpus"]) == float(res["limits"]["cpu"]), (name, group)
            assert RESOURCES[group] in _custom_resources(params), (name, group)
            gpus = res["limits"].get("nvidia.com/gpu")
            if gpus is not None:
                assert group == "learners", (name, group)
                assert res["requests"].get("nvidia.com/gpu") == gpus
                assert float(params["num-gpus"]) == float(gpus)


def test_custom_resource_names_match_across_files_and_docs():
    names = set()
    for _, spec in _cluster_specs():
        for g in spec["workerGroupSpecs"]:
            names |= set(_custom_resources(g["rayStartParams"]))
    launcher = _launcher()["available_node_types"]
    launcher_names = {k for t in launcher.values() for k in t["resources"]
                      if k not in ("CPU", "GPU", "memory")}
    assert names == launcher_names == set(RESOURCES.values())
    docs = DOCS.read_text()
    for resource in RESOURCES.values():
        assert f"`{resource}`" in docs, resource


def test_cluster_launcher_node_types_and_setup():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert set(types) == {"head", "generator", "learner"}
    assert cfg["head_node_type"] == "head"
    assert types["head"]["resources"]["CPU"] == 0
    assert GENERATOR_RESOURCE in types["generator"]["resources"]
    assert LEARNER_RESOURCE in types["learner"]["resources"]
    for name, t in types.items():
        assert "CPU" in t["resources"], name
        assert t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in types.values()) <= cfg["max_workers"]
    setup = cfg["setup_commands"]
    torch = [i for i, c in enumerate(setup) if "torch==2.13.0" in c]
    remote_repo = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert len(remote_repo) == 1
    package = [i for i, c in enumerate(setup) if re.search(
        r"pip install .*(-e )?" + re.escape(remote_repo[0].replace("/home/ubuntu", "~")), c)]
    assert torch and package and torch[0] < package[0], setup
    for c in [*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, c
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    # the token reaches every node from the user's ~/.ray/auth_token, not from this file
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_dockerfile_installs_torch_before_the_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12-slim\b", text, re.M)
    runs = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line.startswith("RUN ")]
    torch = [i for i, r in enumerate(runs) if "pip install" in r and "torch==2.13.0" in r]
    package = [i for i, r in enumerate(runs) if re.search(r"pip install (-e )?\.(\s|$)", r)]
    assert torch and package and torch[0] < package[0], runs
    assert not any("torch" in r for r in runs[package[0]:] if "pip install" in r)
    # what the Dockerfile COPYs is what `pip install .` needs
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY "))
    for path in ("pyproject.toml", "README.md", "rlhf_ray"):
        assert path in copied


def test_no_manifest_disables_token_auth_or_exposes_the_dashboard():
    for path in TEXT_FILES:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), path
        assert "0.0.0.0" not in text, path
        assert not re.search(r"\b(LoadBalancer|NodePort)\b", text), path
        # no literal token anywhere: only names of where it comes from
        assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*['\"]?[A-Za-z0-9+/]{16,}", text), path
    kinds = {d["kind"] for p in YAML_FILES for d in _docs(p) if "kind" in d}
    assert kinds <= {"RayCluster", "RayJob", "PersistentVolumeClaim"}, kinds  # no Service/Ingress
    for name, spec in _cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}, name
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1", name
        pods = [head["template"]["spec"],
                *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
        for pod in pods:
            for c in pod["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", "token") == "token", name


@pytest.mark.parametrize("command", ["kubectl port-forward", "deploy/submit.sh",
                                     "generator.resources.generator_node=1",
                                     "learner.resources.learner_node=1",
                                     "ray up deploy/cluster-launcher.yaml", "ray job logs",
                                     "ray start --head", "--address auto"])
def test_docs_give_the_commands(command):
    assert command in DOCS.read_text()
