"""A real S3-compatible server on loopback for tests: moto's standalone server (``moto[server]``,
pinned in the ``test`` extra), run as a subprocess on 127.0.0.1 with a port the OS picks.
Nothing here ever talks to AWS or to any host other than 127.0.0.1.

How the endpoint reaches pyarrow (checked with pyarrow 25.0.1 / moto 5.2.5)
------------------------------------------------------------------------------
* **Environment variables, as in production.** pyarrow's S3 (AWS SDK for C++) honours
  ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, including the ``http://`` scheme in it, so
  ``pipeline.storage.resolve_filesystem("s3://bucket/key")`` reaches the server with a plain URI:
  no ``?endpoint_override=...&scheme=http`` query and no keys in the URIs the pipeline stores.
  (The query form also works, but is not needed and is not what production uses.)
  boto3 honours the same variables. :attr:`S3Server.env` is the full set.
* **Credentials are required** (any values: moto accepts them). Without credentials pyarrow
  sends unsigned ``aws-chunked`` uploads (with a CRC64 trailer) and moto stores that framing as the
  object body: ``b"hello"`` reads back as ``b"5\\r\\nhello\\r\\n0\\r\\nx-amz-checksum-..."``,
  silently. So "anonymous" access (``S3FileSystem(anonymous=True)`` or no credentials at all) is
  NOT an option against moto, and every process that writes must see the dummy keys.
* **A pickled S3FileSystem carries the endpoint but not the credentials** (pyarrow pickles the
  options it was built with; keys taken from the environment are not among them), so a Ray worker
  that gets the driver's filesystem object still needs the credentials in its own environment,
  or it writes corrupted objects (see above).

How it reaches Ray workers
--------------------------
Ray worker processes are started by the raylet with the environment the *driver had at
``ray.init``*; setting ``os.environ`` afterwards does not reach them (checked: a task still sees
no ``AWS_ENDPOINT_URL``). Two mechanisms work (both exercised in tests/test_s3_server.py):

1. ``runtime_env={"env_vars": server.env}`` on a task/actor (:attr:`S3Server.runtime_env`):
   works whenever Ray was started; costs a new worker process (~1 s) the first time.
2. S3 env in ``os.environ`` *before* ``ray.init``: then every worker, including Ray Data and Ray
   Train ones that the pipeline starts without any runtime_env, inherits it. This is what the
   ``ray_with_s3`` fixture in conftest.py guarantees: it sets up ``s3_server`` before
   ``ray_session``, and if Ray was already started earlier in the session without the S3 env
   (a probe task says so), it restarts the session's Ray (``ray.shutdown()`` + ``init_ray``, ~5 s).

Isolation from a developer's own AWS setup: ``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE``
point to ``os.devnull``, and :data:`UNSET_ENV` (profiles, session tokens, role/web-identity and
container credentials) is removed while the server's env is active (:func:`patched_environ`).
``AWS_EC2_METADATA_DISABLED=true`` keeps both SDKs off the instance-metadata endpoint.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REGION = "us-east-1"
# Variables that would make an SDK pick other credentials/config than the dummy ones.
UNSET_ENV = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
_RUNNING_ON = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    """urllib without HTTP(S)_PROXY: the server is on loopback."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def patched_environ(env: dict[str, str], unset: tuple[str, ...] = UNSET_ENV):
    """Set `env` and remove `unset` in os.environ; restore exactly what was there on exit."""
    saved = {k: os.environ.get(k) for k in (*env, *unset)}
    try:
        for key in unset:
            os.environ.pop(key, None)
        os.environ.update(env)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class S3Server:
    """``with S3Server() as s3:`` -> moto's S3 on ``s3.endpoint`` with bucket ``s3.bucket``.

    ``s3.env`` configures pyarrow and boto3 for it (see the module docstring); ``s3.uri("a/b")``
    is ``s3://<bucket>/a/b``. The server is stopped (terminate, then kill) on exit.
    """

    access_key = "testing"
    secret_key = "testing"

    def __init__(self, bucket: str = "hmhn-test", start_timeout: float = 60.0,
                 stop_timeout: float = 10.0):
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_path: Path | None = None
        self._log_file = None
        self._env: dict[str, str] | None = None

    # ---- configuration -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("S3Server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points pyarrow's S3FileSystem and boto3 at this server."""
        if self._env is None:
            raise RuntimeError("S3Server is not running")
        return dict(self._env)

    def _make_env(self) -> dict[str, str]:
        no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"),
                                        "127.0.0.1,localhost") if p)
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,      # pyarrow (AWS SDK C++) and boto3
            "AWS_ENDPOINT_URL_S3": self.endpoint,   # service-specific form, same effect
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    @property
    def runtime_env(self) -> dict:
        """Ray runtime_env that gives a task/actor this server's env (works after ray.init)."""
        return {"env_vars": dict(self.env)}

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def activated(self):
        """Context manager: this server's env in os.environ (and UNSET_ENV removed) inside it."""
        return patched_environ(self.env)

    def boto3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        """The server's stdout+stderr so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("S3Server already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="hmhn-moto-")
        self._log_path = Path(self._tmp.name) / "moto_server.log"
        # A file, not a pipe: moto logs every request, and an undrained pipe would block it.
        self._log_file = open(self._log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PYTHONUNBUFFERED"] = "1"
        # Port 0: the OS picks a free port (no race) and werkzeug prints the one it bound.
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
            self._wait_until_ready()
            self._env = self._make_env()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"moto S3 server {why}. Its output:\n{self.log()[-4000:]}")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        opener = _no_proxy_opener()
        while True:
            if self._proc.poll() is not None:
                raise self._fail(f"exited with code {self._proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer within {self.start_timeout:g} s")
            if self.port is None:
                m = _RUNNING_ON.search(self.log())
                if m:
                    self.port = int(m.group(1))
            if self.port is not None:
                try:  # GET / is S3 ListBuckets: any HTTP answer means it serves requests
                    with opener.open(self.endpoint + "/", timeout=2):
                        return
                except urllib.error.HTTPError:
                    return
                except OSError:
                    pass
            time.sleep(0.1)

    def _create_bucket(self) -> None:
        # moto accepts unsigned requests for this; no SDK needed.
        request = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT", data=b"")
        try:
            with _no_proxy_opener().open(request, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            raise self._fail(f"refused to create bucket {self.bucket!r}: HTTP {exc.code} "
                             f"{exc.read()[:500]!r}") from None
        if status != 200:
            raise self._fail(f"answered HTTP {status} to creating bucket {self.bucket!r}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.port = None
        self._env = None


def ray_workers_see(env: dict[str, str], keys: tuple[str, ...] = (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")) -> bool:
    """Does a plain Ray task (no runtime_env) of the connected Ray see `env`'s values for `keys`?"""
    import ray

    @ray.remote(num_cpus=0.01, max_retries=0)
    def _probe(names):
        return {k: os.environ.get(k) for k in names}

    seen = ray.get(_probe.remote(list(keys)), timeout=120)
    return all(seen.get(k) == env.get(k) for k in keys)
