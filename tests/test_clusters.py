"""clusters/: every manifest parses, names files and flags that exist, and pins what
pyproject.toml pins (images included); the README's submit commands are real commands."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from malloc_ray.cli import build_parser
from malloc_ray.study.spec import load_spec

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
YAMLS = sorted(CLUSTERS.rglob("*.yaml"))
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)(-gpu)?$")


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTERS / name).read_text()))


def by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d.get("kind") == kind]
    return doc


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in pyproject()["dependencies"]}


def same(a: Requirement, b: Requirement) -> bool:
    return (a.name, a.extras, a.specifier, a.marker) == (b.name, b.extras, b.specifier, b.marker)


def runtime_envs() -> dict[str, dict]:
    job = by_kind("kuberay/rayjob.yaml", "RayJob")
    return {"runtime_env.yaml": load("runtime_env.yaml")[0],
            "rayjob.yaml": yaml.safe_load(job["spec"]["runtimeEnvYAML"])}


def pip_lists() -> dict[str, list[str]]:
    """Every pip package list the cluster files install, by where it comes from."""
    lists = {name: env["pip"]["packages"] for name, env in runtime_envs().items()}
    for i, command in enumerate(load("aws.yaml")[0]["setup_commands"]):
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            lists[f"aws.yaml setup_commands[{i}]"] = words[2:]
    return lists


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"],
            "rayjob.yaml": by_kind("kuberay/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def images() -> list[str]:
    found = [c["image"] for spec in cluster_specs().values() for c in containers(spec)]
    docker = load("aws.yaml")[0]["docker"]
    return found + [docker["image"], docker["head_image"]]


def readme_commands() -> list[str]:
    """Commands of the README's ```console blocks (cluster-only): `$ ` lines, continued by
    trailing backslashes."""
    text = (CLUSTERS / "README.md").read_text()
    commands = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line[2:].strip() for line in joined.splitlines() if line.startswith("$ ")]
    return commands


def study_invocations(entrypoint: str) -> list[list[str]]:
    """`python -m malloc_ray ...` argument lists inside an entrypoint shell string."""
    found = []
    for part in entrypoint.split("&&"):
        words = shlex.split(part)
        if words[:3] == ["python", "-m", "malloc_ray"]:
            found.append(words[3:])
    return found


def check_study_command(args: list[str]) -> None:
    """The CLI accepts it, and the spec it names exists and loads."""
    assert importlib.util.find_spec("malloc_ray.__main__") is not None
    parsed = build_parser().parse_args(args)
    assert parsed.command == "study", args
    spec = REPO / parsed.spec
    assert spec.is_file(), f"{parsed.spec} named by a cluster command does not exist"
    load_spec(spec)
    assert parsed.shared_storage and parsed.output_dir.startswith("/mnt/shared/"), \
        "cluster studies must write to the shared volume and say so"


# -- parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_every_yaml_parses_into_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_the_expected_files_exist():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared.yaml",
                 "aws.yaml", "runtime_env.yaml", "README.md"):
        assert (CLUSTERS / name).is_file(), name


# -- pins ------------------------------------------------------------------------------------
def test_pip_pins_agree_with_pyproject():
    expected = {name: req for name, req in pins().items() if name != "ray"}
    for where, packages in pip_lists().items():
        got = {Requirement(p).name: Requirement(p) for p in packages}
        assert set(got) == set(expected), (where, set(got) ^ set(expected))
        for name, req in got.items():
            assert same(req, expected[name]), (where, str(req), str(expected[name]))


def test_images_satisfy_the_ray_and_python_pins():
    ray_pin, python_pin = pins()["ray"].specifier, pyproject()["requires-python"]
    for image in images():
        match = RAY_IMAGE.match(image)
        assert match, f"unexpected image {image}"
        assert Version(match["ray"]) in ray_pin, image
        assert Version(f"{match['py']}.{match['minor']}") in Requirement(
            f"python{python_pin}").specifier, image
    for name, spec in cluster_specs().items():
        ray_versions = {RAY_IMAGE.match(c["image"])["ray"] for c in containers(spec)}
        assert ray_versions == {spec["rayVersion"]}, name


def test_mlflow_server_image_satisfies_the_mlflow_pin():
    deployment = by_kind("kuberay/shared.yaml", "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    version = server["image"].rsplit(":v", 1)[1]
    assert Version(version) in pins()["mlflow"].specifier


# -- consistency between files ----------------------------------------------------------------
def test_rayjob_runs_the_raycluster_and_the_runtime_env():
    specs = cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"]
    envs = runtime_envs()
    shared = {k: v for k, v in envs["runtime_env.yaml"].items() if k != "excludes"}
    job = dict(envs["rayjob.yaml"])
    assert job.pop("working_dir").endswith(".zip")  # a remote code archive: no local upload
    assert job == shared


def test_every_ray_pod_mounts_the_shared_volume_and_gets_the_tracking_uri():
    claim = by_kind("kuberay/shared.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    service = by_kind("kuberay/shared.yaml", "Service")
    uri = runtime_envs()["runtime_env.yaml"]["env_vars"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for name, spec in cluster_specs().items():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in pod["volumes"] if "persistentVolumeClaim" in v}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert claims[mounts["/mnt/shared"]] == claim["metadata"]["name"], name
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert env["MLFLOW_TRACKING_URI"] == uri, name
        workers = spec["workerGroupSpecs"]
        assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                   for g in workers for c in g["template"]["spec"]["containers"]), name


def test_aws_nodes_mount_shared_storage_and_run_the_tracking_server():
    config = load("aws.yaml")[0]
    assert "-v /mnt/efs:/mnt/shared" in config["docker"]["run_options"]
    assert any("/mnt/efs" in c and "mount -t nfs4" in c
               for c in config["initialization_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "MLFLOW_TRACKING_URI=" in head
    assert "--dashboard-host=127.0.0.1" in head


# -- commands --------------------------------------------------------------------------------
def test_rayjob_entrypoint_is_a_real_study_command():
    entrypoint = by_kind("kuberay/rayjob.yaml", "RayJob")["spec"]["entrypoint"]
    invocations = study_invocations(entrypoint)
    assert len(invocations) == 1
    check_study_command(invocations[0])


def test_readme_ray_job_submit_commands_name_existing_files():
    submits = [c for c in readme_commands() if " job submit " in f" {c} "]
    assert submits, "the README shows no `ray job submit` command"
    for command in submits:
        words = shlex.split(command.split("ray job submit", 1)[1])
        options, entrypoint = words[:words.index("--")], words[words.index("--") + 1:]
        assert "--working-dir" in options
        assert options[options.index("--working-dir") + 1] == "."
        if "--runtime-env" in options:
            assert (REPO / options[options.index("--runtime-env") + 1]).is_file()
        invocations = study_invocations(" ".join(shlex.quote(w) for w in entrypoint)
                                        if len(entrypoint) > 1 else entrypoint[0])
        assert len(invocations) == 1, command
        check_study_command(invocations[0])


def test_readme_names_only_existing_cluster_files():
    text = (CLUSTERS / "README.md").read_text()
    for path in set(re.findall(r"clusters/[\w/.-]+\.(?:yaml|md)", text)):
        assert (REPO / path).is_file(), path
