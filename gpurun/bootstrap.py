"""A machine of a recovering AWS run bootstraps itself from the store: python3 and the metadata only.

This file is the machine's user data (with its configuration appended as
JSON), so it imports only the standard library and nothing of gpurun at the
top: an AMI may lack the AWS CLI, boto3 and pip. Credentials come from the
instance role through IMDSv2, never from the user data. Requests are signed
with Signature Version 4 here.

At every boot of every machine of the group:

1. take a place in `<store>/<run>/attempts.json` with a conditional write
   (If-None-Match for the first machine, If-Match on the ETag after): the
   first machine is generation 1; each later one uses a restart. Two machines
   booting at once cannot both take the last restart: one write fails (412)
   and that machine reads again. When the budget is spent, or the run is
   over, the machine sets its group's desired capacity to 0 and stops;
2. fetch gpurun (`agent/<tag>.tar.gz`) and the code (`code/<sha256>.tar.gz`);
3. restore LATEST into the checkpoint directory (none yet: a fresh start);
4. run setup, start the job with GPURUN_RESUME_FROM and the checkpoint agent;
5. leave a monitor running that, when the job ends, records the outcome and,
   once no job has been alive for `idle_timeout`, scales the group to 0
   (success, failure, budget spent), or restarts the job on this machine (a
   killed job, or a failing one with on_failure) when the budget allows. A
   spot interruption leaves the rest to the group.

The machine never powers itself off: inside a group, that would be replaced.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import io
import json
import os
import pwd
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

ATTEMPTS = "attempts.json"
#: Where job.sh (rendered by gpurun at launch, before the machine's home is known) names the run directory.
RUN_DIR_MARK = "@GPURUN_RUN_DIR@"
RUN_DIR_SAFE = re.compile(r"/[A-Za-z0-9_./-]+")
#: Left in the run directory by `gpurun teardown` before it stops the job: the monitor restarts nothing.
TEARDOWN_MARK = "torn-down"
ATTEMPTS_VERSION = 1  # gpurun.models.SCHEMA_VERSION: this file imports nothing of gpurun (a test keeps them equal)
MAX_DOCUMENT_BYTES = 1_000_000
POLL_SECONDS = 2.0
AGENT_EXIT_WAIT = 600.0
# Metadata requests never go through a proxy.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [gpurun bootstrap] {message}", flush=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- instance metadata (IMDSv2) ------------------------------------------------------------------


class Metadata:
    def __init__(self, endpoint: str | None = None) -> None:
        endpoint = endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254"
        self.endpoint = endpoint.rstrip("/")
        self._token = ""
        self._token_at = 0.0

    def _call(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with _NO_PROXY.open(request, timeout=5) as response:
                return response.status, response.read(MAX_DOCUMENT_BYTES)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, b""

    def get(self, path: str) -> bytes | None:
        for _attempt in range(2):
            if not self._token or time.monotonic() - self._token_at > 3000:
                status, body = self._call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "3600"})
                if status != 200:
                    raise RuntimeError(f"IMDSv2 token: HTTP {status}")
                self._token, self._token_at = body.decode().strip(), time.monotonic()
            status, body = self._call("GET", path, {"X-aws-ec2-metadata-token": self._token})
            if status == 401:
                self._token = ""
                continue
            return body if status == 200 else None
        return None

    def identity(self) -> dict[str, Any]:
        body = self.get("/latest/dynamic/instance-identity/document")
        document = json.loads(body or b"{}")
        if not isinstance(document, dict) or not document.get("instanceId"):
            raise RuntimeError("no instance identity document in the instance metadata")
        return document

    def credentials(self, wait: float = 0.0) -> dict[str, str]:
        """The instance role's temporary credentials; for `wait` seconds, a role not there yet is waited
        for (a new instance profile reaches a new machine a little after it boots)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._credentials()
            except (RuntimeError, OSError, ValueError):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(2.0)

    def _credentials(self) -> dict[str, str]:
        names = (self.get("/latest/meta-data/iam/security-credentials/") or b"").decode().split()
        if not names:
            raise RuntimeError("the instance has no role (instance profile): it cannot reach the store")
        body = self.get(f"/latest/meta-data/iam/security-credentials/{urllib.parse.quote(names[0])}")
        document = json.loads(body or b"{}")
        if not isinstance(document, dict) or not document.get("AccessKeyId"):
            raise RuntimeError("the instance role's credentials are not in the instance metadata")
        return {
            "key": str(document["AccessKeyId"]),
            "secret": str(document["SecretAccessKey"]),
            "token": str(document.get("Token") or ""),
            "expires": str(document.get("Expiration") or ""),
        }


# -- Signature Version 4 -------------------------------------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    body: bytes,
    credentials: dict[str, str],
    region: str,
    service: str,
    when: datetime.datetime | None = None,
    payload_sha256: str | None = None,
) -> dict[str, str]:
    """`headers` plus host, x-amz-date, x-amz-content-sha256, the session token and Authorization.

    `payload_sha256`: the body's sha256 when the caller has it already (the store's lean S3
    path hashes each file once, for the manifest and the signature alike).
    """
    parsed = urllib.parse.urlsplit(url)
    when = when or datetime.datetime.now(datetime.timezone.utc)
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    payload = payload_sha256 or hashlib.sha256(body).hexdigest()
    signed_headers = {name.lower(): value for name, value in headers.items()}
    signed_headers.update({"host": parsed.netloc, "x-amz-date": stamp, "x-amz-content-sha256": payload})
    if credentials.get("token"):
        signed_headers["x-amz-security-token"] = credentials["token"]
    names = sorted(signed_headers)
    pairs = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted(pairs)
    )
    canonical = "\n".join(
        [
            method,
            parsed.path or "/",
            query,
            "".join(f"{name}:{' '.join(str(signed_headers[name]).split())}\n" for name in names),
            ";".join(names),
            payload,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{credentials['secret']}".encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed_headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials['key']}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed_headers


class Aws:
    """Signed requests to S3 and Auto Scaling with the role's credentials (refreshed before expiry)."""

    def __init__(self, metadata: Metadata, region: str) -> None:
        self.metadata = metadata
        self.region = region
        self._credentials: dict[str, str] | None = None
        self._fetched = 0.0

    def credentials(self) -> dict[str, str]:
        # Role credentials live for hours; fetching them every 10 minutes keeps well inside that.
        if self._credentials is None or time.monotonic() - self._fetched > 600:
            self._credentials, self._fetched = self.metadata.credentials(wait=300.0), time.monotonic()
        return self._credentials

    def request(
        self, method: str, url: str, service: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        signed = sign(
            method,
            url,
            headers=headers or {},
            body=body,
            credentials=self.credentials(),
            region=self.region,
            service=service,
        )
        request = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method)
        for name, value in signed.items():
            if name != "host":
                request.add_header(name, value)
        for attempt in range(5):
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, dict(response.headers.items()), response.read()
            except urllib.error.HTTPError as error:
                with error:
                    if error.code >= 500 and attempt < 4:
                        time.sleep(1.0 + attempt)
                        continue
                    return error.code, dict(error.headers.items()), error.read(MAX_DOCUMENT_BYTES)
            except OSError:
                if attempt == 4:
                    raise
                time.sleep(1.0 + attempt)
        raise RuntimeError("unreachable")  # pragma: no cover

    def _endpoint(self, service_env: str) -> str | None:
        """An endpoint override, the way boto3 reads it (a test's moto server, a VPC endpoint)."""
        return os.environ.get(f"AWS_ENDPOINT_URL_{service_env}") or os.environ.get("AWS_ENDPOINT_URL") or None

    def s3_url(self, bucket: str, key: str) -> str:
        quoted = urllib.parse.quote(key, safe="/-_.~")
        endpoint = self._endpoint("S3")
        if endpoint:
            return f"{endpoint.rstrip('/')}/{bucket}/{quoted}"
        if "." in bucket:
            return f"https://s3.{self.region}.amazonaws.com/{bucket}/{quoted}"
        return f"https://{bucket}.s3.{self.region}.amazonaws.com/{quoted}"

    def get_object(self, bucket: str, key: str) -> tuple[bytes, str] | None:
        """(body, ETag), or None when there is no such object."""
        status, headers, body = self.request("GET", self.s3_url(bucket, key), "s3")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET s3://{bucket}/{key}: HTTP {status} {body[:200]!r}")
        etag = next((value for name, value in headers.items() if name.lower() == "etag"), "")
        return body, etag

    def put_object(self, bucket: str, key: str, body: bytes, *, if_match: str | None = None) -> bool:
        """PUT; with `if_match` (an ETag, or "" for "must not exist") False when another writer won."""
        headers = {"content-type": "application/json"}
        if if_match == "":
            headers["if-none-match"] = "*"
        elif if_match is not None:
            headers["if-match"] = if_match
        status, _headers, answer = self.request("PUT", self.s3_url(bucket, key), "s3", body, headers)
        if status in (409, 412):
            return False
        if status != 200:
            raise RuntimeError(f"PUT s3://{bucket}/{key}: HTTP {status} {answer[:200]!r}")
        return True

    def autoscaling(self, action: str, parameters: dict[str, str]) -> None:
        endpoint = self._endpoint("AUTO_SCALING") or f"https://autoscaling.{self.region}.amazonaws.com"
        body = urllib.parse.urlencode({"Action": action, "Version": "2011-01-01", **parameters}).encode()
        headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
        status, _headers, answer = self.request("POST", endpoint.rstrip("/") + "/", "autoscaling", body, headers)
        if status != 200:
            raise RuntimeError(f"{action}: HTTP {status} {answer[:300]!r}")


# -- the restart budget in the store -------------------------------------------------------------


class Budget:
    """attempts.json: machines so far, restarts used of the budget, how the run ended.

    Every change is a read, a change and a conditional write, retried when
    another machine wrote in between.
    """

    def __init__(self, aws: Aws, bucket: str, key: str, run: str, max_restarts: int) -> None:
        self.aws, self.bucket, self.key, self.run, self.max_restarts = aws, bucket, key, run, max_restarts

    def read(self) -> tuple[dict[str, Any] | None, str]:
        found = self.aws.get_object(self.bucket, self.key)
        if found is None:
            return None, ""
        body, etag = found
        if len(body) > MAX_DOCUMENT_BYTES:
            raise RuntimeError(f"{self.key} is larger than {MAX_DOCUMENT_BYTES} bytes")
        document = json.loads(body)
        version = document.get("version") if isinstance(document, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > ATTEMPTS_VERSION:
            # Never rewritten by an older reader: it would drop what the newer one keeps there.
            raise RuntimeError(
                f"{self.key} was written by a newer gpurun (schema version {version}, this one reads up to "
                f"{ATTEMPTS_VERSION}); upgrade gpurun"
            )
        if not isinstance(document, dict) or version != ATTEMPTS_VERSION:
            raise RuntimeError(f"{self.key} is not an attempts document of version {ATTEMPTS_VERSION}")
        return document, etag

    def change(self, update: Any) -> dict[str, Any] | None:
        """Apply update(document or None) -> new document (None: nothing to write); returns it."""
        for _attempt in range(50):
            document, etag = self.read()
            changed = update(json.loads(json.dumps(document)) if document is not None else None)
            if changed is None:
                return document
            body = json.dumps(changed, indent=1, sort_keys=True).encode()
            if self.aws.put_object(self.bucket, self.key, body, if_match=etag if document is not None else ""):
                return dict(changed)
            time.sleep(0.2)
        raise RuntimeError(f"{self.key}: too many concurrent writers")

    def take_machine(self, machine: dict[str, Any]) -> dict[str, Any] | None:
        """This machine's generation entry, or None when it must not run the job (budget spent, run over)."""
        granted: list[dict[str, Any]] = []

        def update(document: dict[str, Any] | None) -> dict[str, Any] | None:
            granted.clear()
            if document is None:
                entry = {**machine, "generation": 1, "started_at": now_iso(), "restarts": 0}
                granted.append(entry)
                return {
                    "version": ATTEMPTS_VERSION,
                    "run": self.run,
                    "max_restarts": self.max_restarts,
                    "restarts_used": 0,
                    "state": "running",
                    "machines": [entry],
                }
            machines = document.setdefault("machines", [])
            for entry in machines:
                if entry.get("instance_id") == machine["instance_id"]:
                    granted.append(entry)  # the same machine booting again: no new charge
                    return None
            if document.get("state") != "running":
                return None
            if int(document.get("restarts_used", 0)) >= self.max_restarts:
                document["state"] = "budget_spent"
                document["ended_at"] = now_iso()
                return document
            for entry in machines:
                if not entry.get("ended_at"):
                    entry["ended_at"], entry["why"] = now_iso(), "replaced"
            document["restarts_used"] = int(document.get("restarts_used", 0)) + 1
            entry = {**machine, "generation": len(machines) + 1, "started_at": now_iso(), "restarts": 0}
            machines.append(entry)
            granted.append(entry)
            return document

        self.change(update)
        return granted[0] if granted else None

    def take_restart(self, instance_id: str) -> bool:
        """One restart of the job on this machine; False when the budget is spent."""
        taken: list[bool] = []

        def update(document: dict[str, Any] | None) -> dict[str, Any] | None:
            taken.clear()
            if document is None or document.get("state") != "running":
                return None
            if int(document.get("restarts_used", 0)) >= self.max_restarts:
                document["state"], document["ended_at"] = "budget_spent", now_iso()
                return document
            document["restarts_used"] = int(document.get("restarts_used", 0)) + 1
            for entry in document.get("machines", []):
                if entry.get("instance_id") == instance_id:
                    entry["restarts"] = int(entry.get("restarts", 0)) + 1
            taken.append(True)
            return document

        self.change(update)
        return bool(taken)

    def record(self, instance_id: str, *, state: str | None = None, **fields: Any) -> None:
        """Set fields on this machine's entry (and the run's state, when given)."""

        def update(document: dict[str, Any] | None) -> dict[str, Any] | None:
            if document is None:
                return None
            for entry in document.get("machines", []):
                if entry.get("instance_id") == instance_id:
                    entry.update(fields)
            if state is not None and document.get("state") == "running":
                document["state"], document["ended_at"] = state, now_iso()
            return document

        self.change(update)


# -- the machine ---------------------------------------------------------------------------------


class Machine:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.run = str(config["run"])
        user = str(config.get("user") or "root")
        home = os.environ.get("GPURUN_BOOT_HOME") or _home_of(user)
        self.run_dir = os.path.join(home, "gpurun", self.run)
        self.work = os.path.join(self.run_dir, "work")
        self.checkpoint_dir = os.path.join(self.work, str(config["checkpoint_dir"]))
        self.agent_dir = os.path.join(home, ".gpurun", "agent", str(config["agent_tag"]))
        self.metadata = Metadata()
        self.identity = self.metadata.identity()
        self.instance_id = str(self.identity["instanceId"])
        self.aws = Aws(self.metadata, str(config.get("region") or self.identity.get("region")))
        bucket, _, prefix = str(config["store"])[len("s3://") :].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.budget = Budget(self.aws, bucket, self.key(ATTEMPTS), self.run, int(config["max_restarts"]))

    def key(self, name: str) -> str:
        return "/".join(part for part in (self.prefix, self.run, name) if part)

    def generation(self) -> int:
        """This machine's generation in attempts.json (1 when it cannot be read)."""
        document, _etag = self.budget.read()
        for entry in (document or {}).get("machines", []):
            if isinstance(entry, dict) and entry.get("instance_id") == self.instance_id:
                return int(entry.get("generation") or 1)
        return 1

    def scale_to_zero(self, why: str) -> None:
        log(f"{why}: setting the desired capacity of {self.config['group']} to 0")
        self.aws.autoscaling(
            "SetDesiredCapacity",
            {"AutoScalingGroupName": str(self.config["group"]), "DesiredCapacity": "0", "HonorCooldown": "false"},
        )

    def fetch(self, key: str, into: str) -> None:
        found = self.aws.get_object(self.bucket, self.key(key))
        if found is None:
            raise RuntimeError(f"s3://{self.bucket}/{self.key(key)} is missing")
        incoming = into + ".incoming"
        subprocess.run(["rm", "-rf", incoming], check=True)
        os.makedirs(incoming)
        with tarfile.open(fileobj=io.BytesIO(found[0]), mode="r:gz") as archive:
            # The "data" filter refuses links out of the target, device files and absolute names.
            archive.extraction_filter = getattr(tarfile, "data_filter", None)
            if archive.extraction_filter is None:
                raise RuntimeError("this python3 cannot extract archives safely (needs 3.10.12, 3.11.4 or later)")
            archive.extractall(incoming)
        subprocess.run(["rm", "-rf", into], check=True)
        os.rename(incoming, into)

    def python(self) -> str:
        """The agent's python: boto3 is the one thing it needs beyond the standard library."""
        chosen = os.environ.get("GPURUN_AGENT_PYTHON")
        if chosen:
            return chosen
        if subprocess.run(["python3", "-c", "import boto3"], capture_output=True).returncode == 0:
            return "python3"
        venv = os.path.join(os.path.dirname(os.path.dirname(self.agent_dir)), "venv")
        if subprocess.run(["python3", "-m", "venv", venv], capture_output=True).returncode == 0:
            install = [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "boto3"]
        else:
            # No ensurepip (Debian without python3-venv): a bare venv, filled by the system's pip.
            subprocess.run(["rm", "-rf", venv], check=True)
            subprocess.run(["python3", "-m", "venv", "--without-pip", venv], check=True)
            install = ["python3", "-m", "pip", "--python", f"{venv}/bin/python", "install", "--quiet", "boto3"]
        subprocess.run(install, check=True, capture_output=True)
        return f"{venv}/bin/python"

    def agent_env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": self.agent_dir, "PYTHONNOUSERSITE": "1"}

    def install_secrets(self, python: str) -> str | None:
        """The spec's ssm: and secretsmanager: references into <run_dir>/secrets.env (0600), read with
        the instance role (which may read exactly those); None when done, else the line that says
        which one failed. A value is never logged."""
        references = self.config.get("secrets") or {}
        if not references:
            return None
        path = os.path.join(self.run_dir, "secrets.env")
        _remove(path)
        request = json.dumps({"file": path, "region": self.aws.region, "references": references})
        done = subprocess.run(
            [python, "-m", "gpurun.agent.resolve_secrets"],
            input=request,
            env=self.agent_env(),
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return None
        said = done.stderr.strip().splitlines()
        return said[-1][:400] if said else f"resolving secrets failed with exit status {done.returncode}"

    def restore(self, python: str) -> bool:
        """LATEST of this run into the checkpoint directory; before its first snapshot, the run it resumes."""
        sources = [(str(self.config["store"]), self.run, None)]
        resumed = self.config.get("resume_from")
        if isinstance(resumed, dict):
            sources.append((str(resumed["store"]), str(resumed["run"]), resumed.get("seq")))
        for store, run, seq in sources:
            arguments = [python, "-m", "gpurun.agent", "--to", store, "--restore-from", run]
            arguments += ["--into", self.checkpoint_dir, "--force", "--region", self.aws.region]
            if seq is not None:
                arguments += ["--seq", str(seq)]
            done = subprocess.run(arguments, env=self.agent_env(), capture_output=True, text=True)
            said = (done.stdout + done.stderr).strip().splitlines()
            log(f"restore from {run}: {said[-1] if said else done.returncode}")
            if done.returncode == 0:
                # The restore moved the dead job's directory aside: keep the newest such copy only (disk).
                parent, name = os.path.split(self.checkpoint_dir)
                aside = sorted(entry for entry in os.listdir(parent) if entry.startswith(f"{name}.gpurun-old-"))
                for entry in aside[:-1]:
                    subprocess.run(["rm", "-rf", "--", os.path.join(parent, entry)], check=False)
                return True
        return False

    def start(self, python: str, *, setup: bool, resume: bool, generation: int) -> None:
        """Write job.sh (rendered by gpurun at launch) and start the agent and the job in their own sessions."""
        if not RUN_DIR_SAFE.fullmatch(self.run_dir):
            raise RuntimeError(f"the run directory {self.run_dir!r} has characters job.sh cannot hold unquoted")
        for name in ("job.exit", "job.phase", "interrupted", "sync.request"):
            _remove(os.path.join(self.run_dir, name))
        template = str(self.config["job_script" if setup else "job_script_no_setup"])
        _write(os.path.join(self.run_dir, "job.sh"), template.replace(RUN_DIR_MARK, self.run_dir))
        agent = [python, "-m", "gpurun.agent", "--watch", self.checkpoint_dir, "--to", str(self.config["store"])]
        agent += ["--run", self.run, "--every", str(self.config["every"]), "--keep", str(self.config["keep"])]
        agent += ["--run-dir", self.run_dir, "--region", self.aws.region]
        # Each machine's output goes to the store as its own job-NNNN (N: the generation): a new
        # machine's job.log starts at byte 0 and must not overwrite its predecessor's chunks.
        agent += ["--job", str(generation)]
        if self.config.get("spot"):
            agent.append("--spot-notice")
        _write(
            os.path.join(self.run_dir, "agent.pid"), str(_detach(agent, self.run_dir, "agent.log", self.agent_env()))
        )
        env = {**os.environ, "AWS_DEFAULT_REGION": self.aws.region, "AWS_REGION": self.aws.region}
        if resume:
            env["GPURUN_RESUME_FROM"] = self.checkpoint_dir
        _write(os.path.join(self.run_dir, "job.pid"), str(_detach(["bash", "job.sh"], self.run_dir, "job.log", env)))


def _home_of(user: str) -> str:
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return os.path.expanduser("~")


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _detach(argv: list[str], run_dir: str, log_name: str, env: dict[str, str] | None) -> int:
    with open(os.path.join(run_dir, log_name), "ab") as output:
        process = subprocess.Popen(
            argv,
            cwd=run_dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return process.pid


def _alive(path: str) -> bool:
    try:
        with open(path) as handle:
            pid = int(handle.read().strip())
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and line.split()[1] == "Z" for line in handle)
    except (OSError, ValueError):
        return False


def boot(config: dict[str, Any]) -> int:
    """Everything a new machine does; returns with the job and a monitor running, or the group at 0.

    A machine that fails to set itself up ends the run rather than sit idle, billed, in its group:
    it records why in attempts.json and scales the group to 0 (the same failure would repeat on a
    replacement). Without credentials it cannot: the scheduled max_runtime guard ends it then.
    """
    machine = Machine(config)
    try:
        return _boot(machine, config)
    except Exception as error:
        problem = f"bootstrap failed: {type(error).__name__}: {error}"[:300]
        log(problem)
        try:
            machine.budget.record(machine.instance_id, state="failed", ended_at=now_iso(), why=problem)
        finally:
            machine.scale_to_zero(problem)
        return 1


def _boot(machine: Machine, config: dict[str, Any]) -> int:
    identity = machine.identity
    entry = machine.budget.take_machine(
        {
            "instance_id": machine.instance_id,
            "type": identity.get("instanceType"),
            "zone": identity.get("availabilityZone"),
            # Where this machine keeps the run: `ssh` and `checkpoint-sync` go there (the login's home may
            # not be /home/<user> on every image).
            "run_dir": machine.run_dir,
        }
    )
    if entry is None:
        machine.scale_to_zero("the run is over or its restart budget is spent")
        return 0
    log(f"{machine.instance_id}: generation {entry['generation']} of {machine.run}")
    os.makedirs(machine.run_dir, mode=0o700, exist_ok=True)
    machine.fetch(f"agent/{config['agent_tag']}.tar.gz", machine.agent_dir)
    machine.fetch(f"code/{config['code']}.tar.gz", machine.work)
    python = machine.python()
    problem = machine.install_secrets(python)
    if problem is not None:
        log(problem)
        machine.budget.record(machine.instance_id, state="failed", ended_at=now_iso(), why=problem)
        machine.scale_to_zero(f"secrets could not be read ({problem})")
        return 1
    resumed = machine.restore(python)
    machine.start(python, setup=True, resume=resumed, generation=int(entry["generation"]))
    machine.budget.record(machine.instance_id, job_started_at=now_iso(), resumed=resumed)
    monitor = [sys.executable, os.path.abspath(sys.argv[0]), "--monitor"]
    _detach(monitor, machine.run_dir, "monitor.log", None)
    return 0


def monitor(config: dict[str, Any]) -> int:
    """Wait for the job to end; restart it here, or end the run and scale the group to 0."""
    machine = Machine(config)
    run_dir = machine.run_dir
    while True:
        exit_path = os.path.join(run_dir, "job.exit")
        while not os.path.exists(exit_path) and _alive(os.path.join(run_dir, "job.pid")):
            time.sleep(POLL_SECONDS)
        job_ended = time.monotonic()
        deadline = time.monotonic() + AGENT_EXIT_WAIT
        while _alive(os.path.join(run_dir, "agent.pid")) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)  # the agent's final snapshot comes first
        if not os.path.isdir(run_dir) or os.path.exists(os.path.join(run_dir, TEARDOWN_MARK)):
            # Not a lost job: teardown stopped it (and removes the run directory, then the group). A restart
            # here would spend the budget and start the job again on a machine that is being deleted.
            log("gpurun teardown stopped the job; nothing is restarted")
            return 0
        try:
            code: int | None = int(open(exit_path).read().strip())
        except (OSError, ValueError):
            code = None
        if os.path.exists(os.path.join(run_dir, "interrupted")):
            machine.budget.record(machine.instance_id, ended_at=now_iso(), why="spot interruption", exit_code=code)
            log("spot interruption: the group replaces this machine")
            return 0
        if code == 0:
            machine.budget.record(machine.instance_id, state="succeeded", ended_at=now_iso(), why="job succeeded")
            linger(machine, "the job succeeded", since=job_ended)
            return 0
        lost = code is None or code > 128
        if (lost or config.get("on_failure")) and machine.budget.take_restart(machine.instance_id):
            log(f"the job ended with exit status {code}; restarting it here from LATEST")
            python = machine.python()
            machine.start(python, setup=False, resume=machine.restore(python), generation=machine.generation())
            continue
        document, _etag = machine.budget.read()
        spent = bool(document and document.get("state") == "budget_spent")
        why = "restart budget spent" if spent else "job failed"
        machine.budget.record(machine.instance_id, state="failed", ended_at=now_iso(), why=why, exit_code=code)
        linger(machine, f"the job ended with exit status {code} ({why})", since=job_ended)
        return 0


def linger(machine: Machine, why: str, *, since: float) -> None:
    """After the run ended: keep the machine for `idle_timeout` (to ssh in, read logs, sync a checkpoint),
    then scale the group to 0. A job alive again on the machine (its job.pid) restarts the wait, as on a
    plain AWS machine. With idle_timeout null the machine stays until teardown or the scheduled guard.

    Never a power-off: inside a group a machine that ends itself is replaced.
    """
    idle = machine.config.get("idle_timeout", 0)
    if idle is None:
        log(f"{why}; idle_timeout is off: this machine stays until `gpurun teardown` or the max_runtime guard")
        return
    idle_s = max(0.0, float(idle))
    if idle_s > 0:
        log(f"{why}; keeping this machine until no job has been alive for {idle_s:g}s (idle_timeout)")
        wait_idle(os.path.join(machine.run_dir, "job.pid"), idle_s, since=since)
        why += f", and no job has been alive for {idle_s:g}s (idle_timeout)"
    machine.scale_to_zero(why)


def wait_idle(pid_path: str, idle_s: float, *, since: float, poll: float = POLL_SECONDS) -> None:
    """Return once the process in `pid_path` has not been alive for `idle_s` (counted from `since`)."""
    idle_since = since
    busy = False
    while True:
        now = time.monotonic()
        if _alive(pid_path):
            if not busy:
                log("a job is alive on this machine again: idle_timeout counts from its end")
            busy, idle_since = True, now
        elif now - idle_since >= idle_s:
            return
        else:
            busy = False
        time.sleep(min(poll, max(0.05, idle_s - (now - idle_since))))


def main(config: dict[str, Any], argv: list[str]) -> int:
    switched = _as_login_user(config, argv)
    if switched is not None:
        return switched
    if "--monitor" in argv:
        return monitor(config)
    return boot(config)


def _as_login_user(config: dict[str, Any], argv: list[str]) -> int | None:
    """cloud-init runs user data as root; the job, its files and `gpurun ssh` belong to ssh.user.

    Runs this program again as that user (None when it already is, or when a test gave the home).
    """
    user = str(config.get("user") or "root")
    if os.geteuid() != 0 or user == "root" or os.environ.get("GPURUN_BOOT_HOME"):
        return None
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        log(f"no user {user!r} on this image: running as root")
        return None
    # The user data file is root's alone: a copy the user may read (it holds no credentials).
    copy = os.path.join("/var/tmp", f"gpurun-bootstrap-{config['run']}.py")
    with open(os.path.abspath(sys.argv[0]), "rb") as source, open(copy + ".tmp", "wb") as target:
        target.write(source.read())
    os.chown(copy + ".tmp", account.pw_uid, account.pw_gid)
    os.chmod(copy + ".tmp", 0o500)
    os.replace(copy + ".tmp", copy)
    env = {**os.environ, "HOME": account.pw_dir, "USER": user, "LOGNAME": user}
    command = ["runuser", "-u", user, "--", sys.executable, copy, *argv]
    return subprocess.run(command, env=env, check=False).returncode


def user_data(config: dict[str, Any]) -> str:
    """A machine's whole user data: this module compressed (user data is at most 16 KB) and `config`."""
    import base64
    import zlib

    with open(__file__, "rb") as handle:
        payload = base64.b64encode(zlib.compress(handle.read(), 9)).decode()
    return (
        "#!/usr/bin/env python3\n"
        f"# gpurun bootstrap for run {config['run']}: gpurun/bootstrap.py (compressed) and its settings.\n"
        "# No credentials here: the instance role has them.\n"
        "import base64, json, sys, zlib\n"
        f"CONFIG = json.loads({json.dumps(json.dumps(config, sort_keys=True))})\n"
        f'SOURCE = zlib.decompress(base64.b64decode("{payload}"))\n'
        'namespace = {"__name__": "gpurun_bootstrap"}\n'
        'exec(compile(SOURCE, "gpurun/bootstrap.py", "exec"), namespace)\n'
        'sys.exit(namespace["main"](CONFIG, sys.argv[1:]))\n'
    )
