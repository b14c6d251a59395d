"""Storage that fails, or never answers, fails within a bound with one line naming the endpoint
or path and what to check, never the credentials.

Before: an S3 endpoint that accepts connections and never answers gave no failure after 15
minutes (a PUT waits for a "100 Continue" that aiohttp never times out), an unreachable one took
42 s and a missing endpoint 52 s, each as 170-330 lines of botocore traceback; a store root that
is a file or a read-only directory failed late, with the OS message only.

The time bounds below are bounds on a failure (nothing may wait for ever), not speed claims.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from s3_server import free_port

from glyph_core.errors import SettingError, StorageError
from glyph_core.storage import Store
from tests.faults.helpers import SilentServer

SECRET = "glyph-fault-secret-never-shown"
KEY_ID = "GLYPHFAULTKEYID"
BOUND_S = 60


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Credentials that must never appear in a message; no endpoint and no limits set."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GLYPH_S3_CONNECT_TIMEOUT",
                "GLYPH_S3_READ_TIMEOUT", "GLYPH_S3_MAX_ATTEMPTS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


def _fails_within(fn, bound: float = BOUND_S) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        fn()
    elapsed = time.monotonic() - t0
    message = str(exc.value)
    assert elapsed < bound, f"took {elapsed:.1f} s: {message}"
    assert "\n" not in message
    assert SECRET not in message and KEY_ID not in message
    return message, elapsed


def _s3_store() -> Store:
    return Store(f"s3://glyph-{uuid.uuid4().hex[:10]}/prefix", skip_instance_cache=True)


# -- object storage ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_silent_endpoint_fails_at_ensure_with_the_default_limits(aws_env, silent: SilentServer) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL", silent.url)
    message, _ = _fails_within(lambda: _s3_store().ensure())
    assert silent.url in message and "did not answer within 10 s" in message
    assert "GLYPH_S3_READ_TIMEOUT" in message


@pytest.mark.timeout(180)
@pytest.mark.parametrize("operation", ["write", "read", "exists"])
def test_silent_endpoint_bounds_every_operation(aws_env, silent: SilentServer, operation: str) -> None:
    """The write is the one that hung for ever: botocore asks for `Expect: 100-continue` and
    aiohttp starts the read timeout only after the body, which waits for the "100"."""
    aws_env.setenv("AWS_ENDPOINT_URL", silent.url)
    aws_env.setenv("GLYPH_S3_READ_TIMEOUT", "1")
    aws_env.setenv("GLYPH_S3_MAX_ATTEMPTS", "1")
    store = _s3_store()
    uri = store.uri("unify", "k", "data.parquet")
    run = {
        "write": lambda: store.write_table(pa.table({"a": [1, 2]}), "unify", "k"),
        "read": lambda: store.read_bytes(uri),
        "exists": lambda: store.exists(uri),
    }[operation]
    message, _ = _fails_within(run, bound=30)
    assert f"could not {'check' if operation == 'exists' else operation} {uri}" in message
    assert f"S3 endpoint {silent.url} accepted the connection but did not answer within 1 s" in message


def test_closed_port_fails_at_once_naming_the_endpoint(aws_env) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    aws_env.setenv("AWS_ENDPOINT_URL", url)
    message, _ = _fails_within(lambda: _s3_store().ensure())
    assert f"S3 endpoint {url} cannot be reached" in message
    assert "AWS_ENDPOINT_URL" in message


def test_no_endpoint_configured_says_so(aws_env) -> None:
    """Without AWS_ENDPOINT_URL the client goes to AWS itself: unreachable without a network,
    and refusing these made-up keys with one. Either way one line says what was tried."""
    message, _ = _fails_within(lambda: _s3_store().ensure())
    assert "AWS S3 (no AWS_ENDPOINT_URL set)" in message


@pytest.mark.parametrize(
    ("var", "value"),
    [("GLYPH_S3_READ_TIMEOUT", "soon"), ("GLYPH_S3_CONNECT_TIMEOUT", "0"), ("GLYPH_S3_MAX_ATTEMPTS", "-1")],
)
def test_bad_limit_in_the_environment_is_a_setting_error(aws_env, var: str, value: str) -> None:
    aws_env.setenv(var, value)
    with pytest.raises(SettingError, match=rf"^\${var}='{value}': must be a"):
        _s3_store()


@pytest.mark.parametrize("backend", ["seaweedfs", "moto"])
def test_real_servers_work_under_the_limits(request, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The happy path through the bounded client, with the limits taken from the environment."""
    if backend == "seaweedfs":
        env = request.getfixturevalue("seaweed_server").client_env()
    else:
        endpoint = request.getfixturevalue("moto_server")
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
        }
    for k, v in {**env, "AWS_DEFAULT_REGION": "us-east-1", "GLYPH_S3_READ_TIMEOUT": "7",
                 "GLYPH_S3_MAX_ATTEMPTS": "3"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    store = _s3_store().ensure()
    ref = store.write_table(pa.table({"a": list(range(1000))}), "unify", "k")
    assert store.read_table(ref).num_rows == 1000 and store.exists(ref.uri)
    config = store.fs.s3.meta.config  # the botocore client the store really uses
    assert (config.read_timeout, config.connect_timeout) == (7, 5)
    assert config.retries == {"total_max_attempts": 3, "mode": "standard"}
    assert store.fs.retries == 1


# -- the local store -----------------------------------------------------------------------------


def test_store_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_text("not a directory")
    message, _ = _fails_within(lambda: Store(root).ensure())
    assert message == (
        f"store root {root} is a file, not a directory: choose another store (--store or $GLYPH_STORE) "
        "or move the file"
    )


def test_store_root_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    root = tmp_path / "blocker" / "deeper" / "store"
    message, _ = _fails_within(lambda: Store(root).ensure())
    assert f"cannot create the store root {root}: {tmp_path / 'blocker'} is a file" in message


def test_store_root_that_cannot_be_created() -> None:
    root = Path("/proc/glyph-no-such-dir/store")  # /proc takes no new directories, not even root's
    message, _ = _fails_within(lambda: Store(root).ensure())
    assert message.startswith(f"cannot create the store root {root} (")
    assert "choose another store" in message


def _make_read_only(path: Path) -> bool:
    """chmod for a normal user; root ignores modes, so `chattr +i` (immutable) for root."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    else:
        path.chmod(0o555)
        done = True
    try:
        (path / "probe").write_text("x")
    except OSError:
        return done
    (path / "probe").unlink()
    return False


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_read_only_store_fails_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    if not _make_read_only(root):
        _make_writable(root)
        pytest.skip("cannot make a read-only directory here (root without chattr)")
    try:
        message, _ = _fails_within(lambda: Store(root).ensure())
        assert message.startswith(f"store root {root} is not writable (")
        assert f"chmod u+w {root}" in message and "choose another store" in message
        # and a write that gets there anyway is one line naming the path
        message, _ = _fails_within(lambda: Store(root).write_table(pa.table({"a": [1]}), "unify", "k"))
        assert message.startswith(f"could not write {root}/unify/k/data.parquet (")
    finally:
        _make_writable(root)


def test_file_in_the_way_of_an_artifact(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    (tmp_path / "store" / "unify").write_text("a file where the stage folder goes")
    message, _ = _fails_within(lambda: store.write_table(pa.table({"a": [1]}), "unify", "k"))
    assert message.startswith(f"could not write {tmp_path}/store/unify/k/data.parquet (")
    assert "a file is in the way" in message
