"""AWS as it really behaves, which moto never does: capacity errors as HTTP 500, throttling,
stale describes, NotFound for an instance that runs, Ctrl-C while SSH is awaited.

Faults that botocore's retry loop must see (HTTP status, throttling) are answered from a
`before-send` handler, below that loop, against moto's server over HTTP; the rest from
`before-call`/`after-call` handlers on in-process moto. Every test asserts what the CLI
printed or what moto holds afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402
from botocore.awsrequest import AWSResponse  # noqa: E402

from gpurun.cli import main  # noqa: E402
from gpurun.errors import GpurunError, Interrupted  # noqa: E402
from gpurun.providers.aws import AwsProvider  # noqa: E402
from gpurun.providers.aws.teardown import Timing  # noqa: E402
from tests.plugins.aws_fake import (  # noqa: E402
    AMI,
    FakeAws,
    Saves,
    acquire,
    key_dir,
    leftovers,
    make_provider,
    make_spec,
    new_record,
    text,
)

ACCOUNT = "123456789012"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


# -- below botocore's retry loop: moto's server, faults answered at before-send ----------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


def _ec2_error(status: int, code: str, message: str) -> AWSResponse:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        "<RequestID>fault</RequestID></Response>"
    ).encode()
    return AWSResponse("https://ec2.fault/", status, {"Content-Type": "text/xml"}, _Body(body))


def _iam_error(status: int, code: str, message: str) -> AWSResponse:
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>fault</RequestId></ErrorResponse>"
    ).encode()
    return AWSResponse("https://iam.fault/", status, {"Content-Type": "text/xml"}, _Body(body))


class SendFaults:
    """A before-send handler: sees every HTTP attempt (retries included) and may answer it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.run_instances: str | None = None  # answer every RunInstances with this capacity error (HTTP 500)
        self.throttle: Counter[str] = Counter()  # operation -> attempts still to throttle
        self.spot_price: float | None = None  # what DescribeSpotPriceHistory answers, in every zone

    def spot_history(self, model: Any, params: dict[str, Any], **_: Any) -> Any:
        if self.spot_price is None:
            return None
        zones = [f"us-east-1{letter}" for letter in "abcdef"]
        history = [
            {"AvailabilityZone": zone, "InstanceType": params["body"]["InstanceType.1"],
             "ProductDescription": "Linux/UNIX", "SpotPrice": f"{self.spot_price:.4f}"}
            for zone in zones
        ]  # fmt: skip
        return AWSResponse("https://ec2.fault/", 200, {}, None), {"SpotPriceHistory": history}

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        body = request.body or b""
        fields = {k: v[0] for k, v in parse_qs(body.decode() if isinstance(body, bytes) else body).items()}
        operation = fields.get("Action", "")
        self.sent.append((operation, fields))
        if self.throttle[operation] > 0:
            self.throttle[operation] -= 1
            maker = _iam_error if "iam" in str(request.url) else _ec2_error
            return maker(400 if maker is _iam_error else 503, "RequestLimitExceeded" if maker is _ec2_error
                         else "Throttling", "Request limit exceeded.")  # fmt: skip
        if operation == "RunInstances" and self.run_instances:
            return _ec2_error(500, self.run_instances, f"injected {self.run_instances}")
        return None

    def count(self, operation: str) -> int:
        return sum(1 for name, _ in self.sent if name == operation)

    def pairs(self) -> Counter[tuple[str, str]]:
        return Counter(
            (fields["InstanceType"], fields.get("SubnetId", "")) for name, fields in self.sent if name == "RunInstances"
        )


@pytest.fixture
def server_world(moto_server: str, moto_validation: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`gpurun launch` against moto's server, every EC2/IAM attempt passing through SendFaults."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    faults = SendFaults()
    original_init = AwsProvider.__init__

    def patched_init(self: AwsProvider, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.event_handlers.append(("before-send.ec2", faults))
        self.event_handlers.append(("before-send.iam", faults))
        self.event_handlers.append(("before-call.ec2.DescribeSpotPriceHistory", faults.spot_history))
        self.wait_ssh = lambda machines, cidr, say: None
        self.host_key_timeout = 0
        self.poll_interval = 0.0
        self.sleep = lambda seconds: None
        self.teardown_timing = Timing(poll_interval=0.0, terminate_timeout=10.0, dependency_timeout=1.0)

    monkeypatch.setattr(AwsProvider, "__init__", patched_init)

    def spec(**aws: Any) -> Path:
        recovery = aws.pop("recovery", None)
        settings = {"instance_type": ["g5.xlarge", "g6.xlarge"], "ami": AMI, "ssh_cidr": "127.0.0.1/32", **aws}
        document = {
            "name": "faults",
            "provider": "aws",
            "run": "python train.py",
            "checkpoint": {"store": f"s3://{bucket}/runs", "resume": "never"},
            "aws": settings,
        }
        if recovery is not None:
            document["recovery"] = recovery
        path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(json.dumps(document))
        return path

    return {"faults": faults, "spec": spec, "endpoint": moto_server}


def run_resources(endpoint: str, run: str) -> list[str]:
    """What moto holds for `run` (tagged or named), terminated instances excepted."""
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = f"gpurun-{run}"
    found = [
        f"instance {item['InstanceId']}"
        for reservation in ec2.describe_instances(Filters=[{"Name": "tag:gpurun:run", "Values": [run]}])["Reservations"]
        for item in reservation["Instances"]
        if item["State"]["Name"] != "terminated"
    ]
    found += [f"sg {g['GroupId']}" for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] == name]
    found += [f"key {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"] == name]
    found += [f"role {r['RoleName']}" for r in iam.list_roles()["Roles"] if r["RoleName"] == name]
    found += [
        f"profile {p['InstanceProfileName']}"
        for p in iam.list_instance_profiles()["InstanceProfiles"]
        if p["InstanceProfileName"] == name
    ]
    return found


def _describe_instances_refused_once(recorder) -> None:
    """The next DescribeInstances is refused: AWS's state stays unread, the record's address stands.
    Not a throttling code, which botocore would retry itself."""
    recorder.fail_once["DescribeInstances"] = (
        "UnauthorizedOperation",
        "You are not authorized to perform this operation.",
    )


def test_capacity_errors_are_sent_once_per_type_and_zone_and_the_cli_prints_the_table(server_world, capsys):
    faults: SendFaults = server_world["faults"]
    faults.run_instances = "InsufficientInstanceCapacity"
    code, out, err = cli(capsys, "launch", str(server_world["spec"]()), "--name", "faults-cap001")
    assert code == 3, err
    pairs = faults.pairs()
    assert len(pairs) >= 4 and {kind for kind, _ in pairs} == {"g5.xlarge", "g6.xlarge"}
    assert set(pairs.values()) == {1}, f"each type/zone pair must get one request, got {dict(pairs)}"
    lines = err.strip().splitlines()
    first = next(line for line in lines if line.startswith("error:"))
    assert first.startswith("error: launch of faults-cap001 failed while acquiring machines: no capacity for ")
    assert first.endswith("; everything it created was removed")
    table = lines[lines.index(first) + 1 :]
    assert table[0].split() == ["type", "zone", "error", "message"]
    assert sum("InsufficientInstanceCapacity" in line for line in table) == len(pairs)
    assert table[-1].startswith("  removed: ") and "key pair gpurun-faults-cap001" in table[-1]
    assert out == ""
    assert run_resources(server_world["endpoint"], "faults-cap001") == []


def test_a_throttled_rollback_after_a_capacity_failure_still_removes_everything(server_world, capsys):
    faults: SendFaults = server_world["faults"]
    faults.run_instances = "InsufficientInstanceCapacity"
    # The rollback's calls are throttled: its clients retry them on a budget of their own.
    for operation in ("DescribeInstances", "DeleteSecurityGroup", "DeleteKeyPair", "DeleteRole"):
        faults.throttle[operation] = 2
    code, _out, err = cli(capsys, "launch", str(server_world["spec"]()), "--name", "faults-thr001")
    assert code == 3, err
    assert "everything it created was removed" in err
    assert set(faults.pairs().values()) == {1}
    for operation in ("DeleteSecurityGroup", "DeleteKeyPair", "DeleteRole"):
        assert faults.count(operation) == 3, operation  # two throttled attempts, then the one that worked
    assert run_resources(server_world["endpoint"], "faults-thr001") == []


def test_spot_max_price_too_low_names_the_price_and_what_to_change(server_world, capsys):
    faults: SendFaults = server_world["faults"]
    faults.run_instances = "SpotMaxPriceTooLow"
    faults.spot_price = 0.4321
    # One-off machines (no recovery): a recovering spot run fails over inside its Auto Scaling group.
    spec = server_world["spec"](instance_type=["g5.xlarge"], spot=True, max_price=0.01, recovery={"max_restarts": 0})
    code, _out, err = cli(capsys, "launch", str(spec), "--name", "faults-spot01")
    assert code == 3, err
    rows = [line for line in err.splitlines() if line.startswith("  g5.xlarge ")]
    assert rows and all("spot price now $0.4321/h, above aws.max_price $0.01/h" in row for row in rows), err
    assert "raise aws.max_price" in err and "aws.spot: false" in err
    assert run_resources(server_world["endpoint"], "faults-spot01") == []


# -- above it: in-process moto, faults from before-call/after-call handlers ---------------------------


@pytest.fixture
def recorder() -> FakeAws:
    return FakeAws()


class StaleFilteredDescribes:
    """EC2 right after RunInstances: describes with a tag filter do not list the new instance yet."""

    def __init__(self) -> None:
        self.hidden = 0

    def before_params(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["gpurun_by_tag"] = any(
            str(f.get("Name", "")).startswith("tag:") for f in params.get("Filters", []) or []
        )

    def after_tagged(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if context.get("gpurun_by_tag"):
            for reservation in parsed.get("Reservations", []):
                self.hidden += len(reservation.get("Instances", []))
            parsed["Reservations"] = []


def test_rollback_after_a_stale_describe_terminates_by_recorded_id_and_removes_keys_last(session, recorder, tmp_path):
    provider = make_provider(recorder)
    stale = StaleFilteredDescribes()
    provider.event_handlers += [
        ("provide-client-params.ec2.DescribeInstances", stale.before_params),
        ("after-call.ec2.DescribeInstances", stale.after_tagged),
    ]
    recorder.interrupt_before.add("DescribeInstances")  # Ctrl-C at the first describe after RunInstances
    said: list[str] = []
    record = new_record()
    with pytest.raises(Interrupted) as caught:
        acquire(provider, make_spec(tmp_path), record, Saves(), said)
    message = text(caught.value)
    assert stale.hidden >= 1, "the tag-filtered describe must have missed the instance"
    assert "everything it created was removed" in message
    assert leftovers(session, recorder) == []
    assert recorder.calls.count("TerminateInstances") == 1
    assert not key_dir().exists()
    removed = message.splitlines()[-1]
    assert removed.startswith("removed: instance i-") and removed.endswith(f"key files {key_dir()}")


def test_not_found_on_terminate_for_a_live_instance_is_checked_and_sent_again(session, recorder, tmp_path):
    provider = make_provider(recorder)
    provider.wait_ssh = _ssh_never_answers
    recorder.fail_once["TerminateInstances"] = ("InvalidInstanceID.NotFound", "The instance ID does not exist")
    said: list[str] = []
    with pytest.raises(GpurunError) as caught:
        acquire(provider, make_spec(tmp_path), new_record(), Saves(), said)
    assert "everything it created was removed" in str(caught.value)
    assert recorder.calls.count("TerminateInstances") == 2
    assert any("NotFound right after launch" in line for line in said), said
    assert leftovers(session, recorder) == []
    assert not key_dir().exists()


def test_not_found_that_never_ends_is_bounded_and_says_what_is_left(session, recorder, tmp_path):
    provider = make_provider(recorder)
    provider.wait_ssh = _ssh_never_answers
    provider.teardown_timing.not_found_timeout = 0.2

    def not_found(model: Any, **_: Any) -> Any:
        if model.name == "TerminateInstances":
            return AWSResponse("https://fake/", 400, {}, None), {
                "Error": {"Code": "InvalidInstanceID.NotFound", "Message": "does not exist"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
        return None

    provider.event_handlers.insert(0, ("before-call", not_found))
    record = new_record()
    started = time.monotonic()
    with pytest.raises(GpurunError) as caught:
        acquire(provider, make_spec(tmp_path), record, Saves(), [])
    assert time.monotonic() - started < 30
    assert "some of what it created is left: run `gpurun teardown exp-abc123`" in str(caught.value)
    [instance] = [entry for entry in leftovers(session, recorder) if entry.startswith("instance ")]
    assert record["state"] == "failed" and record["resources"]["instances"] == [instance.split()[1]]
    assert key_dir().exists(), "the key stays while its instance may still run"
    session.client("ec2").terminate_instances(InstanceIds=[instance.split()[1]])


def _ssh_never_answers(machines: list[dict[str, Any]], cidr: str, say: Any) -> None:
    raise GpurunError(f"{machines[0]['instance_id']} is running but SSH did not answer: check ssh_cidr (now {cidr})")


@pytest.fixture
def python_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class TimedSaid(list):
    """say/warn/error with the moment each line arrived."""

    def say(self, message: str) -> None:
        self.append((time.monotonic(), message))

    warn = error = say


def test_sigint_during_the_ssh_wait_is_answered_at_once(session, recorder, python_sigint, tmp_path):
    from moto.ec2.models import ec2_backends

    from gpurun.app.connections import Connections
    from gpurun.app.launch import rolled_back

    silent = socket.socket()  # accepts, never sends a banner: SSH "not up yet"
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    provider = make_provider(recorder)
    provider.wait_ssh = provider._wait_ssh
    provider.ssh_timeout = 300.0
    provider.ssh_poll_interval = 0.2

    def loopback(parsed: dict[str, Any], **_: Any) -> None:
        for item in parsed.get("Instances", []):
            ec2_backends[ACCOUNT]["us-east-1"].get_instance(item["InstanceId"]).nics[0].public_ip = "127.0.0.1"

    provider.event_handlers.append(("after-call.ec2.RunInstances", loopback))
    spec = make_spec(tmp_path)
    spec.ssh.port = silent.getsockname()[1]
    sent: list[float] = []

    def say(message: str) -> None:
        if message.startswith("waiting for SSH on"):

            def interrupt() -> None:
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)

            threading.Timer(0.3, interrupt).start()

    record = new_record()
    reporter = TimedSaid()
    error: BaseException | None = None
    try:
        provider.acquire(spec, record, Saves(), say)
    except BaseException as raised:  # noqa: BLE001 - KeyboardInterrupt must not reach pytest
        error = rolled_back(raised, provider, Connections(), record, [], reporter, Saves(), "acquiring machines")
    finally:
        silent.close()
    assert sent, "the SSH wait never started"
    assert isinstance(error, Interrupted), repr(error)
    assert str(error).startswith("launch of exp-abc123 interrupted while waiting for SSH")
    answered_at, first = reporter[0]
    assert first == "interrupted, removing what it created…"
    assert answered_at - sent[0] < 2.0, f"answered {answered_at - sent[0]:.1f}s after Ctrl-C"
    assert any("terminating 1 instance(s)" in line for _, line in reporter)
    assert leftovers(session, recorder) == []


# -- status after AWS took the machine -----------------------------------------------------------------


def test_a_reclaimed_run_keeps_its_last_checkpoint_and_its_cost(session, recorder, tmp_path, capsys, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from gpurun import runs
    from gpurun.app import status as status_module
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    monkeypatch.setattr(status_module, "get_provider", lambda name: provider)
    record, machines, _ = launch(provider, make_spec(tmp_path))
    store = tmp_path / "store"
    (store / record["run"]).mkdir(parents=True)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (store / record["run"] / "LATEST").write_text(json.dumps({"seq": 2, "at": at, "files": 1, "bytes": 4096}))
    record.update(state="running", store=f"file://{store}")
    runs.save(record)
    recorder.launch_shift = timedelta(hours=1)
    session.client("ec2").terminate_instances(InstanceIds=[machines[0]["instance_id"]])  # the spot reclaim

    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    [shown] = json.loads(out)
    assert shown["state"] == "interrupted"
    assert shown["last_checkpoint"] == {"seq": 2, "at": at, "bytes": 4096}
    assert shown["cost_usd"] == pytest.approx(1.006, rel=0.05)
    saved = runs.load(record["run"])
    assert saved["state"] == "interrupted" and saved["last_checkpoint"]["seq"] == 2
    assert saved["cost_usd"] == shown["cost_usd"]

    def vanished(model: Any, parsed: dict[str, Any], **_: Any) -> None:
        if model.name == "DescribeInstances":
            parsed["Reservations"] = []  # an hour later AWS no longer knows the instance

    provider.event_handlers.append(("after-call", vanished))
    provider._sessions.clear()
    code, out, err = cli(capsys, "status", "--json")
    [shown] = json.loads(out)
    assert shown["instances"][0]["state"] == "gone"
    assert shown["last_checkpoint"]["seq"] == 2
    assert shown["cost_usd"] == pytest.approx(1.006, rel=0.05)


def test_a_launching_run_whose_launcher_died_says_so_and_names_teardown(tmp_path, capsys):
    import subprocess
    import sys

    from gpurun import runs

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    base = {
        "provider": "local",
        "state": "launching",
        "exit_code": None,
        "created_at": runs.now_iso(),
        "store": f"file://{tmp_path}/store",
        "machines": [],
        "resources": {},
    }
    runs.save({**base, "run": "dead-000001", "launcher": {**runs.this_process(), "pid": finished.pid}})
    runs.save({**base, "run": "live-000001", "launcher": runs.this_process()})
    code, out, err = cli(capsys, "status")
    assert code == 0, err
    assert (
        f"dead-000001 is still `launching` but the process that launched it (pid {finished.pid}) is gone: "
        "`gpurun teardown dead-000001` removes what it created"
    ) in err
    assert "live-000001" not in err
    assert "launching (launcher gone)" in out
    code, out, err = cli(capsys, "status", "--json")
    assert {run["run"]: run["launcher_gone"] for run in json.loads(out)} == {"dead-000001": True, "live-000001": False}


def test_dry_run_without_credentials_shows_what_needs_no_aws(capsys, tmp_path, monkeypatch, ip_echo):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find here
    (tmp_path / "train.py").write_text("print('hi')\n")
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        "name: exp\nprovider: aws\nrun: python train.py\n"
        "checkpoint: {store: 's3://ckpt-bucket/team', resume: auto}\n"
        "aws: {instance_type: [g5.xlarge, g6.xlarge], ami: dlami-pytorch, ssh_cidr: auto}\n"
    )
    code, out, err = cli(capsys, "launch", str(spec), "--dry-run", "--name", "exp-dry001")
    assert code == 0, err
    assert err.startswith("warning: no AWS credentials found") and "'not resolved'" in err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "AMI" in rows and "dlami-pytorch: not resolved (needs AWS credentials)" in rows["AMI"]
    assert "g5.xlarge: GPUs, vCPUs and memory not resolved" in rows["instance type"]
    assert "$1.0060/h on-demand" in rows["price/hour g5.xlarge"] and "spot price not resolved" in out
    assert f"TCP 22 from {ip_echo}/32 only (your public IP)" in rows["security rule"]
    assert "gpurun:run=exp-dry001" in rows["tags"] and "gpurun:managed=true" in rows["tags"]
    assert "terminates itself after 12h" in rows["guard"]
    assert "arn:aws:s3:::ckpt-bucket/team/*" in rows["role policy"]
    assert "not resolved (" in rows["resume"]
    assert not key_dir("exp-dry001").exists() and not list(Path(os.environ["GPURUN_HOME"]).glob("runs/*.json"))


def test_teardown_of_a_launch_whose_launcher_died_removes_everything(session, recorder, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from gpurun import runs
    from gpurun.app import status as status_module
    from gpurun.app import teardown as teardown_module
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    for module in (status_module, teardown_module):
        monkeypatch.setattr(module, "get_provider", lambda name: provider)
    record, machines, _ = launch(provider, make_spec(tmp_path))  # what the dead launcher had made
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    # As on disk when the launcher died inside acquire: the ledger names the instance, no machine is listed yet.
    record.update(state="launching", machines=[], launcher={**runs.this_process(), "pid": finished.pid})
    runs.save(record)
    code, _out, err = cli(capsys, "status")
    assert f"`gpurun teardown {record['run']}` removes what it created" in err
    code, out, err = cli(capsys, "teardown", record["run"], "--yes", "--json")
    assert code == 0, err
    removed = json.loads(out)["runs"][0]["removed"]
    assert f"instance {machines[0]['instance_id']}" in removed
    assert leftovers(session, recorder) == []
    assert not key_dir().exists()


def test_teardown_does_not_claim_an_instance_aws_had_already_ended(session, recorder, tmp_path):
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    record, machines, saves = launch(provider, make_spec(tmp_path))
    record["state"] = "running"
    session.client("ec2").terminate_instances(InstanceIds=[machines[0]["instance_id"]])  # the spot reclaim
    removed = provider.release(record, saves, [].append)
    assert not any(item.startswith("instance i-") for item in removed), removed
    assert "key pair gpurun-exp-abc123" in removed
    assert leftovers(session, recorder) == []


def test_teardown_of_a_machine_without_an_address_terminates_it_anyway(
    session, recorder, tmp_path, capsys, monkeypatch
):
    """A recovering run's replacement is recorded without an address until AWS gives it one; when
    AWS cannot be asked either (denied), teardown must still end the run, not stop at that machine."""
    from gpurun import runs
    from gpurun.app import teardown as teardown_module
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    monkeypatch.setattr(teardown_module, "get_provider", lambda name: provider)
    record, machines, _ = launch(provider, make_spec(tmp_path))
    record["state"] = "running"
    record["machines"][0].update(host=None, public_ip=None, state="pending")  # as apply_attempts leaves it
    runs.save(record)
    _describe_instances_refused_once(recorder)
    code, out, err = cli(capsys, "teardown", record["run"], "--yes", "--json")
    assert code == 0, err
    assert "DescribeInstances" not in recorder.fail_once, "the state refresh was not the call that failed"
    assert "no public address yet" in err
    assert f"instance {machines[0]['instance_id']}" in json.loads(out)["runs"][0]["removed"]
    assert leftovers(session, recorder) == []


def test_teardown_says_how_long_it_tries_a_machine_that_does_not_answer(
    session, recorder, tmp_path, capsys, monkeypatch
):
    """A security group closed to this computer: teardown names the bound before it waits, then terminates."""
    from gpurun import runs
    from gpurun.app import teardown as teardown_module
    from gpurun.providers.aws import connect as connect_module
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    monkeypatch.setattr(teardown_module, "get_provider", lambda name: provider)
    monkeypatch.setattr(connect_module, "AWS_CONNECT_RETRY_FOR", 1.0)  # 2 minutes on AWS
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every attempt is refused
    record, machines, _ = launch(provider, make_spec(tmp_path))
    record["state"] = "running"
    record["machines"][0].update(host="127.0.0.1", port=port)
    runs.save(record)
    # AWS's state unread: the address stays the one above (moto's public ones may route nowhere, slowly).
    _describe_instances_refused_once(recorder)
    code, out, err = cli(capsys, "teardown", record["run"], "--yes", "--json")
    assert code == 0, err
    assert "tried for up to 1s; if it does not answer, it is terminated without a final sync" in err
    assert "is unreachable" in err
    assert f"instance {machines[0]['instance_id']}" in json.loads(out)["runs"][0]["removed"]
    assert leftovers(session, recorder) == []


def test_status_asks_a_machine_that_does_not_answer_once_instead_of_waiting_out_the_boot_window(
    session, recorder, tmp_path, capsys, monkeypatch
):
    """`status` is a look: a machine that drops every connection (sshd not up yet on a group's replacement,
    a security group closed to this computer) is shown unreachable after one try, not after AWS's 2-minute
    boot window per machine."""
    from gpurun import runs
    from gpurun.app import status as status_module
    from gpurun.providers.aws import connect as connect_module
    from tests.plugins.aws_fake import launch

    provider = make_provider(recorder)
    monkeypatch.setattr(status_module, "get_provider", lambda name: provider)
    monkeypatch.setattr(connect_module, "AWS_CONNECT_RETRY_FOR", 4.0)  # enough for several tries before the fix
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[int] = []

    def drop_each_connection() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            connection.close()

    threading.Thread(target=drop_each_connection, daemon=True).start()
    record, _machines, _ = launch(provider, make_spec(tmp_path))
    record["state"] = "running"
    record["machines"][0].update(host="127.0.0.1", port=listener.getsockname()[1])
    runs.save(record)
    # AWS's state unread: the address stays the one above.
    _describe_instances_refused_once(recorder)
    try:
        code, out, err = cli(capsys, "status", record["run"], "--json")
    finally:
        listener.close()
    assert code == 0, err
    [shown] = json.loads(out)
    assert shown["state"] == "running"
    assert len(accepted) == 1, f"{len(accepted)} connection attempts"
