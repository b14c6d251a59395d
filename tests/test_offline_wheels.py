"""scripts/offline_wheels.sh end to end: resolve and download from the package index, then an
offline `--no-index` install into a fresh venv that stands for the host.

These tests need the package index (CI has it); they are skipped, with the reason, only when a
probe download from it fails. The target is this interpreter's Python on this machine's
platform, so the fresh venv can install what was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "offline_wheels.sh"
HELPER = REPO / "scripts" / "offline_wheels.py"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
# A small pure-Python package with dependencies: rich needs markdown-it-py (which needs mdurl)
# and pygments. Pinned, so the expected set cannot drift with new releases.
RICH = "rich==14.0.0"
HOST_PYGMENTS = "2.19.1"

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the script targets Linux hosts")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of the 'host' package, downloaded once; skips the module if the index is unreachable."""
    d = tmp_path_factory.mktemp("host-wheels")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(d)]
        + [f"pygments=={HOST_PYGMENTS}"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"package index unreachable (pip download failed: {last})")
    return d


@pytest.fixture(scope="module")
def host(index: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh venv standing for the offline host, with pygments already installed (offline), and
    its `pip list --format=freeze`."""
    root = tmp_path_factory.mktemp("host")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, index.glob("*.whl"))],
        check=True,
        timeout=300,
    )
    freeze = root / "freeze.txt"
    out = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout
    freeze.write_text(out)
    assert f"Pygments=={HOST_PYGMENTS}" in out or f"pygments=={HOST_PYGMENTS}" in out
    return py, freeze


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_downloads_missing_wheels_and_installs_offline(host: tuple[Path, Path], tmp_path: Path) -> None:
    py, freeze = host
    dest = tmp_path / "wheels"
    proc = run_script("--host-freeze", str(freeze), "--dest", str(dest), "--smoke-import", "rich", RICH)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((dest / "plan.json").read_text())
    names = {w["name"] for w in plan["wheels"]}
    assert names == {"rich", "markdown-it-py", "mdurl"}  # pygments is the host's: not downloaded
    assert not list((dest / "wheels").glob("pygments-*"))
    for w in plan["wheels"]:  # the files are the index's, byte for byte
        assert sha256(dest / "wheels" / w["filename"]) == w["sha256"]
    assert (dest / "requirements.lock").read_text().count("--hash=sha256:") == 3
    assert "install.sh" in proc.stdout

    inst = subprocess.run(
        ["bash", str(dest / "batch-01" / "install.sh"), "--python", str(py), "--wheels", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stderr
    assert "import rich: ok" in inst.stdout
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # rich's needs are all met, pygments by the host's
    ver = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('rich'), m.version('pygments'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert ver == ["14.0.0", HOST_PYGMENTS]  # the host's pygments was not replaced


def test_split_into_pieces_and_batches_then_reassemble(host: tuple[Path, Path], tmp_path: Path) -> None:
    _, freeze = host
    dest = tmp_path / "wheels"
    # Without the host's pygments (1.2 MB) it is downloaded too; 0.4 MiB pieces split it (and
    # rich), and 0.5 MiB batches force several folders.
    proc = run_script("--dest", str(dest), "--split-mib", "0.4", "--batch-mib", "0.5", RICH)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((dest / "plan.json").read_text())
    assert {w["name"] for w in plan["wheels"]} == {"rich", "markdown-it-py", "mdurl", "pygments"}
    batches = sorted(dest.glob("batch-*"))
    assert len(batches) >= 3
    pieces = [p for b in batches for p in b.glob("*.part-*")]
    assert any(p.name.startswith("pygments-") for p in pieces)
    for b in batches:
        size = sum(p.stat().st_size for p in b.iterdir())
        assert size <= 0.5 * 1024 * 1024, b
        assert max(p.stat().st_size for p in b.iterdir()) <= 0.4 * 1024 * 1024
        assert (b / "install.sh").is_file() and (b / "SHA256SUMS").is_file()

    target = tmp_path / "site"
    work = tmp_path / "reassembled"
    inst = subprocess.run(
        [
            "bash",
            str(batches[-1] / "install.sh"),
            "--target",
            str(target),
            "--wheels",
            str(work),
            "--no-smoke",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stderr
    for w in plan["wheels"]:  # every reassembled wheel is the index's file
        assert sha256(work / w["filename"]) == w["sha256"]
    imp = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(target)!r}); import rich, pygments",
        ],
        capture_output=True,
        text=True,
    )
    assert imp.returncode == 0, imp.stderr

    # A missing batch is named, and nothing is installed.
    victim = next(b for b in batches if any(b.glob("*.part-*")))
    for p in victim.glob("*.part-*"):
        p.unlink()
    again = subprocess.run(
        [
            "bash",
            str(batches[0] / "install.sh"),
            "--target",
            str(tmp_path / "site2"),
            "--wheels",
            str(tmp_path / "w2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0
    assert f"send {victim.name} again" in again.stderr
    assert not (tmp_path / "site2").exists()


def test_conflict_with_a_host_package_fails_and_a_stand_in_resolves_it(tmp_path: Path, index: Path) -> None:
    """rich 14 needs pygments>=2.13: a host with pygments 2.0 cannot take it as it is (the same
    check that keeps a second torch out); `--skip pygments==2.19.1` accepts the host's version
    on purpose and records it."""
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("Pygments==2.0\n")
    proc = run_script("--host-freeze", str(freeze), "--dest", str(tmp_path / "a"), RICH)
    assert proc.returncode != 0
    assert "pygments" in proc.stderr.lower() and "error:" in proc.stderr

    proc = run_script(
        "--host-freeze", str(freeze), "--skip", "pygments==2.19.1", "--dest", str(tmp_path / "b"), RICH
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert "pygments" not in {w["name"] for w in plan["wheels"]}
    assert any("pygments" in n and "kept on purpose" in n for n in plan["notes"])


def test_extra_of_a_host_package_brings_its_requirements(tmp_path: Path, index: Path) -> None:
    """A requirement on `host_pkg[extra]` needs what the extra needs, although the host package
    itself is not downloaded: `httpx[http2]` with the host's httpx brings h2 and its dependencies."""
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "httpx==0.28.1\nhttpcore==1.0.9\nanyio==4.9.0\ncertifi==2025.4.26\nidna==3.10\nh11==0.16.0\n"
    )
    proc = run_script("--host-freeze", str(freeze), "--dest", str(tmp_path / "d"), "httpx[http2]==0.28.1")
    assert proc.returncode == 0, proc.stderr
    names = {w["name"] for w in json.loads((tmp_path / "d" / "plan.json").read_text())["wheels"]}
    assert names == {"h2", "hpack", "hyperframe"}


def test_bad_freeze_line_is_named(tmp_path: Path) -> None:
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("rich==14.0.0\n-e git+https://example.invalid/x#egg=x\n")
    proc = run_script("--host-freeze", str(freeze), "--dest", str(tmp_path / "d"), RICH)
    assert proc.returncode != 0
    assert f"{freeze}:2" in proc.stderr and "pip list --format=freeze" in proc.stderr


def test_stub_wheels_are_valid_and_declare_only_extra_requirements(tmp_path: Path) -> None:
    """The stand-in wheels pip resolves against (no index needed)."""
    sys.path.insert(0, str(HELPER.parent))
    try:
        import offline_wheels as ow
    finally:
        sys.path.pop(0)
    name, data = ow.stub_wheel("torch", ow.stub_version("2.11.0+cu130", ow.HOST_LABEL))
    assert name == "torch-2.11.0+cu130.hoststub-py3-none-any.whl"
    name, data = ow.stub_wheel("httpx", "0.28.1+hoststub", ['h2<5,>=3; extra == "http2"'])
    with zipfile.ZipFile(__import__("io").BytesIO(data)) as zf:
        meta = zf.read("httpx-0.28.1+hoststub.dist-info/METADATA").decode()
        assert zf.testzip() is None
    assert "Provides-Extra: http2" in meta and 'Requires-Dist: h2<5,>=3; extra == "http2"' in meta
    assert ow.manylinux_platforms("2.28", "x86_64")[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert "manylinux2014_x86_64" in ow.manylinux_platforms("2.28", "x86_64")


def _helper() -> object:
    sys.path.insert(0, str(HELPER.parent))
    try:
        import offline_wheels as ow
    finally:
        sys.path.pop(0)
    return ow


def _item(name: str, version: str, requires: list[str], requested: bool = False) -> dict[str, object]:
    fname = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return {
        "metadata": {"name": name, "version": version, "requires_dist": requires},
        "requested": requested,
        "download_info": {
            "url": f"https://files.example/{fname}",
            "archive_info": {"hashes": {"sha256": "0" * 64}},
        },
    }


def test_plan_refuses_a_wheel_that_pins_another_torch() -> None:
    """Defence behind the resolver: a planned wheel whose requirement the host's torch does not
    meet is an error naming both (a synthetic pip report; no index needed)."""
    ow: Any = _helper()
    target = ow.Target(PY, ("manylinux_2_28_x86_64",))
    stubs = {"torch": {"kind": "host", "version": "2.11.0", "stub": "2.11.0+hoststub"}}
    report = {
        "install": [
            _item("kernels", "1.0", ["torch==2.10.0"], requested=True),
            {**_item("torch", "2.11.0+hoststub", []), "download_info": {}},
        ]
    }
    with pytest.raises(ow.PlanError, match=r"kernels 1.0 requires torch==2.10.0; the host has 2.11.0"):
        ow.build_plan(report, stubs, set(), target)
    report["install"][0] = _item("kernels", "1.0", ["torch>=2.6"], requested=True)
    plan = ow.build_plan(report, stubs, set(), target)
    assert [w.name for w in plan.wheels] == ["kernels"]  # torch itself is never planned


def test_plan_walks_target_markers_not_this_interpreters() -> None:
    """pip resolves with the running interpreter's markers; the walk uses the target's, so a
    dependency only for another Python is not planned."""
    ow: Any = _helper()
    target = ow.Target("3.12", ("manylinux_2_28_x86_64",))
    report = {
        "install": [
            _item(
                "app", "1.0", ['six>=1.16; python_version > "3.11"', 'tomli; python_version < "3.11"'], True
            ),
            _item("six", "1.17.0", []),
            _item("tomli", "2.0.0", []),
        ]
    }
    plan = ow.build_plan(report, {}, set(), target)
    assert [w.name for w in plan.wheels] == ["app", "six"]
