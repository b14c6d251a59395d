#!/usr/bin/env bash
# Download the wheels an offline host lacks, check them, and write an install script for it.
#
# Run on a machine that reaches the package index, with an interpreter of the target's Python
# version, OS and architecture (pip evaluates environment markers with the interpreter that runs
# it, whatever --python-version says). On the offline host, afterwards:
#   bash DEST/install.sh [--target DIR]      # reassemble pieces, verify sha256, pip install --no-index --no-deps
#
#   scripts/offline_wheels.sh --dest DIR [options] [REQUIREMENT ...]
#
# Target:
#   --python-version 3.12      the host's Python (default: the interpreter's)
#   --python PATH              interpreter that runs pip (default: python3.X for --python-version)
#   --glibc 2.35 --arch x86_64 the host's glibc and CPU: every manylinux tag up to it is accepted
#   --platform TAG             exact platform tags instead (repeatable)
# What the host already has:
#   --host-freeze FILE         `python3 -m pip list --format=freeze` of the host: those packages are
#                              fixed at the host's versions, never downloaded or replaced (torch!)
#   --skip NAME==VERSION       a stand-in: resolve as if NAME VERSION were there, download nothing
#                              for it or its dependencies (optional GPU kernels, a host version
#                              that works although the metadata pins another; repeatable)
#   --exclude NAME             resolve NAME but download nothing for it or for what only it needs
# What to get:
#   REQUIREMENT ... | -r FILE  requirements (repeatable -r); -c FILE adds pip constraints
#   --project DIR              also the [project] dependencies of DIR/pyproject.toml
# Output:
#   --dest DIR                 an empty or new folder: wheels/, plan.json, requirements.lock, batch-*/
#   --split-mib N              cut files larger than N MiB into numbered pieces (0: never)
#   --batch-mib M              group files and pieces into folders batch-01, batch-02, ... of at
#                              most M MiB each (one transfer each; 0: one folder)
#   --env NAME=VALUE           exported by install.sh and printed with the install command
#   --smoke-import MODULE      imported by install.sh after installing (repeatable)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "error: $*" >&2; exit 2; }

python_version="" python="" glibc="2.28" arch="x86_64" freeze="" dest="" project=""
split_mib=0 batch_mib=0
platforms=() skips=() excludes=() reqs=() req_files=() constraints=() envs=() smokes=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) python_version=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --glibc) glibc=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    --host-freeze) freeze=$2; shift 2 ;;
    --skip) skips+=("$2"); shift 2 ;;
    --exclude) excludes+=("$2"); shift 2 ;;
    -r) req_files+=("$2"); shift 2 ;;
    -c) constraints+=("$2"); shift 2 ;;
    --project) project=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    --split-mib) split_mib=$2; shift 2 ;;
    --batch-mib) batch_mib=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --smoke-import) smokes+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) reqs+=("$1"); shift ;;
  esac
done
[ -n "$dest" ] || die "--dest DIR is required"
if [ -z "$python" ]; then
  if [ -n "$python_version" ]; then python=python$python_version; else python=python3; fi
fi
command -v "$python" >/dev/null 2>&1 || die "no interpreter $python: pass --python /path/to/python$python_version"
[ -n "$python_version" ] || python_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -z "$freeze" ] || [ -f "$freeze" ] || die "--host-freeze $freeze: no such file"
for f in "${req_files[@]}" "${constraints[@]}"; do [ -f "$f" ] || die "$f: no such file"; done
if [ -n "$project" ]; then
  [ -f "$project/pyproject.toml" ] || die "--project $project: no pyproject.toml"
  while IFS= read -r line; do reqs+=("$line"); done < <("$python" - "$project/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as fh:
    print("\n".join(tomllib.load(fh)["project"].get("dependencies", [])))
EOF
  )
fi
[ ${#reqs[@]} -gt 0 ] || [ ${#req_files[@]} -gt 0 ] || die "nothing to download: give requirements, -r FILE or --project DIR"
if [ -d "$dest" ] && [ -n "$(ls -A "$dest")" ]; then die "--dest $dest is not empty"; fi
mkdir -p "$dest/wheels"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pip < 24 refuses --platform with --dry-run: run a current pip in a throwaway venv then.
pip_major=$("$python" -m pip --version 2>/dev/null | awk '{split($2, v, "."); print v[1]}')
if [ -z "$pip_major" ] || [ "$pip_major" -lt 24 ]; then
  echo "==> pip ${pip_major:-missing} is too old for $python: a current pip in a temporary venv"
  "$python" -m venv "$work/venv" && "$work/venv/bin/python" -m pip install -q --upgrade pip 2> "$work/pip.err" \
    || { cat "$work/pip.err" >&2; die "could not set up a current pip for $python"; }
  python=$work/venv/bin/python
fi
helper() { "$python" "$here/offline_wheels.py" "$@"; }
target=(--python-version "$python_version" --glibc "$glibc" --arch "$arch")
for p in "${platforms[@]}"; do target+=(--platform "$p"); done
helper check-interpreter "${target[@]}" || exit 1
read -r -a plat <<< "$(helper platforms "${target[@]}")"
pip_target=(--only-binary=:all: --python-version "$python_version" --implementation cp
  --abi "cp${python_version/./}")
for p in "${plat[@]}"; do pip_target+=(--platform "$p"); done

echo "==> target: Python $python_version, ${plat[0]} (and older manylinux); pip: $("$python" -m pip --version | cut -d' ' -f1-2)"
pip_reqs=()
for f in "${req_files[@]}"; do pip_reqs+=(-r "$f"); done
for c in "${constraints[@]}"; do pip_reqs+=(-c "$c"); done
pip_reqs+=("${reqs[@]}")
plan_args=(--report "$work/report.json" --stubs "$work/stubs.json" --out "$dest/plan.json"
  --requirements "$dest/requirements.lock" --extras-out "$work/lookup.txt")
for e in "${excludes[@]}"; do plan_args+=(--exclude "$e"); done
extras_reports=()
# Resolve; when a requirement asks for an extra of a host package (httpx[http2]), look up what
# that extra needs (pip --no-deps --report on the host's version) and resolve again.
for pass in 1 2 3 4; do
  stub_args=(--out "$work")
  [ -z "$freeze" ] || stub_args+=(--host-freeze "$freeze")
  for s in "${skips[@]}"; do stub_args+=(--skip "$s"); done
  for r in "${extras_reports[@]}"; do stub_args+=(--extras-report "$r"); done
  helper stubs "${stub_args[@]}"
  echo "==> resolving (pip install --dry-run --report), pass $pass"
  if ! "$python" -m pip install --dry-run --ignore-installed --report "$work/report.json" \
      "${pip_target[@]}" --find-links "$work/stubs" -c "$work/constraints.txt" "${pip_reqs[@]}" \
      > "$work/resolve.log" 2>&1; then
    grep -v -E '^(WARNING: Location|Looking in|Collecting|Processing|  (Downloading|Using cached|Obtaining|Found link))' \
      "$work/resolve.log" >&2 || true
    die "pip could not resolve the requirements for this host (its message is above). If it names a
       conflict with a host package, a requirement needs another version than the host's: where the
       host's is known to work, pass --skip NAME==VERSION (a version the requirement accepts)."
  fi
  helper plan "${target[@]}" "${plan_args[@]}" || exit 1
  [ -s "$work/lookup.txt" ] || break
  [ "$pass" -lt 4 ] || die "the extras of host packages still change after $pass passes: $(cat "$work/lookup.txt")"
  "$python" -m pip install -q --dry-run --ignore-installed --no-deps --report "$work/extras-$pass.json" \
    "${pip_target[@]}" -r "$work/lookup.txt" 2> "$work/lookup.err" \
    || { grep -v '^WARNING: Location' "$work/lookup.err" >&2; die "could not look up the host packages' extras in $work/lookup.txt"; }
  extras_reports+=("$work/extras-$pass.json")
done

if [ -s "$dest/requirements.lock" ]; then
  echo "==> downloading (pip download --no-deps --require-hashes)"
  "$python" -m pip download -q --no-deps --require-hashes "${pip_target[@]}" \
    -r "$dest/requirements.lock" -d "$dest/wheels" 2> "$work/download.err" \
    || { grep -v '^WARNING: Location' "$work/download.err" >&2; die "download failed"; }
fi
helper verify --plan "$dest/plan.json" --dir "$dest/wheels" || exit 1
pack_args=(--plan "$dest/plan.json" --dir "$dest/wheels" --out "$dest" --split-mib "$split_mib"
  --batch-mib "$batch_mib")
for e in "${envs[@]}"; do pack_args+=(--env "$e"); done
for m in "${smokes[@]}"; do pack_args+=(--smoke-import "$m"); done
helper pack "${pack_args[@]}" || exit 1

cat <<EOF

==> on the offline host (Python $python_version), with the batch folders side by side:
    bash <folder>/batch-01/install.sh                # into the interpreter's site-packages
    bash <folder>/batch-01/install.sh --target DIR   # or into DIR; then export PYTHONPATH=DIR
EOF
for e in "${envs[@]}"; do echo "    export $e"; done
