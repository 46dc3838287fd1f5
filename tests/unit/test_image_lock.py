"""The images' lock files against the Dockerfile and pyproject.toml (read as text: no engine, no network).

Each CUDA flavour of the Dockerfile declares the CUDA version it needs (NVIDIA_REQUIRE_CUDA, which the
NVIDIA container toolkit checks against the driver); the torch build its lock pins decides the CUDA it
really runs. Every image is built on one Python image, the version the locks were resolved for. And
every lock still satisfies pyproject.toml (what `pip check` would find only at image build time).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
# What the locks are resolved for (scripts/lock.sh): CPython 3.11 on x86-64 Linux.
ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
}


def read_lock(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) for a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[Version, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^]]*\])?==(\S+)", line):
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = (Version(m.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def dockerfile_stages() -> dict[str, dict[str, str]]:
    """Stage name -> {"FROM": base, ENV name: value} from the Dockerfile (line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line):
            current = {"FROM": m.group(1)}
            stages[m.group(2) or f"stage{len(stages)}"] = current
        elif line.startswith("ENV "):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line[4:]):
                current[key] = value.strip('"')
    return stages


def global_args() -> dict[str, str]:
    """The Dockerfile's ARGs before its first FROM, with their defaults."""
    text = (ROOT / "Dockerfile").read_text()
    head = text[: text.index("\nFROM ")]
    return dict(re.findall(r"^ARG (\w+)=(\S+)", head, flags=re.M))


def lock_cuda_version(pins: dict[str, tuple[Version, int]]) -> str | None:
    """The CUDA major.minor a lock's torch runs on, from the CUDA runtime it pins (None: no CUDA)."""
    runtime = [v for n, (v, _) in pins.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", n)]
    if not runtime:
        return None
    (version,) = runtime
    return f"{version.major}.{version.minor}"


def runtime_stages() -> dict[str, dict[str, str]]:
    return {name: env for name, env in dockerfile_stages().items() if name.startswith("runtime-")}


def test_every_flavour_has_a_lock_and_the_cpu_one_has_no_cuda() -> None:
    stages = runtime_stages()
    assert {"runtime-cpu", "runtime-cuda"} <= set(stages)
    cpu = read_lock(ROOT / stages["runtime-cpu"]["HUVIDPO_LOCK"])
    assert cpu["torch"][0].local == "cpu"
    assert lock_cuda_version(cpu) is None
    assert not [n for n in cpu if n.startswith(("nvidia-", "cuda-"))]
    assert "NVIDIA_REQUIRE_CUDA" not in stages["runtime-cpu"]
    assert "NVIDIA_REQUIRE_CUDA" in stages["runtime-cuda"]  # else the test below checks nothing


@pytest.mark.parametrize(
    "stage", sorted(n for n, e in runtime_stages().items() if "NVIDIA_REQUIRE_CUDA" in e)
)
def test_cuda_flavour_requires_the_cuda_version_its_torch_build_runs_on(stage: str) -> None:
    """NVIDIA_REQUIRE_CUDA names the build's CUDA major version and at most its minor version.

    A driver of that major version runs the build (CUDA's minor-version compatibility); an older one
    does not, and the NVIDIA container toolkit then refuses to start the container, naming both,
    instead of torch quietly finding no GPU.
    """
    env = runtime_stages()[stage]
    declared = re.fullmatch(r"cuda>=(\d+)\.(\d+)", env["NVIDIA_REQUIRE_CUDA"])
    assert declared, env["NVIDIA_REQUIRE_CUDA"]
    lock = ROOT / env["HUVIDPO_LOCK"]
    if lock.exists():
        pins = read_lock(lock)
        built = lock_cuda_version(pins)
        assert built, f"{lock.name} installs no CUDA runtime"
        torch = pins["torch"][0]
        # PyPI's plain torch is a CUDA build (13.0 for 2.13); PyTorch's own index labels it (+cu126).
        assert torch.local in (None, "cu" + built.replace(".", "")), (torch, built)
        if torch.local is None:
            assert not env["HUVIDPO_TORCH_INDEX"], "PyPI's torch, so no other index"
        # Every CUDA library of the lock is built for that major version (nvidia-nccl-cu13, ...).
        suffixed = {n: m.group(1) for n in pins if (m := re.search(r"-cu(\d+)$", n))}
        assert suffixed and set(suffixed.values()) == {built.split(".")[0]}, suffixed
        if "cuda-toolkit" in pins:
            toolkit = pins["cuda-toolkit"][0]
            assert f"{toolkit.major}.{toolkit.minor}" == built, toolkit
    else:
        # The cu126 fallback's lock needs PyTorch's index (`make lock CU126=1`): its input names the
        # torch build, and the flavour installs from that build's index.
        (source,) = [p for p in REQUIREMENTS.glob("*.in") if f"lock-{p.stem}.txt" == lock.name]
        (torch_req,) = [Requirement(ln) for ln in source.read_text().splitlines() if ln.startswith("torch")]
        (pin,) = torch_req.specifier
        label = Version(pin.version).local or ""
        m = re.fullmatch(r"cu(\d+)(\d)", label)
        assert m, (stage, pin)
        built = f"{m.group(1)}.{m.group(2)}"
        assert env["HUVIDPO_TORCH_INDEX"].endswith("/" + label)
        assert f"-o requirements/{lock.name}" in (ROOT / "scripts" / "lock.sh").read_text()
    major, minor = (int(x) for x in built.split("."))
    assert int(declared.group(1)) == major, (
        f"{stage} requires CUDA {declared.group(1)}.x, its torch is {built}"
    )
    assert int(declared.group(2)) <= minor, f"{stage} requires more than its torch's CUDA {built}"


def test_every_image_runs_the_python_the_locks_and_the_tests_are_for() -> None:
    stages = dockerfile_stages()
    external = {env["FROM"] for name, env in stages.items() if env["FROM"].split(":")[0] not in stages}
    external -= {"runtime-${FLAVOR}"}
    assert external == {"${PYTHON_IMAGE}"}, f"every image starts from PYTHON_IMAGE, not {external}"
    image = global_args()["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", image)
    assert m, image
    python = f"{m.group(1)}.{m.group(2)}"
    assert f"--python-version {python}" in (ROOT / "scripts" / "lock.sh").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["mypy"]["python_version"] == python
    assert pyproject["tool"]["ruff"]["target-version"] == "py" + python.replace(".", "")
    assert python == ENVIRONMENT["python_version"]


def pyproject_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize(
    ("lock", "extras", "torch_in"),
    [
        ("lock-dev.txt", ("server", "dev"), "cpu.in"),
        ("lock-cpu.txt", ("server",), "cpu.in"),
        ("lock-cuda.txt", ("server",), "cuda.in"),
    ],
)
def test_lock_satisfies_pyproject_and_hashes_every_pin(
    lock: str, extras: tuple[str, ...], torch_in: str
) -> None:
    """A dependency added or narrowed in pyproject.toml without `make lock` fails here, not in a build."""
    pins = read_lock(REQUIREMENTS / lock)
    unhashed = [n for n, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"{lock}: no hash for {unhashed}"
    wanted = pyproject_requirements(extras)
    wanted += [
        Requirement(ln) for ln in (REQUIREMENTS / torch_in).read_text().splitlines() if ln[:1].isalpha()
    ]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate(ENVIRONMENT):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req} (run `make lock`)"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{lock} pins {name}=={pins[name][0]}, pyproject wants {req} (run `make lock`)"
        )
    # What the tests ran is what the images run: the image locks share the dev lock's versions.
    if lock != "lock-dev.txt":
        dev = read_lock(REQUIREMENTS / "lock-dev.txt")
        differ = {
            n: (v, dev[n][0]) for n, (v, _) in pins.items() if n in dev and n != "torch" and dev[n][0] != v
        }
        assert not differ, differ


def test_the_tests_python_dateutil_is_the_one_the_images_get() -> None:
    # kubernetes 37.0.1 allows python-dateutil 4, which botocore (moto, in the tests) refuses.
    for lock in ("lock-dev.txt", "lock-cpu.txt", "lock-cuda.txt"):
        assert read_lock(REQUIREMENTS / lock)["python-dateutil"][0] < Version("3"), lock
