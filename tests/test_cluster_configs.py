"""Every file under cluster/ is loaded and checked, so none of them can rot unnoticed.

Launcher YAMLs go through Ray's own preparation and JSON-schema validation (what `ray up` runs
before it touches a cloud); KubeRay manifests are checked for the keys the operator needs; the
runtime envs through Ray's RuntimeEnv parser; the Dockerfile through a small instruction parser.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
RUNTIME_ENVS = ["runtime_env.yaml", "runtime_env.local.yaml"]
FFCV_DEPS = ("libopencv-dev", "libturbojpeg0-dev", "pkg-config")
PINS = ("torch==2.14.1", "torchvision==0.29.1")


def all_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_under_cluster_is_claimed_by_a_check():
    """A new YAML must be added to one of the checks below, not silently skipped."""
    claimed = set(LAUNCHER_YAMLS) | set(RUNTIME_ENVS) | {str(p.relative_to(CLUSTER)) for p in kuberay_files()}
    found = {str(p.relative_to(CLUSTER)) for p in all_yaml_files()}
    assert found, "cluster/ holds no YAML"
    assert found == claimed, f"unchecked: {sorted(found - claimed)}; missing: {sorted(claimed - found)}"


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_to_mappings(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), path


# ----------------------------------------------------------------------------- Ray launcher

def prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(yaml.safe_load((CLUSTER / name).read_text())))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_config_passes_rays_validation(name):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(name))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_validation_rejects_a_broken_copy(name):
    """The validation above can fail: a misspelt key and an unknown head type are caught."""
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = prepared(name)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["head"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        validate_config(bad)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_has_cpu_head_and_gpu_workers_in_the_sslray_image(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert len(workers) >= 3, "offer a small and a large GPU type at least"
    for k, v in workers.items():
        assert k.startswith("gpu_"), k
        assert 0 <= v["min_workers"] <= v["max_workers"] <= cfg["max_workers"], k
    text = (CLUSTER / name).read_text()
    provider = cfg["provider"]["type"]
    wanted = {"aws": ("g5.", "p4d.", "p5."), "gcp": ("g2-", "a2-", "a3-")}[provider]
    for prefix in wanted:
        assert prefix in text, f"{name}: no {prefix}* worker type"
    assert cfg["docker"]["image"].endswith("sslray:0.1.0")
    assert any("sslray" in c for c in cfg["setup_commands"])
    # MLflow on the head, the tracking URI and token auth in every node's Ray environment.
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ".join(cfg["worker_start_ray_commands"])
    assert "start_mlflow.sh" in head_cmds
    for cmds in (head_cmds, worker_cmds):
        assert "MLFLOW_TRACKING_URI=" in cmds and "RAY_AUTH_MODE=token" in cmds
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# ----------------------------------------------------------------------------- KubeRay

def kuberay_files() -> list[Path]:
    return sorted((CLUSTER / "kuberay").glob("*.yaml"))


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{i}", d) for p in kuberay_files() for i, d in enumerate(load_docs(p))]


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container without name or image"
        assert "sslray" in c["image"], f"{where}: {c['image']} is not the sslray image"
    return containers


def check_cluster_spec(spec: dict, where: str) -> None:
    assert str(spec["rayVersion"]) == "2.60.0", where
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    head_containers = check_pod_template(head["template"], f"{where}.headGroupSpec")
    ports = {p["containerPort"] for c in head_containers for p in c.get("ports", [])}
    assert 8265 in ports, f"{where}: the job server port 8265 is not exposed"
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert g["groupName"] and isinstance(g["rayStartParams"], dict), w
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], w
        containers = check_pod_template(g["template"], w)
        assert any(c["resources"]["limits"].get("nvidia.com/gpu") for c in containers), f"{w}: no GPU"


def test_kuberay_has_a_raycluster_and_a_rayjob():
    kinds = [d["kind"] for _, d in kuberay_docs()]
    assert "RayCluster" in kinds and "RayJob" in kinds


@pytest.mark.parametrize("where,doc", kuberay_docs(), ids=[w for w, _ in kuberay_docs()])
def test_kuberay_manifest_has_required_keys(where, doc):
    assert doc.get("metadata", {}).get("name"), f"{where}: metadata.name"
    kind = doc["kind"]
    if kind == "PersistentVolumeClaim":
        assert doc["apiVersion"] == "v1" and doc["spec"]["accessModes"] and doc["spec"]["resources"]["requests"]
        return
    assert doc["apiVersion"] == "ray.io/v1", where
    if kind == "RayCluster":
        check_cluster_spec(doc["spec"], where)
    elif kind == "RayJob":
        spec = doc["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["sslray", "pretrain"] or argv[:2] == ["sslray", "tune"], where
        for flag in ("--data", "--val", "--storage"):
            assert flag in argv, f"{where}: entrypoint lacks {flag}"
        assert "MLFLOW_TRACKING_URI" in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], where
        assert spec["shutdownAfterJobFinishes"] is True, where
        check_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    else:
        pytest.fail(f"{where}: unexpected kind {kind}")


def test_kuberay_volumes_are_declared():
    claims = {d["metadata"]["name"] for _, d in kuberay_docs() if d["kind"] == "PersistentVolumeClaim"}
    used = set(re.findall(r"claimName: (\S+)\}", "".join(p.read_text() for p in kuberay_files())))
    assert used and used <= claims, f"claims used but not declared: {sorted(used - claims)}"


# ----------------------------------------------------------------------------- runtime envs

@pytest.mark.parametrize("name", RUNTIME_ENVS)
def test_runtime_env_parses_and_excludes_local_state(name, monkeypatch):
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)  # paths in it are relative to the repo root, as for `ray job submit`
    raw = yaml.safe_load((CLUSTER / name).read_text())
    env = RuntimeEnv(**raw)
    assert raw["working_dir"] == "."
    for must in (".venv", "data", "runs", "mlflow.db", "mlartifacts", "*.beton", ".git"):
        assert must in raw["excludes"], f"{name}: does not exclude {must}"
    if name == "runtime_env.yaml":
        pkgs = env.pip_config()["packages"]
        for pin in PINS:
            assert pin in pkgs, f"{name}: {pin} not pinned"
        assert all("==" in p for p in pkgs), f"unpinned: {[p for p in pkgs if '==' not in p]}"
        assert not any(p.lower().startswith("ray") for p in pkgs), "a job must use the cluster's own Ray"
    else:
        assert "pip" not in raw, "the local env must not make Ray clone the shared venv"


def test_runtime_envs_exclude_the_same_paths():
    a, b = (yaml.safe_load((CLUSTER / n).read_text())["excludes"] for n in RUNTIME_ENVS)
    assert a == b


def test_requirements_match_setup_cfg():
    """Every install_requires package is pinned in cluster/requirements.txt (Ray: in the Dockerfile)."""
    import configparser

    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    deps = [re.split(r"[<>=\[ ]", d.strip())[0].lower() for d in cp["options"]["install_requires"].split("\n") if d]
    pinned = {line.split("==")[0].lower() for line in (CLUSTER / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    missing = [d for d in deps if d != "ray" and d not in pinned]
    assert not missing, f"cluster/requirements.txt lacks {missing}"


def test_every_source_folder_is_a_package_the_wheel_holds():
    """`pip install .` (the cluster image) packs what setup.cfg's `packages = find:` finds: a folder of
    modules without __init__.py is left out with all below it. sslray/raytrain had none, so the installed
    sslray had no training code (jobs worked only because the submitted working_dir came first)."""
    import configparser

    from setuptools import find_packages

    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    include = cp["options.packages.find"]["include"].replace(",", " ").split()
    found = set(find_packages(str(REPO), include=include))
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sslray").rglob("*.py")}
    assert folders - found == set()


# ----------------------------------------------------------------------------- Dockerfile

DOCKER_KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                   "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined.
    Raises ValueError for an unknown instruction, a non-ARG line before FROM, or a dangling `\\`."""
    out: list[tuple[str, str]] = []
    buf = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):  # comment lines may sit inside a continued RUN
            continue
        if not line and not buf:
            continue
        cont = line.endswith("\\")
        buf += (line[:-1] if cont else line) + " "
        if cont:
            continue
        word, _, args = buf.strip().partition(" ")
        if word.upper() not in DOCKER_KEYWORDS:
            raise ValueError(f"line {lineno}: unknown instruction {word!r}")
        if not args.strip():
            raise ValueError(f"line {lineno}: {word} without arguments")
        out.append((word.upper(), args.strip()))
        buf = ""
    if buf.strip():
        raise ValueError("the last instruction ends with an unfinished line continuation")
    firsts = [i for i, _ in out if i != "ARG"]
    if not firsts or firsts[0] != "FROM":
        raise ValueError("the first instruction (after ARGs) must be FROM")
    return out


def test_dockerfile_parser_catches_broken_files():
    for bad in ("RUN echo hi\nFROM ubuntu", "FROM ubuntu\nRUNN echo", "FROM ubuntu\nRUN a \\\n"):
        with pytest.raises(ValueError):
            parse_dockerfile(bad)
    assert parse_dockerfile("ARG V=1\nFROM x:$V\n# c\nRUN a \\\n  # inner\n  && b\n") == [
        ("ARG", "V=1"), ("FROM", "x:$V"), ("RUN", "a  && b")]


def test_dockerfile_builds_a_cuda_image_with_ffcv_deps_and_pins():
    steps = parse_dockerfile((CLUSTER / "Dockerfile").read_text())
    kinds = [k for k, _ in steps]
    assert kinds.count("FROM") == 1 and "nvidia/cuda" in steps[kinds.index("FROM")][1]
    runs = " ".join(a for k, a in steps if k == "RUN")
    for dep in FFCV_DEPS:
        assert dep in runs, f"Dockerfile does not install {dep}"
    for pin in PINS:
        assert pin in runs, f"Dockerfile does not pin {pin}"
    assert "ray[train,tune,default]==${RAY_VERSION}" in runs and "RAY_VERSION=2.60.0" in " ".join(
        a for k, a in steps if k == "ARG")
    assert "requirements.txt" in runs and "pip install --no-deps ." in runs
    copies = [a.split()[0] for k, a in steps if k == "COPY"]
    for src in ("sslray", "cluster", "cluster/requirements.txt"):
        assert src in copies, f"Dockerfile does not COPY {src}"
        assert (REPO / src).exists()


def test_start_mlflow_script_is_executable_and_valid_bash():
    import os
    import subprocess

    script = CLUSTER / "start_mlflow.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    text = script.read_text()
    for knob in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "--serve-artifacts"):
        assert knob in text
