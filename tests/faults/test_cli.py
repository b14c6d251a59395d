"""The real `glyph` command, in a subprocess, ends a failure it knows with one `error:` line that
names the file, setting or endpoint, within a minute and in at most a dozen lines of output; the
traceback only with `--debug`; `-q` prints nothing but that line.

Before: every failure inside the pipeline printed 95-100 lines of Prefect tracebacks before its
error line (`-q` changed nothing); a store root that is a file, a dead Prefect API or any S3
failure reached the terminal as a raw traceback (130-330 lines); `--refresh bogus` was checked
only after a Prefect server had started, behind a 25-line traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import SilentServer, closed_port_url, garbage_data_dir, glyph

BOUND_S = 60
MAX_LINES = 12


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One Prefect home for the module's temporary servers (their database is migrated once)."""
    return str(tmp_path_factory.mktemp("prefect-home"))


def _one_error_line(res, starts: str) -> str:  # type: ignore[no-untyped-def]
    assert res.code != 0, res.output
    assert res.seconds < BOUND_S, f"{res.seconds:.0f} s\n{res.output}"
    assert len(res.errors) == 1 and res.errors[0].startswith(f"error: {starts}"), res.output
    assert len(res.lines) <= MAX_LINES, f"{len(res.lines)} lines:\n{res.output}"
    assert "Traceback" not in res.output
    return str(res.errors[0])


def test_bad_setting(tmp_path: Path) -> None:
    """(Already one line since wave A; kept as the issue's first end-to-end probe.)"""
    res = glyph("run", "--store", str(tmp_path / "store"), "--set", "train.learning_rate=-1")
    _one_error_line(res, "train.learning_rate=-1: must be > 0")
    assert res.code == 2 and res.lines == ["error: train.learning_rate=-1: must be > 0"]


def test_unknown_refresh_stage_is_refused_before_prefect_starts(tmp_path: Path) -> None:
    res = glyph("run", "--store", str(tmp_path / "store"), "--refresh", "bogus")
    assert res.code == 2
    assert res.lines == [
        "error: refresh=bogus: unknown stage(s); expected all or unify, generate, filter, rewrite, train, evaluate"
    ]
    assert not (tmp_path / "store").exists()  # nothing started, nothing created


def test_bad_data(data_dir: Path, tmp_path: Path, prefect_home: str) -> None:
    data, bad = garbage_data_dir(data_dir, tmp_path / "data")
    res = glyph(
        "run", "--store", str(tmp_path / "store"), "--set", f"unify.data_dir={data}",
        env={"PREFECT_HOME": prefect_home},
    )  # fmt: skip
    line = _one_error_line(res, f"{bad}, line 1: not UTF-8 text (byte 0x80)")
    assert line.endswith("a binary or compressed file under this name?")


def test_quiet_prints_only_the_error_line(data_dir: Path, tmp_path: Path, prefect_home: str) -> None:
    data, bad = garbage_data_dir(data_dir, tmp_path / "data")
    res = glyph(
        "run", "-q", "--store", str(tmp_path / "store"), "--set", f"unify.data_dir={data}",
        env={"PREFECT_HOME": prefect_home},
    )  # fmt: skip
    assert res.code == 1
    assert len(res.lines) == 1 and res.lines[0].startswith(f"error: {bad}, line 1: not UTF-8 text"), (
        res.output
    )


def test_debug_adds_the_traceback(data_dir: Path, tmp_path: Path, prefect_home: str) -> None:
    data, bad = garbage_data_dir(data_dir, tmp_path / "data")
    res = glyph(
        "run", "--debug", "-q", "--store", str(tmp_path / "store"), "--set", f"unify.data_dir={data}",
        env={"PREFECT_HOME": prefect_home},
    )  # fmt: skip
    assert res.code == 1 and "Traceback (most recent call last)" in res.output
    assert "glyph_core.errors.SourceError" in res.output
    assert res.lines[-1].startswith(f"error: {bad}, line 1")


@pytest.mark.timeout(180)
def test_silent_s3_endpoint(tmp_path: Path, silent: SilentServer) -> None:
    """The default limits (10 s per request, 2 attempts): the store is probed before Prefect starts."""
    env: dict[str, str | None] = {"AWS_ENDPOINT_URL": silent.url, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GLYPH_S3_READ_TIMEOUT", "GLYPH_S3_MAX_ATTEMPTS"):
        env[var] = None
    res = glyph("run", "--store", "s3://glyph-silent/prefix", env=env)
    line = _one_error_line(res, "could not open the bucket of s3://glyph-silent/prefix")
    assert f"S3 endpoint {silent.url} accepted the connection but did not answer within 10 s" in line
    assert len(res.lines) == 1


def test_store_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_text("not a directory")
    for args in (["run"], ["unify", "--out", str(tmp_path / "out")]):  # the pipeline and a stage command
        res = glyph(*args, "--store", str(root))
        _one_error_line(res, f"store root {root} is a file, not a directory")
        assert len(res.lines) == 1


def test_dead_prefect_api(tmp_path: Path) -> None:
    url = closed_port_url()
    res = glyph("run", "--store", str(tmp_path / "store"), env={"PREFECT_API_URL": f"{url}/api"})
    line = _one_error_line(res, f"the Prefect API at {url} cannot be reached (ConnectError")
    assert "glyph server start" in line


@pytest.mark.timeout(180)
def test_silent_prefect_api_is_bounded(tmp_path: Path, silent: SilentServer) -> None:
    """Prefect's request timeout and retries bound the wait (here shortened to keep the test
    short; `glyph run` sets 30 s and 3 retries where the user has not chosen)."""
    env = {"PREFECT_API_URL": f"{silent.url}/api", "PREFECT_API_REQUEST_TIMEOUT": "2"}
    res = glyph("run", "--store", str(tmp_path / "store"), env=env)
    line = _one_error_line(res, f"the Prefect API at {silent.url} did not answer within 2 s")
    assert "PREFECT_API_REQUEST_TIMEOUT" in line
