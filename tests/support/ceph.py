"""A real S3 engine for tests: a single-node Ceph RADOS Gateway as plain processes.

One monitor, one OSD on ``memstore`` (data in RAM, nothing on disk that matters) and radosgw with
the beast frontend on loopback, all children of the test process, no systemd. About three seconds
from nothing to a bucket. The configuration and its reasons are in ``/work/shared/DESIGN.md``
("A real S3 engine for tests"); the short version:

- the monitor address is given as ``v1:`` explicitly: on a port other than 6789 a bare address is
  taken as msgr2-only and v1 clients hang;
- the paxos intervals are shortened, or every monitor command waits about a second;
- the OSD is registered (``osd new``, ``crush add``) before ``--mkfs`` with the "update on start"
  options off, which avoids an intermittent ``wrong fsid`` death at start;
- radosgw ignores SIGTERM for seconds: everything is stopped with SIGKILL after a short wait.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .registry import HOST, free_port

ACCESS_KEY = "REGCACHETESTKEY00001"


class CephError(RuntimeError):
    pass


class CephRGW:
    """``with CephRGW(workdir) as rgw:`` gives ``rgw.endpoint``, keys and ``make_bucket()``."""

    def __init__(self, workdir: Path, *, memstore_bytes: int = 2 << 30) -> None:
        """``memstore_bytes`` caps the RAM the OSD may fill (memstore allocates only what is stored)."""
        self.workdir = Path(workdir)
        self.memstore_bytes = memstore_bytes
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.access_key = ACCESS_KEY
        self.secret_key = secrets.token_hex(20)
        self.conf = self.workdir / "ceph.conf"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.rgw_port}"

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> CephRGW:
        w = self.workdir
        for sub in ("run", "log", "mon", "osd", "rgw"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   f"[v1:{HOST}:{self.mon_port}]", str(w / "monmap")])
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(w / "monmap")])
        self._spawn("mon", ["ceph-mon", "-c", str(self.conf), "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        self._ceph("osd", "crush", "add", f"osd.{osd_id}", "1.0", "host=localhost", "root=default")
        (w / "osd" / f"ceph-{osd_id}").mkdir(parents=True, exist_ok=True)
        self._run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid])
        self._spawn("osd", ["ceph-osd", "-c", str(self.conf), "-f", "-i", osd_id])
        self._spawn("rgw", ["radosgw", "-c", str(self.conf), "-f", "-n", "client.rgw"])
        self._wait_rgw()
        self._run(["radosgw-admin", "-c", str(self.conf), "user", "create", "--uid=regcache-test",
                   "--display-name=regcache test", f"--access-key={self.access_key}",
                   f"--secret-key={self.secret_key}"])
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for proc in reversed(self._procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()  # radosgw ignores SIGTERM for seconds; memstore loses nothing we need
                proc.wait()
        self._procs.clear()
        shutil.rmtree(self.workdir / "osd", ignore_errors=True)

    def __enter__(self) -> CephRGW:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- S3 helpers

    def client(self):  # type: ignore[no-untyped-def]
        """A synchronous boto3 client for assertions (the code under test uses its own)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"regcache-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        client = self.client()
        out: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [item["Key"] for item in page.get("Contents", [])]
        return out

    def empty_bucket(self, bucket: str) -> None:
        """Delete every object and incomplete multipart upload in ``bucket``, then collect RGW's
        garbage: deleted objects' data stays in the OSD (in RAM, with memstore) until RGW's
        garbage collection runs, two hours later by default."""
        client = self.client()
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for key in self.keys(bucket):
            client.delete_object(Bucket=bucket, Key=key)
        self._run(["radosgw-admin", "-c", str(self.conf), "gc", "process", "--include-all"])

    def pids(self) -> list[int]:
        """The monitor, the OSD and radosgw: whose CPU time an S3 request costs."""
        return [proc.pid for proc in self._procs if proc.poll() is None]

    def s3_settings(self, bucket: str, **extra: object) -> dict[str, object]:
        """A ``storage.s3`` settings mapping for regcache."""
        return {
            "endpoint": self.endpoint,
            "bucket": bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            **extra,
        }

    # ----------------------------------------------------------------------------- internals

    def _config(self) -> str:
        w = self.workdir
        return f"""[global]
fsid = {self.fsid}
mon host = v1:{HOST}:{self.mon_port}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {w}/run
admin socket = {w}/run/$name.asok
log file = {w}/log/$name.log
pid file = {w}/run/$name.pid
mon data = {w}/mon/$cluster-$id
osd data = {w}/osd/$cluster-$id
rgw data = {w}/rgw/$cluster-$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd crush update on start = false
osd class update on start = false
mon allow pool size one = true
mon max pg per osd = 1000
mon allow pool delete = true
paxos propose interval = 0.01
paxos min wait = 0.001
ms bind msgr2 = false
[client.rgw]
rgw frontends = beast endpoint={HOST}:{self.rgw_port} tcp_nodelay=1
"""

    def _run(self, args: Sequence[str], timeout: float = 60) -> str:
        done = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    def _ceph(self, *args: str) -> str:
        # A monitor that has just started may refuse commands until it has formed its quorum of one
        # ("EPERM: problem getting command descriptions from mon."): ask again shortly.
        for attempt in range(40):
            try:
                return self._run(["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args])
            except CephError as exc:
                if "problem getting command descriptions" not in str(exc) or attempt == 39:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = (self.workdir / "log" / f"{name}.out").open("ab")
        with log:
            self._procs.append(
                subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait_rgw(self, timeout: float = 60) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise CephError(f"{proc.args[0]} exited ({proc.returncode}): {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.rgw_port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.05)
        raise CephError(f"radosgw did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for path in sorted((self.workdir / "log").glob("*")):
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)


def rgw_available() -> bool:
    return all(shutil.which(b) for b in ("ceph-mon", "ceph-osd", "radosgw", "monmaptool"))


__all__ = ["CephError", "CephRGW", "rgw_available"]
_ = os  # imported for callers that patch the environment
