"""AWS end to end: the real CLI workflow against moto's server over HTTP, the "instance" being the loopback sshd.

moto creates the instance (validation on); its public IP is set to 127.0.0.1
in moto's backend, the key pair gpurun imports is authorised on the test sshd
(as cloud-init would do), and `ssh.port` points at that sshd. The machine's
S3 access comes from its own ~/.aws files, standing in for the instance
profile: gpurun copies no credentials.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402

from gpurun.cli import main  # noqa: E402
from gpurun.providers.aws import AwsProvider  # noqa: E402
from tests.helpers import cli_captured, isolate, process_alive, wait_until  # noqa: E402,F401
from tests.plugins.aws_moto import enable_moto_validation  # noqa: E402

AMI = "ami-1e749f67"  # bundled with moto for us-east-1
ACCOUNT = "123456789012"

TRAIN = """\
import json, os, time
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
for epoch in range(1, 400):
    time.sleep(0.2)
    with open(os.path.join(ckpt, "weights.json.tmp"), "w") as handle:
        json.dump({"epoch": epoch}, handle)
    os.replace(os.path.join(ckpt, "weights.json.tmp"), os.path.join(ckpt, "weights.json"))
    print(f"epoch {epoch}", flush=True)
"""


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.fixture
def aws_world(moto_server: str, moto_validation: None, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return build_aws_world(moto_server, sshd, tmp_path, monkeypatch)


@contextlib.contextmanager
def wide_aws_world(moto_server: str, sshd, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory):
    """aws_world for a class- or module-scoped fixture: its own isolated state, undone on leaving."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(tmp_path_factory, monkeypatch)
        enable_moto_validation(monkeypatch, bundled_amis)
        tmp_path = tmp_path_factory.mktemp("aws-world")
        yield {**build_aws_world(moto_server, sshd, tmp_path, monkeypatch), "tmp_path": tmp_path}, monkeypatch


def build_aws_world(moto_server: str, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"e2e-{os.getpid()}-{len(list(tmp_path.parent.iterdir()))}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)

    # The machine's own AWS access (an instance profile on EC2).
    aws_dir = sshd.home / ".aws"
    aws_dir.mkdir(exist_ok=True)
    (aws_dir / "credentials").write_text("[default]\naws_access_key_id = machine\naws_secret_access_key = machine\n")
    (aws_dir / "config").write_text(f"[default]\nregion = us-east-1\nendpoint_url = {moto_server}\n")
    sshd.seed_agent_venv()

    def after_run_instances(parsed, **_):
        from moto.ec2.models import ec2_backends

        for instance in parsed.get("Instances", []):
            ec2_backends[ACCOUNT]["us-east-1"].get_instance(instance["InstanceId"]).nics[0].public_ip = "127.0.0.1"

    def before_import_key(params, **_):
        material = params["body"]["PublicKeyMaterial"]
        key = base64.b64decode(material).decode() if not material.startswith("ssh-") else material
        with open(sshd.directory / "authorized_keys", "a") as handle:
            handle.write(key.strip() + "\n")

    def no_placement_groups(**_):
        # moto does not implement DescribePlacementGroups; these one-node runs create none.
        from botocore.awsrequest import AWSResponse

        answer = {"PlacementGroups": [], "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "e2e"}}
        return AWSResponse(moto_server, 200, {}, None), answer

    original_init = AwsProvider.__init__

    def patched_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.host_key_timeout = 0  # moto's console output never prints host keys: trust on first use
        self.event_handlers.append(("after-call.ec2.RunInstances", after_run_instances))
        self.event_handlers.append(("before-call.ec2.ImportKeyPair", before_import_key))
        self.event_handlers.append(("before-call.ec2.DescribePlacementGroups", no_placement_groups))

    monkeypatch.setattr(AwsProvider, "__init__", patched_init)
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    spec = tmp_path / "aws.yaml"
    spec.write_text(
        "name: cloud\nprovider: aws\nworkdir: code\n"
        f"run: {sys.executable} train.py\n"
        f"checkpoint: {{dir: ckpt, every: 1s, keep: 3, store: 's3://{bucket}/runs', resume: never}}\n"
        f"aws: {{instance_type: t3.micro, ami: {AMI}, disk_gb: 20, ssh_cidr: 127.0.0.1/32, spot: false}}\n"
        f"ssh: {{user: {sshd.user}, port: {sshd.port}}}\n"
    )
    return {"spec": spec, "bucket": bucket, "endpoint": moto_server}


def gpurun_resources(endpoint: str) -> dict[str, list]:
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    tagged = [{"Name": "tag:gpurun:managed", "Values": ["true"]}]
    instances = [
        i
        for r in ec2.describe_instances(Filters=tagged)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] not in ("terminated", "shutting-down")
    ]
    groups = ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]
    keys = ec2.describe_key_pairs(Filters=tagged)["KeyPairs"]
    return {"instances": instances, "security_groups": groups, "key_pairs": keys}


def bucket_latest(s3, bucket: str, run: str) -> dict | None:
    """The run's LATEST pointer in the bucket, or None before the first snapshot."""
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{run}/LATEST")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


@pytest.fixture(scope="class")
def aws_lifecycle(moto_server: str, sshd, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory):
    """launch, a checkpoint in the bucket, status, teardown, logs: the story runs once and keeps what
    each step printed and what AWS, the bucket and the machine held after it, for the tests to check."""
    with wide_aws_world(moto_server, sshd, bundled_amis, tmp_path_factory) as (aws_world, _monkeypatch):
        seen: dict[str, Any] = {"sshd port": sshd.port}
        code, out, err = seen["launch"] = cli_captured("launch", str(aws_world["spec"]), "--json")
        assert code == 0, err
        run = seen["run"] = json.loads(out)["run"]
        seen["held after launch"] = gpurun_resources(aws_world["endpoint"])
        run_dir = sshd.home / "gpurun" / run
        seen["train.py synced"] = (run_dir / "work/train.py").exists()
        job_pid = int((run_dir / "job.pid").read_text())
        seen["job alive after launch"] = process_alive(job_pid)

        s3 = boto3.client("s3", endpoint_url=aws_world["endpoint"], region_name="us-east-1")
        seen["first snapshot"] = wait_until(
            lambda: bucket_latest(s3, aws_world["bucket"], run), timeout=60, what="a snapshot in the bucket"
        )
        seen[".aws in work"] = (run_dir / "work" / ".aws").exists()
        seen["files holding credentials"] = [
            str(path)
            for path in run_dir.rglob("*")
            if path.is_file() and path.stat().st_size < 1_000_000 and b"aws_secret_access_key" in path.read_bytes()
        ]
        seen["status"] = cli_captured("status", run, "--json")
        seen["teardown"] = cli_captured("teardown", run, "--yes", "--json")
        seen["job stopped"] = _became(lambda: not process_alive(job_pid), timeout=20, what="the job to stop")
        seen["held after teardown"] = gpurun_resources(aws_world["endpoint"])
        seen["bucket keys"] = [
            k["Key"] for k in s3.list_objects_v2(Bucket=aws_world["bucket"], Prefix=f"runs/{run}/")["Contents"]
        ]
        seen["logs"] = cli_captured("logs", run)
        return seen


def _became(condition, *, timeout: float, what: str) -> bool:
    """wait_until, as an observation a test asserts on later."""
    try:
        wait_until(condition, timeout=timeout, what=what)
    except AssertionError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.xdist_group("aws-e2e-lifecycle")  # one worker runs the story once for the whole class
class TestAwsLaunchSshSyncJobCheckpointTeardown:
    def test_launch_reports_a_running_instance_reached_on_loopback(self, aws_lifecycle) -> None:
        code, out, err = aws_lifecycle["launch"]
        assert code == 0, err
        launched = json.loads(out)
        assert launched["provider"] == "aws" and launched["state"] == "running"
        instance = launched["instances"][0]
        assert instance["type"] == "t3.micro" and instance["public_ip"] == "127.0.0.1"

    def test_aws_holds_one_tagged_imdsv2_instance_reachable_only_from_the_caller(self, aws_lifecycle) -> None:
        run, held = aws_lifecycle["run"], aws_lifecycle["held after launch"]
        assert len(held["instances"]) == 1 and len(held["security_groups"]) == 1 and len(held["key_pairs"]) == 1
        described = held["instances"][0]
        assert described["MetadataOptions"]["HttpTokens"] == "required"
        tags = {t["Key"]: t["Value"] for t in described["Tags"]}
        assert tags["gpurun:run"] == run and tags["gpurun:managed"] == "true" and tags["Name"] == f"gpurun-{run}"
        rules = held["security_groups"][0]["IpPermissions"]
        assert [(r["FromPort"], [ip["CidrIp"] for ip in r["IpRanges"]]) for r in rules] == [
            (aws_lifecycle["sshd port"], ["127.0.0.1/32"])
        ]

    def test_the_code_is_synced_and_the_job_runs(self, aws_lifecycle) -> None:
        assert aws_lifecycle["train.py synced"]
        assert aws_lifecycle["job alive after launch"]

    def test_checkpoints_reach_the_bucket_and_no_credentials_reach_the_machine(self, aws_lifecycle) -> None:
        assert aws_lifecycle["first snapshot"]["seq"] >= 1
        assert not aws_lifecycle[".aws in work"]
        assert aws_lifecycle["files holding credentials"] == [], "credentials copied to the machine"
        code, out, err = aws_lifecycle["status"]
        assert code == 0 and json.loads(out)[0]["last_checkpoint"]["seq"] >= 1

    def test_teardown_takes_a_final_snapshot_stops_the_job_and_removes_everything(self, aws_lifecycle) -> None:
        code, out, err = aws_lifecycle["teardown"]
        assert code == 0, err
        down = json.loads(out)["runs"][0]
        assert down["final_checkpoint"]["seq"] >= aws_lifecycle["first snapshot"]["seq"]
        assert any("instance" in item for item in down["removed"])
        assert aws_lifecycle["job stopped"], "the job stopped"
        assert aws_lifecycle["held after teardown"] == {"instances": [], "security_groups": [], "key_pairs": []}

    def test_snapshots_and_the_jobs_output_outlive_the_machine(self, aws_lifecycle) -> None:
        keys = aws_lifecycle["bucket keys"]
        assert any(key.endswith("weights.json") for key in keys), "teardown never deletes snapshots"
        code, out, err = aws_lifecycle["logs"]
        assert code == 0 and "epoch 1\n" in out, "the job's output outlives its machine, in the bucket"
        assert any("/logs/job-0001/" in key for key in keys)


@pytest.fixture(scope="class")
def second_computer(moto_server: str, sshd, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory):
    """A run launched here, then seen, refused and ended from a second computer with the same
    credentials through its store, then settled back here. Launching costs most, so the story runs
    once: each step's (exit status, stdout, stderr) and what AWS held after it are kept for the tests."""
    with wide_aws_world(moto_server, sshd, bundled_amis, tmp_path_factory) as (aws_world, monkeypatch):
        tmp_path = aws_world["tmp_path"]
        code, out, err = cli_captured("launch", str(aws_world["spec"]), "--json")
        assert code == 0, err
        run = json.loads(out)["run"]
        run_dir = sshd.home / "gpurun" / run
        job_pid = int((run_dir / "job.pid").read_text())
        store = f"s3://{aws_world['bucket']}/runs"
        s3 = boto3.client("s3", endpoint_url=aws_world["endpoint"], region_name="us-east-1")
        steps: dict[str, Any] = {"run": run}

        def step(name: str, *args: str, resources: bool = False) -> None:
            steps[name] = cli_captured(*args)
            if resources:
                steps[f"{name}: resources"] = gpurun_resources(aws_world["endpoint"])
            steps[f"{name}: record kept"] = (tmp_path / "other-laptop" / "runs" / f"{run}.json").exists()

        try:
            wait_until(lambda: bucket_latest(s3, aws_world["bucket"], run), timeout=60, what="a snapshot in the bucket")
            first_computer = os.environ["GPURUN_HOME"]
            monkeypatch.setenv("GPURUN_HOME", str(tmp_path / "other-laptop"))  # same credentials, no local state

            step("status here", "status", run)
            step("status --store", "status", run, "--store", store, "--json")
            step("orphans", "teardown", "--orphans", "--region", "us-east-1")
            step(
                "orphans --store",
                "teardown",
                "--orphans",
                "--store",
                store,
                "--region",
                "us-east-1",
                "--yes",
                "--json",
                resources=True,
            )
            step("teardown --store --region", "teardown", run, "--store", store, "--region", "us-east-1", "--yes")

            key = f"runs/{run}/run.json"
            original = s3.get_object(Bucket=aws_world["bucket"], Key=key)["Body"].read()
            elsewhere = json.loads(original)
            elsewhere["aws"]["account"] = "111111111111"
            s3.put_object(Bucket=aws_world["bucket"], Key=key, Body=json.dumps(elsewhere).encode())
            step("teardown, another account", "teardown", run, "--store", store, "--yes", resources=True)
            from_laptop_a = json.loads(original)
            from_laptop_a["aws"]["profile"] = from_laptop_a["spec"]["aws"]["profile"] = "laptop-a"
            s3.put_object(Bucket=aws_world["bucket"], Key=key, Body=json.dumps(from_laptop_a).encode())
            step("teardown, laptop-a's profile", "teardown", run, "--store", store, "--yes")

            config = tmp_path / "aws-config"
            config.write_text("[profile second]\nregion = us-east-1\n")
            credentials = tmp_path / "aws-credentials"
            credentials.write_text("[second]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
            monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
            monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
            step(
                "teardown --profile",
                "teardown",
                run,
                "--store",
                store,
                "--profile",
                "second",
                "--yes",
                "--json",
                resources=True,
            )
            steps["stored after"] = json.loads(s3.get_object(Bucket=aws_world["bucket"], Key=key)["Body"].read())
            step("status after", "status", run, "--json")
            step("teardown again", "teardown", run, "--yes")

            monkeypatch.setenv("GPURUN_HOME", first_computer)
            step("first computer: teardown", "teardown", run, "--yes", "--json")
            step("first computer: status", "status", run, "--json")
        finally:
            # moto's termination cannot stop processes on the loopback sshd.
            for pid in [job_pid, int((run_dir / "agent.pid").read_text())]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return steps


@pytest.mark.slow
@pytest.mark.xdist_group("aws-e2e-second-computer")  # one worker runs the story once for the whole class
class TestASecondComputerSeesAndEndsAnAwsRunThroughTheStore:
    def test_it_sees_the_run_only_through_the_store(self, second_computer) -> None:
        code, out, err = second_computer["status here"]
        assert code == 2 and "unknown run" in err
        code, out, err = second_computer["status --store"]
        assert code == 0, err
        seen = json.loads(out)[0]
        assert seen["run"] == second_computer["run"] and seen["state"] == "running"

    def test_the_orphan_sweep_asks_first_and_spares_a_run_live_in_the_store(self, second_computer) -> None:
        # Knowing nothing, this computer takes the run's resources for orphans (and asks first)...
        code, out, err = second_computer["orphans"]
        assert code == 2 and second_computer["run"] in out and "pass --yes" in err
        # ...but the run is live in the store: not an orphan for a computer told where to look.
        code, out, err = second_computer["orphans --store"]
        assert code == 0, err
        assert json.loads(out) == {"orphans": [], "removed": []}
        assert len(second_computer["orphans --store: resources"]["instances"]) == 1
        code, out, err = second_computer["teardown --store --region"]
        assert code == 2 and "--orphans" in err

    def test_credentials_for_another_account_touch_nothing(self, second_computer) -> None:
        # They would find no tagged resource and call the run ended.
        code, out, err = second_computer["teardown, another account"]
        assert code == 2 and "account 111111111111" in err and "nothing was touched" in err, err
        assert len(second_computer["teardown, another account: resources"]["instances"]) == 1
        assert not second_computer["teardown, another account: record kept"], "no record kept for a refused run"

    def test_the_launching_computers_profile_is_named_and_refused(self, second_computer) -> None:
        code, out, err = second_computer["teardown, laptop-a's profile"]
        assert code == 2 and "laptop-a" in err, err
        assert not second_computer["teardown, laptop-a's profile: record kept"]

    def test_with_its_own_profile_it_ends_the_run_and_keeps_the_record(self, second_computer) -> None:
        code, out, err = second_computer["teardown --profile"]
        assert code == 0, err
        assert "no SSH key" in err
        down = json.loads(out)["runs"][0]
        assert down["final_checkpoint"]["seq"] >= 1
        assert any(item.startswith("instance i-") for item in down["removed"])
        assert second_computer["teardown --profile: resources"] == {
            "instances": [],
            "security_groups": [],
            "key_pairs": [],
        }
        assert second_computer["stored after"]["state"] == "ended"
        code, out, err = second_computer["status after"]  # kept here, so teardown can be run again
        assert code == 0 and json.loads(out)[0]["state"] == "ended"
        code, out, err = second_computer["teardown again"]
        assert code == 0, err

    def test_back_on_the_first_computer_teardown_only_settles_the_record(self, second_computer) -> None:
        # The instance is terminated: no job to stop there.
        code, out, err = second_computer["first computer: teardown"]
        assert code == 0, err
        assert not any(item.startswith("job on") for item in json.loads(out)["runs"][0]["removed"])
        code, out, err = second_computer["first computer: status"]
        assert json.loads(out)[0]["state"] == "ended"


@pytest.mark.slow
def test_teardown_releases_a_run_whose_machine_is_gone_or_does_not_answer(
    aws_world, sshd, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurun import runs

    ec2 = boto3.client("ec2", endpoint_url=aws_world["endpoint"], region_name="us-east-1")
    pids = []
    for vanished in (True, False):
        code, out, err = cli(capsys, "launch", str(aws_world["spec"]), "--json")
        assert code == 0, err
        launched = json.loads(out)
        run, instance = launched["run"], launched["instances"][0]["id"]
        run_dir = sshd.home / "gpurun" / run
        pids += [int((run_dir / name).read_text()) for name in ("job.pid", "agent.pid")]
        if vanished:
            ec2.terminate_instances(InstanceIds=[instance])  # the console, or a spot reclaim
        else:
            runs.update(run, machines=[{**m, "port": 1} for m in runs.load(run)["machines"]])  # nothing answers
            monkeypatch.setattr("gpurun.providers.aws.connect.AWS_CONNECT_RETRY_FOR", 0.0)
        code, out, err = cli(capsys, "teardown", run, "--yes", "--json")
        assert code == 0, err
        removed = json.loads(out)["runs"][0]["removed"]
        # A terminated machine is not dialled (that would wait for SSH); nor is one that does not answer.
        assert not any(item.startswith("job on") for item in removed), removed
        if not vanished:
            assert "unreachable" in err and "terminating it without a final sync" in err
        assert gpurun_resources(aws_world["endpoint"]) == {"instances": [], "security_groups": [], "key_pairs": []}
        code, out, err = cli(capsys, "status", run, "--json")
        assert json.loads(out)[0]["state"] == "ended"
    # moto's termination cannot stop processes on the loopback sshd.
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_aws_exec_replaces_the_job_on_the_same_instance(aws_world, sshd, capsys) -> None:
    code, out, err = cli(capsys, "launch", str(aws_world["spec"]), "--json")
    assert code == 0, err
    launched = json.loads(out)
    run, instance_id = launched["run"], launched["instances"][0]["id"]
    s3 = boto3.client("s3", endpoint_url=aws_world["endpoint"], region_name="us-east-1")
    try:
        wait_until(lambda: bucket_latest(s3, aws_world["bucket"], run), timeout=60, what="a snapshot in the bucket")
        code, out, err = cli(capsys, "exec", run, "--", "echo second")
        assert code == 1 and f"job 1 of {run} is still running" in err

        (aws_world["spec"].parent / "code" / "extra.py").write_text("print('new file')\n")
        code, out, err = cli(
            capsys, "exec", run, "--replace", "--follow", "--", "python3 extra.py; echo job $GPURUN_JOB"
        )
        assert code == 0, err
        assert "synced 1 changed files" in err and "final checkpoint: snapshot" in err
        assert "new file\njob 2\n" in out
        held = gpurun_resources(aws_world["endpoint"])
        assert [i["InstanceId"] for i in held["instances"]] == [instance_id], "exec provisions nothing"

        code, out, err = cli(capsys, "status", run, "--json")
        jobs = json.loads(out)[0]["jobs"]
        assert [(job["number"], job["ended_by"]) for job in jobs] == [(1, "killed"), (2, "exited")]
        stored = json.loads(s3.get_object(Bucket=aws_world["bucket"], Key=f"runs/{run}/run.json")["Body"].read())
        assert [job["command"] for job in stored["jobs"]][-1] == "python3 extra.py; echo job $GPURUN_JOB"

        # The machine's guard (idle_timeout, max_runtime) ends it: exec says so instead of dialling it.
        ec2 = boto3.client("ec2", endpoint_url=aws_world["endpoint"], region_name="us-east-1")
        ec2.terminate_instances(InstanceIds=[instance_id])
        code, out, err = cli(capsys, "exec", run, "--", "echo third")
        assert code == 1 and "machine is terminated" in err and f"gpurun teardown {run}" in err, err
    finally:
        cli(capsys, "teardown", run, "--yes", "--no-final-sync")
    assert gpurun_resources(aws_world["endpoint"])["instances"] == []
