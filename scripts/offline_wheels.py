"""The Python half of `scripts/offline_wheels.sh`: everything pip does not do itself.

pip resolves and downloads; this helper
* `stubs`: turns the host's `pip list --format=freeze` (and `--skip NAME==VERSION` stand-ins) into
  dependency-free stub wheels plus a constraints file, so pip's resolver treats the host's packages
  as fixed at the host's versions without reading (or downloading) anything about them: torch and
  its CUDA libraries are never downloaded, never replaced, and a requirement that pins another
  torch makes the resolution fail instead of silently planning a second torch;
* `plan`: reads pip's `--report`, keeps what the requested packages need (walking their
  `Requires-Dist` with the *target's* environment markers and requested extras, and stopping at
  host packages, stand-ins and `--exclude`d names), and checks it: one version per package,
  every file's tags installable on the target, a registry sha256 for every file, and no
  requirement of a planned wheel that the host's version of a package does not meet;
* `verify`: the downloaded files are exactly the plan's, byte for byte (sha256);
* `pack`: splits large files into numbered pieces, groups files and pieces into folders of a
  bounded size (one transfer each), and writes `SHA256SUMS`, `PIECES`, `manifest.json` and a
  self-contained `install.sh` (bash and coreutils only) into every folder.

Only the standard library and `packaging` (pip's vendored copy when the interpreter lacks it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import platform
import re
import shlex
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip always vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import (  # type: ignore[no-redef]
        Tag,
        compatible_tags,
        cpython_tags,
    )
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

MIB = 1024 * 1024
HOST_LABEL = "hoststub"  # local version label of a host package's stub
SKIP_LABEL = "standin"  # local version label of a --skip stand-in


class PlanError(Exception):
    """A check failed; the message is printed as one `error:` line."""


# -- target -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    python_version: str  # "3.12"
    platforms: tuple[str, ...]  # pip --platform values, most specific first

    @property
    def py_nodot(self) -> str:
        return self.python_version.replace(".", "")

    @property
    def abi(self) -> str:
        return f"cp{self.py_nodot}"

    def tags(self) -> set[Tag]:
        version = tuple(int(p) for p in self.python_version.split("."))
        platforms = list(self.platforms)
        out = set(cpython_tags(version, abis=[self.abi], platforms=platforms))
        out.update(compatible_tags(version, interpreter=self.abi, platforms=platforms))
        return out

    def os_arch(self) -> tuple[str, str]:
        """("Linux", "x86_64") from `manylinux_2_28_x86_64`; the first platform decides."""
        p = self.platforms[0]
        for prefix, system in (("manylinux", "Linux"), ("musllinux", "Linux"), ("linux", "Linux")):
            if p.startswith(prefix):
                arch = re.sub(r"^(manylinux|musllinux)(_\d+_\d+|1|2010|2014)?_|^linux_", "", p)
                return system, arch
        raise PlanError(f"platform {p!r}: only Linux targets (manylinux/musllinux/linux) are supported")

    def marker_env(self) -> dict[str, str]:
        system, arch = self.os_arch()
        return {
            "python_version": self.python_version,
            "python_full_version": f"{self.python_version}.0",
            "implementation_name": "cpython",
            "implementation_version": f"{self.python_version}.0",
            "platform_python_implementation": "CPython",
            "os_name": "posix",
            "sys_platform": "linux",
            "platform_system": system,
            "platform_machine": arch,
            "platform_release": "",
            "platform_version": "",
        }


def manylinux_platforms(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a host with this glibc accepts, newest first: pip's `--platform`
    matches tags exactly, so a target must list them all."""
    major, minor = (int(p) for p in glibc.split("."))
    if major != 2 or minor < 5:
        raise PlanError(f"--glibc {glibc}: expected 2.N with N >= 5")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in sorted(legacy.items(), reverse=True) if minor >= m]
    return tags


def check_interpreter(target: Target) -> None:
    """pip evaluates environment markers with the interpreter that runs it, whatever
    `--python-version` says; so pip must run on the target's Python, OS and architecture."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if here != target.python_version:
        raise PlanError(
            f"this interpreter is Python {here} but the target is {target.python_version}: pip evaluates "
            f"environment markers with the interpreter that runs it; pass --python /path/to/python{target.python_version}"
        )
    system, arch = target.os_arch()
    if platform.system() != system or platform.machine() != arch:
        raise PlanError(
            f"this machine is {platform.system()} {platform.machine()}, the target {system} {arch}: "
            "run on a machine of the target's OS and architecture (pip evaluates markers here)"
        )


# -- host packages and stand-ins ----------------------------------------------------------------


def read_freeze(path: Path) -> dict[str, str]:
    """`name==version` lines (`pip list --format=freeze`); comments and blank lines skipped."""
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*===?\s*(\S+)", line)
        if not m:
            raise PlanError(
                f"{path}:{n}: {raw.strip()!r} is not NAME==VERSION "
                "(write the host's list with `python3 -m pip list --format=freeze`)"
            )
        try:
            Version(m.group(2))
        except InvalidVersion:
            raise PlanError(f"{path}:{n}: {m.group(2)!r} is not a valid version") from None
        out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def parse_pins(specs: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)\s*", spec)
        if not m:
            raise PlanError(f"{what} {spec!r}: expected NAME==VERSION")
        out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def stub_version(version: str, label: str) -> str:
    """`2.11.0` -> `2.11.0+hoststub`; `2.11.0+cu130` -> `2.11.0+cu130.hoststub`. A requirement
    without a local label (`torch==2.11.0`, `torch>=2.6`) ignores the label, so the stub meets
    exactly the requirements the real version meets, and no registry file has this version."""
    v = Version(version)
    return f"{v.public}+{v.local}.{label}" if v.local else f"{v.public}+{label}"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def stub_wheel(name: str, version: str, extra_requires: list[str] | None = None) -> tuple[str, bytes]:
    """A valid, empty `py3-none-any` wheel whose metadata declares no dependencies, except those
    of the extras given (`Requires-Dist: h2<5,>=3; extra == "http2"` lines of the real package)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    extras = sorted({m for r in extra_requires or [] for m in re.findall(r"extra\s*==\s*[\"']([^\"']+)", r)})
    meta += "".join(f"Provides-Extra: {e}\n" for e in extras)
    meta += "".join(f"Requires-Dist: {r}\n" for r in extra_requires or [])
    files = {
        f"{info}/METADATA": meta.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: glyph-offline-wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(k, v) for k, v in files.items()] + [f"{info}/RECORD,,"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


def extra_requirements(reports: list[Path]) -> dict[str, tuple[list[str], list[str]]]:
    """From `pip install --no-deps --report` runs on `NAME[EXTRAS]==VERSION` of host packages:
    name -> (the extras looked up, the real package's extra-conditional requirements)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for path in reports:
        for it in json.loads(path.read_text()).get("install", []):
            name = canonicalize_name(it["metadata"]["name"])
            known, reqs = out.get(name, ([], []))
            looked = [canonicalize_name(e) for e in it.get("requested_extras") or []]
            cond = [r for r in it["metadata"].get("requires_dist") or [] if "extra" in r.split(";", 1)[-1]]
            out[name] = (sorted(set(known) | set(looked)), sorted(set(reqs) | set(cond)))
    return out


def cmd_stubs(args: argparse.Namespace) -> None:
    host = read_freeze(Path(args.host_freeze)) if args.host_freeze else {}
    skips = parse_pins(args.skip, "--skip")
    looked_up = extra_requirements([Path(r) for r in args.extras_report])
    out = Path(args.out)
    if (out / "stubs").exists():
        for old in (out / "stubs").glob("*.whl"):
            old.unlink()
    (out / "stubs").mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    for name, version in sorted(host.items()):
        if name not in skips:
            known, reqs = looked_up.get(name, ([], []))
            table[name] = {
                "kind": "host",
                "version": version,
                "stub": stub_version(version, HOST_LABEL),
                "extras_known": known,
                "extra_requires": reqs,
            }
    for name, version in sorted(skips.items()):
        table[name] = {
            "kind": "skip",
            "version": version,
            "stub": stub_version(version, SKIP_LABEL),
            "host_version": host.get(name),
        }
    lines = []
    for name, entry in table.items():
        fname, data = stub_wheel(name, entry["stub"], entry.get("extra_requires"))
        (out / "stubs" / fname).write_bytes(data)
        lines.append(f"{name}=={entry['stub']}")
    (out / "constraints.txt").write_text("\n".join(lines) + "\n")
    (out / "stubs.json").write_text(json.dumps(table, indent=1, sort_keys=True))


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Item:
    name: str
    version: str
    filename: str
    url: str
    sha256: str | None
    size: int | None = None
    extras: list[str] = field(default_factory=list)
    needed_by: list[str] = field(default_factory=list)


def _report_items(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    for it in report.get("install", []):
        name = canonicalize_name(it["metadata"]["name"])
        if name in items:
            raise PlanError(f"pip's report lists {name} twice")
        items[name] = it
    return items


def _requirements(item: dict[str, Any]) -> list[Requirement]:
    out = []
    for raw in item["metadata"].get("requires_dist") or []:
        try:
            out.append(Requirement(raw))
        except InvalidRequirement as exc:
            name = item["metadata"]["name"]
            raise PlanError(f"{name}: unreadable requirement {raw!r} ({exc})") from None
    return out


def _applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}) | {""})


@dataclass
class Plan:
    wheels: list[Item]
    notes: list[str]
    excluded: dict[str, list[str]]  # --exclude names that the walk reached -> who needs them
    lookups: dict[str, list[str]]  # host package -> extras whose requirements are still unknown


def build_plan(
    report: dict[str, Any], stubs: dict[str, dict[str, Any]], excluded: set[str], target: Target
) -> Plan:
    """The wheels to download, with the checks of the module docstring.

    Walks from the requested packages. A host package's stub carries only the requirements of
    the extras looked up for it (its other dependencies are the host's business); a stand-in
    carries none; an excluded name is not followed. A host package wanted with an extra not
    looked up yet lands in `lookups`: the caller looks it up and resolves again.
    """
    env = target.marker_env()
    items = _report_items(report)
    for name, entry in stubs.items():
        it = items.get(name)
        if it is not None and it["metadata"]["version"] != entry["stub"]:
            raise PlanError(
                f"pip resolved {name} {it['metadata']['version']}, not the host's {entry['version']}"
            )
    roots = [n for n, it in items.items() if it.get("requested")]
    extras: dict[str, set[str]] = {
        n: {canonicalize_name(e) for e in items[n].get("requested_extras") or []} for n in roots
    }
    needed_by: dict[str, set[str]] = {n: {"(requested)"} for n in roots}
    cut: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in excluded:
            continue
        for req in _requirements(items[name]):
            if not _applies(req, env, extras.get(name, set())):
                continue
            dep = canonicalize_name(req.name)
            if dep not in items:
                raise PlanError(f"{name} needs {req} but pip's report does not resolve {dep}")
            needed_by.setdefault(dep, set()).add(name)
            new_extras = {canonicalize_name(e) for e in req.extras} - extras.get(dep, set())
            first = dep not in extras
            extras.setdefault(dep, set()).update(new_extras)
            if dep in excluded:
                cut.add(dep)
            if first or new_extras:
                todo.append(dep)

    lookups = {
        n: sorted(extras[n] - set(e.get("extras_known") or []))
        for n, e in stubs.items()
        if e["kind"] == "host" and n in extras and extras[n] - set(e.get("extras_known") or [])
    }
    plan: list[Item] = []
    notes: list[str] = []
    problems: list[str] = []
    host = {n: e["host_version"] if e["kind"] == "skip" else e["version"] for n, e in stubs.items()}
    supported = target.tags()
    for name in sorted(extras):
        it = items[name]
        if name in stubs:
            entry = stubs[name]
            if entry["kind"] == "skip":
                kept = f"host keeps {entry['host_version']}" if entry["host_version"] else "not installed"
                notes.append(
                    f"{name}: stand-in {entry['version']} for the resolution ({kept}); needed by {_who(needed_by, name)}"
                )
            continue
        if name in excluded:
            continue
        info = it.get("download_info") or {}
        url = info.get("url", "")
        filename = url.rsplit("/", 1)[-1].split("#", 1)[0]
        if not filename.endswith(".whl"):
            problems.append(f"{name} {it['metadata']['version']}: not a wheel ({url})")
            continue
        hashes = (info.get("archive_info") or {}).get("hashes") or {}
        sha = hashes.get("sha256")
        if not sha:
            legacy = (info.get("archive_info") or {}).get("hash", "")
            sha = legacy.split("=", 1)[1] if legacy.startswith("sha256=") else None
        if not sha:
            problems.append(f"{filename}: the index gives no sha256 for it")
        _, wversion, _, wtags = parse_wheel_filename(filename)
        if str(wversion) != str(Version(it["metadata"]["version"])):
            problems.append(
                f"{filename}: file version differs from the metadata's {it['metadata']['version']}"
            )
        if not wtags & supported:
            problems.append(
                f"{filename}: tags {sorted(str(t) for t in wtags)} do not fit Python {target.python_version} on {target.platforms[0]}"
            )
        plan.append(
            Item(
                name=name,
                version=it["metadata"]["version"],
                filename=filename,
                url=url,
                sha256=sha,
                extras=sorted(extras[name]),
                needed_by=sorted(needed_by.get(name, set())),
            )
        )
    # Every requirement of a planned wheel on a host package must hold for the host's version;
    # for a stand-in the mismatch was declared on purpose, so it is a note, not an error.
    for item in plan:
        for req in _requirements(items[item.name]):
            dep = canonicalize_name(req.name)
            if dep not in host or not _applies(req, env, set(item.extras)):
                continue
            have = host[dep]
            if have is None:
                continue
            if not req.specifier.contains(Version(have), prereleases=True):
                msg = f"{item.name} {item.version} requires {req.name}{req.specifier}; the host has {have}"
                if stubs[dep]["kind"] == "skip":
                    notes.append(msg + " (kept on purpose: --skip)")
                else:
                    problems.append(msg)
    names = [i.name for i in plan]
    if len(set(names)) != len(names):
        problems.append("two versions of one package in the plan")
    if problems:
        raise PlanError("; ".join(problems))
    return Plan(plan, notes, {n: sorted(needed_by[n]) for n in sorted(cut)}, lookups)


def _who(needed_by: dict[str, set[str]], name: str) -> str:
    return ", ".join(sorted(needed_by.get(name, set()))) or "?"


def target_from(args: argparse.Namespace) -> Target:
    platforms = list(args.platform or [])
    if not platforms:
        platforms = manylinux_platforms(args.glibc, args.arch)
    return Target(python_version=args.python_version, platforms=tuple(platforms))


def cmd_platforms(args: argparse.Namespace) -> None:
    print(" ".join(target_from(args).platforms))


def cmd_check_interpreter(args: argparse.Namespace) -> None:
    check_interpreter(target_from(args))


def cmd_plan(args: argparse.Namespace) -> None:
    target = target_from(args)
    report = json.loads(Path(args.report).read_text())
    stubs = json.loads(Path(args.stubs).read_text())
    excluded = {canonicalize_name(e) for e in args.exclude}
    plan = build_plan(report, stubs, excluded, target)
    lookups = Path(args.extras_out)
    lookups.write_text(
        "".join(
            f"{name}[{','.join(extras)}]=={Version(stubs[name]['version']).public}\n"
            for name, extras in sorted(plan.lookups.items())
        )
    )
    if plan.lookups:
        print(f"plan: looking up the extras {sorted(plan.lookups.items())} of host packages")
        return
    body = {
        "target": asdict(target),
        "wheels": [asdict(i) for i in plan.wheels],
        "notes": plan.notes,
        "excluded": plan.excluded,
    }
    Path(args.out).write_text(json.dumps(body, indent=1))
    reqs = [f"{i.name}=={i.version} --hash=sha256:{i.sha256}" for i in plan.wheels]
    Path(args.requirements).write_text("\n".join(reqs) + ("\n" if reqs else ""))
    for note in plan.notes:
        print(f"note: {note}")
    for name, who in plan.excluded.items():
        print(f"note: {name}: excluded (--exclude), not downloaded; needed by {', '.join(who)}")
    for i in plan.wheels:
        print(f"  {i.name}=={i.version}  ({', '.join(i.needed_by)})")
    print(
        f"plan: {len(plan.wheels)} wheel(s) to download for Python {target.python_version} on {target.platforms[0]}"
    )


# -- verification -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(plan: dict[str, Any], folder: Path) -> list[Path]:
    wanted = {w["filename"]: w for w in plan["wheels"]}
    present = {p.name: p for p in folder.glob("*.whl")}
    missing = sorted(set(wanted) - set(present))
    extra = sorted(set(present) - set(wanted))
    if missing:
        raise PlanError(f"{folder}: missing {', '.join(missing)}")
    if extra:
        raise PlanError(f"{folder}: files not in the plan: {', '.join(extra)}")
    for fname, w in wanted.items():
        got = sha256_file(present[fname])
        if got != w["sha256"]:
            raise PlanError(f"{present[fname]}: sha256 {got} is not the index's {w['sha256']}")
    return [present[f] for f in sorted(wanted)]


def cmd_verify(args: argparse.Namespace) -> None:
    plan = json.loads(Path(args.plan).read_text())
    files = verify(plan, Path(args.dir))
    total = sum(p.stat().st_size for p in files)
    print(f"verified: {len(files)} wheel(s), {total / MIB:.1f} MiB, sha256 as the index gives them")


# -- pieces, batches and the install script -----------------------------------------------------


@dataclass
class Part:
    path: Path  # where it lies before packing
    name: str  # file name in its batch
    size: int


def split_file(path: Path, max_bytes: int, out_dir: Path) -> list[Part]:
    """`f.whl` -> `f.whl.part-001`, `f.whl.part-002`, ... each at most `max_bytes`."""
    size = path.stat().st_size
    count = math.ceil(size / max_bytes)
    parts = []
    with open(path, "rb") as fh:
        for k in range(1, count + 1):
            name = f"{path.name}.part-{k:03d}"
            dest = out_dir / name
            dest.write_bytes(fh.read(max_bytes))
            parts.append(Part(dest, name, dest.stat().st_size))
    return parts


def assign_batches(parts: list[Part], batch_bytes: int, reserve: int) -> list[list[Part]]:
    """First-fit decreasing into folders of at most `batch_bytes` (each keeps `reserve` bytes
    for its copy of the install script and lists)."""
    batches: list[list[Part]] = []
    room: list[int] = []
    for part in sorted(parts, key=lambda p: (-p.size, p.name)):
        if part.size + reserve > batch_bytes:
            raise PlanError(
                f"{part.name} ({part.size / MIB:.1f} MiB) does not fit a {batch_bytes / MIB:.1f} MiB batch: split smaller"
            )
        for i, free in enumerate(room):
            if part.size <= free:
                batches[i].append(part)
                room[i] -= part.size
                break
        else:
            batches.append([part])
            room.append(batch_bytes - reserve - part.size)
    return batches


INSTALL_SH = r"""#!/usr/bin/env bash
# Reassemble and install an offline wheel set written by scripts/offline_wheels.sh.
# A copy of this script, SHA256SUMS and PIECES lies in every batch folder; the batch folders
# must be siblings (…/batch-01, …/batch-02, …). Needs bash, coreutils and the host's pip only.
#
#   bash install.sh [--target DIR] [--python PY] [--wheels DIR] [--no-smoke]
#
# Without --target the wheels go into the interpreter's own site-packages (--no-deps: nothing
# already installed is replaced by a dependency, and nothing is looked up on an index).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
py=python3
target=""
wheels=${TMPDIR:-/tmp}/offline-wheels
smoke=1
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --no-smoke) smoke=0; shift ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$wheels"
batches=( "$root"/batch-* )
missing=0
# PIECES: "<wheel file> <piece> <batch>" lines, in order.
while read -r whl piece batch; do
  [ -n "$whl" ] || continue
  if [ ! -f "$root/$batch/$piece" ]; then
    echo "error: piece $piece of $whl is missing: send $batch again" >&2
    missing=1
  fi
done < "$here/PIECES"
while read -r sum whl batch; do
  [ -n "$whl" ] || continue
  if [ "$batch" != "-" ] && [ ! -f "$root/$batch/$whl" ]; then
    echo "error: $whl is missing: send $batch again" >&2
    missing=1
  fi
done < "$here/SHA256SUMS"
[ "$missing" = 0 ] || exit 1
while read -r sum whl batch; do
  [ -n "$whl" ] || continue
  if [ "$batch" = "-" ]; then  # in pieces
    : > "$wheels/$whl.tmp"
    while read -r w piece pbatch; do
      [ "$w" = "$whl" ] && cat "$root/$pbatch/$piece" >> "$wheels/$whl.tmp"
    done < "$here/PIECES"
    mv "$wheels/$whl.tmp" "$wheels/$whl"
  else
    cp "$root/$batch/$whl" "$wheels/$whl"
  fi
done < "$here/SHA256SUMS"
(cd "$wheels" && awk '{print $1"  "$2}' "$here/SHA256SUMS" | sha256sum --quiet -c -) \
  || { echo "error: a reassembled wheel does not match its sha256 (SHA256SUMS)" >&2; exit 1; }
echo "==> ${#batches[@]} batch folder(s) read, $(wc -l < "$here/SHA256SUMS") wheel(s) verified in $wheels"
args=(-m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check -q)
if [ -n "$target" ]; then
  args+=(--target "$target" --upgrade)
fi
"$py" "${args[@]}" $(awk -v d="$wheels" '{print d"/"$2}' "$here/SHA256SUMS")
echo "==> installed into ${target:-$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}"
__ENV_BLOCK__
if [ "$smoke" = 1 ] && [ -n "__SMOKE__" ]; then
  if [ -n "$target" ]; then export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"; fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  for mod in __SMOKE__; do
    "$py" -c "import $mod" || { echo "error: import $mod failed" >&2; exit 1; }
    echo "==> import $mod: ok"
  done
fi
if [ -n "$target" ]; then echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"; fi
__ENV_ECHO__
"""


def install_script(env: list[str], smoke: list[str]) -> str:
    for e in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^\s'\"]*", e):
            raise PlanError(f"--env {e!r}: expected NAME=VALUE without spaces or quotes")
    for m in smoke:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", m):
            raise PlanError(f"--smoke-import {m!r}: not a module name")
    block = "\n".join(f"export {e}" for e in env)
    echo = "\n".join(f"echo {shlex.quote('export ' + e)}" for e in env)
    return (
        INSTALL_SH.replace("__ENV_BLOCK__", block)
        .replace("__ENV_ECHO__", echo)
        .replace("__SMOKE__", " ".join(smoke))
    )


def pack(
    plan: dict[str, Any],
    folder: Path,
    out: Path,
    split_mib: float,
    batch_mib: float,
    env: list[str],
    smoke: list[str],
) -> list[list[Part]]:
    files = verify(plan, folder)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("batch-*")):
        raise PlanError(f"{out} already holds batch folders: pack into an empty folder")
    scratch = out / ".pieces"
    scratch.mkdir(exist_ok=True)
    max_piece = int(split_mib * MIB)
    parts: list[Part] = []
    whole: dict[str, str] = {}  # file -> sha256
    for path in files:
        whole[path.name] = sha256_file(path)
        if split_mib > 0 and path.stat().st_size > max_piece:
            parts.extend(split_file(path, max_piece, scratch))
        else:
            parts.append(Part(path, path.name, path.stat().st_size))
    script = install_script(env, smoke)
    reserve = 64 * 1024 + len(script.encode()) + 200 * (len(parts) + len(files))
    batches = assign_batches(parts, int(batch_mib * MIB), reserve) if batch_mib > 0 else [parts]
    where: dict[str, str] = {}
    for k, batch in enumerate(batches, 1):
        bdir = out / f"batch-{k:02d}"
        bdir.mkdir()
        for part in batch:
            data_path = bdir / part.name
            if part.path.parent == scratch:
                part.path.replace(data_path)
            else:
                data_path.write_bytes(part.path.read_bytes())
            where[part.name] = bdir.name
    scratch.rmdir()
    sums = "".join(f"{whole[f]} {f} {where.get(f, '-')}\n" for f in sorted(whole))
    pieces = "".join(
        f"{p.name.rsplit('.part-', 1)[0]} {p.name} {where[p.name]}\n"
        for p in sorted(parts, key=lambda p: p.name)
        if ".part-" in p.name and p.name.rsplit(".part-", 1)[0] in whole
    )
    manifest = {
        "target": plan["target"],
        "wheels": plan["wheels"],
        "notes": plan.get("notes", []),
        "excluded": plan.get("excluded", []),
        "batches": {f"batch-{k:02d}": sorted(p.name for p in b) for k, b in enumerate(batches, 1)},
        "env": env,
    }
    for k in range(1, len(batches) + 1):
        bdir = out / f"batch-{k:02d}"
        (bdir / "SHA256SUMS").write_text(sums)
        (bdir / "PIECES").write_text(pieces)
        (bdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (bdir / "install.sh").write_text(script)
    (out / "install.sh").write_text(
        "#!/usr/bin/env bash\n# Same as batch-01/install.sh (every batch holds a copy).\n"
        'exec bash "$(dirname "${BASH_SOURCE[0]}")/batch-01/install.sh" "$@"\n'
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for k in range(1, len(batches) + 1):
        bdir = out / f"batch-{k:02d}"
        size = sum(p.stat().st_size for p in bdir.iterdir())
        if batch_mib > 0 and size > batch_mib * MIB:
            raise PlanError(f"{bdir}: {size / MIB:.2f} MiB exceeds --batch-mib {batch_mib}")
    return batches


def cmd_pack(args: argparse.Namespace) -> None:
    plan = json.loads(Path(args.plan).read_text())
    out = Path(args.out)
    batches = pack(plan, Path(args.dir), out, args.split_mib, args.batch_mib, args.env, args.smoke_import)
    for k in range(1, len(batches) + 1):
        bdir = out / f"batch-{k:02d}"
        size = sum(p.stat().st_size for p in bdir.iterdir())
        print(f"{bdir}: {len(list(bdir.iterdir())) - 4} file(s), {size / MIB:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def target_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--python-version", required=True)
        p.add_argument("--platform", action="append", default=[])
        p.add_argument("--glibc", default="2.28")
        p.add_argument("--arch", default="x86_64")

    p = sub.add_parser("platforms")
    target_args(p)
    p.set_defaults(fn=cmd_platforms)
    p = sub.add_parser("check-interpreter")
    target_args(p)
    p.set_defaults(fn=cmd_check_interpreter)
    p = sub.add_parser("stubs")
    p.add_argument("--host-freeze")
    p.add_argument("--skip", action="append", default=[])
    p.add_argument("--extras-report", action="append", default=[])
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_stubs)
    p = sub.add_parser("plan")
    target_args(p)
    p.add_argument("--report", required=True)
    p.add_argument("--stubs", required=True)
    p.add_argument("--exclude", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--requirements", required=True)
    p.add_argument("--extras-out", required=True)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("verify")
    p.add_argument("--plan", required=True)
    p.add_argument("--dir", required=True)
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("pack")
    p.add_argument("--plan", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split-mib", type=float, default=0.0)
    p.add_argument("--batch-mib", type=float, default=0.0)
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--smoke-import", action="append", default=[])
    p.set_defaults(fn=cmd_pack)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
