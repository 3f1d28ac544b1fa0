"""Unattended recovery on AWS, end to end on moto's server with the boot emulator.

The real CLI launches a recovering run (an Auto Scaling group) and returns;
from then on no gpurun process of the laptop runs. The boot emulator plays
cloud-init for each instance moto's group creates: the machine bootstraps
from the store with its fake IMDSv2 role credentials. A spot notice, a reclaim
(terminate_instance_in_auto_scaling_group without decrement), a new machine
that resumes from LATEST, success scaling the group to 0, a job that fails
every time, and a teardown that leaves nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402

from gpurun import runs  # noqa: E402
from gpurun.cli import main  # noqa: E402
from gpurun.providers.aws import AwsProvider  # noqa: E402
from tests.helpers import cli_captured, isolate, wait_until  # noqa: E402
from tests.plugins.aws_moto import enable_moto_validation  # noqa: E402
from tests.plugins.boot_emulator import MARK, BootEmulator  # noqa: E402

AMI = "ami-1e749f67"  # bundled with moto for us-east-1

# Steps until a finish file appears (the test decides when the job may succeed); says where it resumed.
TRAIN = """\
import json, os, sys, time
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
step = 0
resume = os.environ.get("GPURUN_RESUME_FROM")
if resume and os.path.exists(os.path.join(resume, "state.json")):
    step = json.load(open(os.path.join(resume, "state.json")))["step"]
    print(f"resumed at step {step}", flush=True)
print("job started", flush=True)
if sys.argv[1] == "fail":
    sys.exit(3)
while not os.path.exists(sys.argv[1]):
    step += 1
    with open(os.path.join(ckpt, "state.json.tmp"), "w") as handle:
        json.dump({"step": step}, handle)
    os.replace(os.path.join(ckpt, "state.json.tmp"), os.path.join(ckpt, "state.json"))
    print(f"step {step}", flush=True)
    time.sleep(0.2)
print("done", flush=True)
"""


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture
def world(moto_server: str, moto_validation: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return build_world(moto_server, tmp_path, monkeypatch)


def build_world(moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"recovery-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    original_init = AwsProvider.__init__

    def patched_init(self: AwsProvider, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.poll_interval = 0.2

    monkeypatch.setattr(AwsProvider, "__init__", patched_init)
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    return {"bucket": bucket, "endpoint": moto_server, "code": code, "tmp": tmp_path}


def _spec(world: dict[str, Any], argument: str, recovery: str, idle_timeout: str = "1s") -> Path:
    spec = world["tmp"] / "aws.yaml"
    spec.write_text(
        "name: rec\nprovider: aws\nworkdir: code\n"
        f"run: {sys.executable} train.py {argument}\n"
        f"checkpoint: {{dir: ckpt, every: 1h, keep: 3, store: 's3://{world['bucket']}/runs', resume: never}}\n"
        f"aws: {{instance_type: [t3.micro, t3.small], ami: {AMI}, disk_gb: 20, ssh_cidr: 127.0.0.1/32, "
        f"spot: true, max_runtime: 2h, idle_timeout: {idle_timeout}}}\n"
        f"recovery: {recovery}\n"
    )
    return spec


def _attempts(world: dict[str, Any], run: str) -> dict[str, Any] | None:
    s3 = boto3.client("s3", endpoint_url=world["endpoint"], region_name="us-east-1")
    try:
        return json.loads(s3.get_object(Bucket=world["bucket"], Key=f"runs/{run}/attempts.json")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def _latest(world: dict[str, Any], run: str) -> dict[str, Any] | None:
    s3 = boto3.client("s3", endpoint_url=world["endpoint"], region_name="us-east-1")
    try:
        return json.loads(s3.get_object(Bucket=world["bucket"], Key=f"runs/{run}/LATEST")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def _group(world: dict[str, Any], run: str) -> dict[str, Any]:
    autoscaling = boto3.client("autoscaling", endpoint_url=world["endpoint"], region_name="us-east-1")
    [group] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[f"gpurun-{run}"])["AutoScalingGroups"]
    return dict(group)


def _log(emulator: BootEmulator, instance_id: str, run: str) -> str:
    path = emulator.run_dir(instance_id, run) / "job.log"
    return path.read_text(errors="replace") if path.exists() else ""


#: What `_leftovers` finds once a run is gone: every kind of resource it looks for, none left.
NOTHING_LEFT: dict[str, list[Any]] = {
    kind: [] for kind in ("groups", "templates", "instances", "security_groups", "key_pairs", "roles", "profiles")
}


def _leftovers(world: dict[str, Any], run: str) -> dict[str, list[Any]]:
    endpoint = world["endpoint"]
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    autoscaling = boto3.client("autoscaling", endpoint_url=endpoint, region_name="us-east-1")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    tagged = [{"Name": "tag:gpurun:run", "Values": [run]}]
    return {
        "groups": [
            g
            for g in autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]
            if g["AutoScalingGroupName"] == f"gpurun-{run}"
        ],
        "templates": [
            t for t in ec2.describe_launch_templates()["LaunchTemplates"] if t["LaunchTemplateName"] == f"gpurun-{run}"
        ],
        "instances": [
            i
            for r in ec2.describe_instances(Filters=tagged)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] not in ("terminated", "shutting-down")
        ],
        "security_groups": ec2.describe_security_groups(Filters=tagged)["SecurityGroups"],
        "key_pairs": ec2.describe_key_pairs(Filters=tagged)["KeyPairs"],
        "roles": [r for r in iam.list_roles()["Roles"] if r["RoleName"] == f"gpurun-{run}"],
        "profiles": [
            p for p in iam.list_instance_profiles()["InstanceProfiles"] if p["InstanceProfileName"] == f"gpurun-{run}"
        ],
    }


@pytest.fixture(scope="class")
def reclaim_story(
    moto_server: str, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A recovering run launched, noticed, reclaimed, resumed on a new machine, succeeded and torn
    down. Each step waits on AWS and the emulated machines, so the story runs once and keeps what
    each step printed and what the store, the group and the machines held; each test checks one part."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(tmp_path_factory, monkeypatch)
        enable_moto_validation(monkeypatch, bundled_amis)
        world = build_world(moto_server, tmp_path_factory.mktemp("recovery"), monkeypatch)
        boot_emulator = BootEmulator(moto_server, world["tmp"] / "machines")
        boot_emulator.start()
        try:
            yield _reclaim(world, boot_emulator)
        finally:
            boot_emulator.close()


def _reclaim_and_replace(world: dict[str, Any], boot_emulator: BootEmulator, instance_id: str, timeout: float) -> str:
    """AWS takes `instance_id` (a spot reclaim: the group keeps its size) and the group starts
    another machine; returns the new machine's instance id."""
    autoscaling = boto3.client("autoscaling", endpoint_url=world["endpoint"], region_name="us-east-1")
    autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=instance_id, ShouldDecrementDesiredCapacity=False)
    return wait_until(
        lambda: [i for i in boot_emulator.live() if i != instance_id], timeout=timeout, what="a new machine"
    )[0]


def _reclaim(world: dict[str, Any], boot_emulator: BootEmulator) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    finish = world["tmp"] / "finish"
    spec = _spec(world, str(finish), "{max_restarts: 2}")
    seen["dry run"] = cli_captured("launch", str(spec), "--dry-run", "--json")
    code, out, err = cli_captured("launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    seen["launched_at"] = datetime.now(timezone.utc)
    # From here on no gpurun process of the laptop runs: AWS and the machines do everything.
    [first] = boot_emulator.live()
    seen["first"] = first
    wait_until(lambda: "job started" in _log(boot_emulator, first, run), timeout=30, what="the first job's output")
    autoscaling = boto3.client("autoscaling", endpoint_url=world["endpoint"], region_name="us-east-1")
    seen["guards"] = autoscaling.describe_scheduled_actions(AutoScalingGroupName=f"gpurun-{run}")[
        "ScheduledUpdateGroupActions"
    ]

    # A spot notice: the agent takes its final snapshot of what the job wrote last.
    wait_until(lambda: "step 3" in _log(boot_emulator, first, run), timeout=60, what="step 3")
    boot_emulator.interrupt(first)
    final = wait_until(
        lambda: (boot_emulator.run_dir(first, run) / "interrupted").exists() and _latest(world, run),
        timeout=60,
        what="the final snapshot after the spot notice",
    )
    wait_until(
        lambda: (
            json.loads((boot_emulator.run_dir(first, run) / "agent.status.json").read_text()).get("last_seq")
            == (_latest(world, run) or {}).get("seq")
        ),
        timeout=30,
        what="the agent's snapshot to be LATEST",
    )
    seen["saved seq"] = (_latest(world, run) or final)["seq"]

    # AWS takes the machine; the group starts another, which bootstraps itself.
    second = _reclaim_and_replace(world, boot_emulator, first, timeout=30)
    seen["second"] = second
    seen["resumed"] = wait_until(
        lambda: [line for line in _log(boot_emulator, second, run).splitlines() if line.startswith("resumed at step")],
        timeout=120,
        what="the new machine's job to resume",
    )
    seen["attempts after the reclaim"] = _attempts(world, run)
    seen["latest after the reclaim"] = _latest(world, run)
    seen["status --json while running"] = cli_captured("status", run, "--json")
    seen["status while running"] = cli_captured("status", run)
    seen["exec"] = cli_captured("exec", run, "--", "echo", "hi")

    # Success: the machine records it and scales its own group to 0.
    finish.touch()
    wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=60, what="the group scaled to 0")
    seen["attempts after success"] = _attempts(world, run)
    wait_until(lambda: not boot_emulator.live(), timeout=30, what="the machine to go")
    seen["status --json after success"] = cli_captured("status", run, "--json")
    seen["logs"] = cli_captured("logs", run)
    # Another computer (no record here) sees the same from the store.
    with pytest.MonkeyPatch.context() as other_computer:
        other_computer.setenv("GPURUN_HOME", str(world["tmp"] / "other-computer"))
        seen["status --store"] = cli_captured("status", run, "--store", f"s3://{world['bucket']}/runs", "--json")
    seen["power log"] = boot_emulator.power_log()
    seen["emulator errors"] = list(boot_emulator.errors)

    seen["teardown"] = cli_captured("teardown", run, "--yes", "--json")
    seen["leftovers"] = _leftovers(world, run)
    return seen


@pytest.mark.slow
@pytest.mark.xdist_group("recovery-reclaim-story")  # one worker runs the story once for the whole class
class TestReclaimedMachineIsReplacedAndTheJobResumesFromLatest:
    def test_the_dry_run_plans_failover_types_the_restart_budget_and_the_guard(self, reclaim_story) -> None:
        code, out, err = reclaim_story["dry run"]
        assert code == 0, err
        plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
        assert plan["types"] == "t3.micro, t3.small (spot, price-capacity-optimized)"
        assert plan["restart budget"].startswith("2 ") and "2h" in plan["guard"] and plan["zones"]

    def test_a_scheduled_action_ends_the_group_at_launch_plus_max_runtime(self, reclaim_story) -> None:
        # The scheduled guard ends the group at launch + max_runtime, whatever the machines do.
        [guard] = reclaim_story["guards"]
        assert (guard["DesiredCapacity"], guard["MaxSize"]) == (0, 0)
        assert abs(guard["StartTime"].timestamp() - (reclaim_story["launched_at"].timestamp() + 7200)) < 120

    def test_the_new_machine_resumes_from_the_snapshot_taken_at_the_spot_notice(self, reclaim_story) -> None:
        first, second = reclaim_story["first"], reclaim_story["second"]
        assert int(reclaim_story["resumed"][0].split()[-1]) >= 3
        attempts = reclaim_story["attempts after the reclaim"]
        assert attempts is not None and attempts["restarts_used"] == 1 and attempts["state"] == "running"
        assert [m["instance_id"] for m in attempts["machines"]] == [first, second]
        assert attempts["machines"][1]["resumed"] is True
        assert reclaim_story["latest after the reclaim"]["seq"] >= reclaim_story["saved seq"]

    def test_status_follows_the_group_to_its_current_machine(self, reclaim_story) -> None:
        first, second = reclaim_story["first"], reclaim_story["second"]
        code, out, err = reclaim_story["status --json while running"]
        assert code == 0 and out, (out, err)
        [status] = json.loads(out)
        assert status["state"] == "running" and status["restarts"] == {"used": 1, "max": 2}
        assert [(g["instance_id"], g["why"]) for g in status["generations"]] == [(first, "replaced"), (second, None)]
        assert status["instances"][0]["id"] == second, "the record follows the group's current machine"
        code, out, err = reclaim_story["status while running"]
        assert f"machine 2: {second}" in out + err and "(restart 1/2)" in out, out + err

    def test_exec_is_refused_on_a_recovering_run(self, reclaim_story) -> None:
        code, _out, err = reclaim_story["exec"]
        assert code == 2 and "exec is not supported there yet" in err, err

    def test_success_scales_the_group_to_zero_and_the_run_reads_succeeded(self, reclaim_story) -> None:
        attempts = reclaim_story["attempts after success"]
        assert attempts is not None and attempts["state"] == "succeeded"
        code, out, err = reclaim_story["status --json after success"]
        assert json.loads(out)[0]["state"] == "succeeded" and json.loads(out)[0]["exit_code"] == 0, out

    def test_the_output_and_the_history_outlive_the_machines(self, reclaim_story) -> None:
        # Each machine's output is a job in the store, the newest shown first.
        code, out, err = reclaim_story["logs"]
        assert code == 0 and "resumed at step" in out and "done" in out, out + err
        # Another computer (no record here) sees the same from the store.
        code, out, err = reclaim_story["status --store"]
        assert code == 0, err
        [remote] = json.loads(out)
        assert remote["state"] == "succeeded"
        assert [g["instance_id"] for g in remote["generations"]] == [reclaim_story["first"], reclaim_story["second"]]

    def test_no_machine_of_the_group_powers_itself_off(self, reclaim_story) -> None:
        assert reclaim_story["power log"] == "", "a machine in a group never powers itself off"
        assert not reclaim_story["emulator errors"], reclaim_story["emulator errors"]

    def test_teardown_leaves_nothing(self, reclaim_story) -> None:
        code, out, err = reclaim_story["teardown"]
        assert code == 0, err
        assert reclaim_story["leftovers"] == NOTHING_LEFT


@pytest.mark.slow
def test_after_success_the_machine_stays_for_idle_timeout_then_scales_its_group_to_zero(
    world: dict[str, Any], boot_emulator: BootEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    finish = world["tmp"] / "finish"
    spec = _spec(world, str(finish), "{max_restarts: 1}", idle_timeout="15s")
    code, out, err = cli(capsys, "launch", str(spec), "--dry-run", "--json")
    assert code == 0, err
    plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
    assert "15s after the job ends" in plan["guard"], plan["guard"]
    code, out, err = cli(capsys, "launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    [first] = boot_emulator.live()
    wait_until(lambda: "step 1" in _log(boot_emulator, first, run), timeout=60, what="the first job's first step")
    # A reclaim first (no gpurun command runs meanwhile): the machine that idles is the replacement.
    machine = _reclaim_and_replace(world, boot_emulator, first, timeout=30)
    wait_until(lambda: "step 1" in _log(boot_emulator, machine, run), timeout=120, what="the new job's first step")
    finish.touch()
    wait_until(lambda: (_attempts(world, run) or {}).get("state") == "succeeded", timeout=60, what="success")
    # The run has ended, but its machine stays in the group for idle_timeout: ssh, logs, checkpoint-sync.
    assert _group(world, run)["DesiredCapacity"] == 1
    # A job alive on the machine again (as a new job would be) holds it: the wait counts from that job's end.
    # Started at once (well inside the 15 s), it keeps what follows free of any race with the timeout.
    run_dir = boot_emulator.run_dir(machine, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, MARK: machine},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        (run_dir / "job.pid").write_text(str(holder.pid))
        wait_until(
            lambda: "alive on this machine again" in (run_dir / "monitor.log").read_text(),
            timeout=30,
            what="the monitor to see the new job",
        )
        code, out, err = cli(capsys, "status", run, "--json")
        [status] = json.loads(out)
        assert (status["state"], status["exit_code"]) == ("succeeded", 0), out + err
        assert status["instances"][0]["id"] == machine, "ssh, logs and checkpoint-sync reach the idling machine"
        assert _group(world, run)["DesiredCapacity"] == 1, "a machine with a live job is never scaled in"
        assert boot_emulator.live() == [machine]
    finally:
        holder.kill()
        holder.wait()
        released = time.monotonic()
    wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=90, what="the group scaled to 0")
    # Not before idle_timeout after that job's end, less the monitor's 2 s poll (it saw the job alive last up
    # to one poll, plus a loaded machine's lateness, before the kill).
    assert time.monotonic() - released >= 10
    assert "no job has been alive for 15s (idle_timeout)" in (run_dir / "monitor.log").read_text()
    wait_until(lambda: not boot_emulator.live(), timeout=30, what="the machine to go")
    assert boot_emulator.power_log() == "", "a machine in a group never powers itself off"
    assert not boot_emulator.errors, boot_emulator.errors
    code, _out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err


@pytest.mark.slow
def test_with_idle_timeout_null_a_failed_run_keeps_its_machine_until_teardown(
    world: dict[str, Any],
    boot_emulator: BootEmulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(world, "fail", "{max_restarts: 1}", idle_timeout="null")
    code, out, err = cli(capsys, "launch", str(spec), "--dry-run", "--json")
    plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
    assert "idle_timeout off" in plan["guard"] and "2h" in plan["guard"], plan["guard"]
    code, out, err = cli(capsys, "launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    [machine] = boot_emulator.live()
    monitor_log = boot_emulator.run_dir(machine, run) / "monitor.log"
    # exit 3 is not a lost job (on_failure is off): the run fails; the monitor is done and leaves the group be.
    wait_until(
        lambda: monitor_log.exists() and "idle_timeout is off" in monitor_log.read_text(),
        timeout=60,
        what="the monitor to finish",
    )
    attempts = _attempts(world, run)
    assert attempts is not None and attempts["state"] == "failed" and attempts["restarts_used"] == 0
    assert _group(world, run)["DesiredCapacity"] == 1 and boot_emulator.live() == [machine]
    code, out, err = cli(capsys, "status", run, "--json")
    assert (json.loads(out)[0]["state"], json.loads(out)[0]["exit_code"]) == ("failed", 3), out + err
    # Teardown ends the group with its machine (moto's machine has no SSH: it is terminated without a final sync).
    runs.update(run, machines=[{**m, "host": "127.0.0.1", "port": 1} for m in runs.load(run)["machines"]])
    monkeypatch.setattr("gpurun.providers.aws.connect.AWS_CONNECT_RETRY_FOR", 0.0)
    code, _out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err
    assert not _leftovers(world, run)["groups"] and not _leftovers(world, run)["instances"]
    wait_until(lambda: not boot_emulator.live(), timeout=30, what="the machine to go")
    assert boot_emulator.power_log() == "", "a machine in a group never powers itself off"


@pytest.mark.slow
def test_teardown_right_after_a_reclaim_stops_the_job_on_the_replacement_machine(
    world: dict[str, Any],
    boot_emulator: BootEmulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(world, str(world["tmp"] / "finish"), "{max_restarts: 2}")
    code, out, err = cli(capsys, "launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    [first] = boot_emulator.live()
    wait_until(lambda: "job started" in _log(boot_emulator, first, run), timeout=60, what="the first job")
    second = _reclaim_and_replace(world, boot_emulator, first, timeout=60)
    wait_until(lambda: "job started" in _log(boot_emulator, second, run), timeout=120, what="the second job")
    # No `status` ran since the reclaim: the record still names the first machine.
    assert [m["instance_id"] for m in runs.load(run)["machines"]] == [first]
    monkeypatch.setattr("gpurun.providers.aws.connect.AWS_CONNECT_RETRY_FOR", 0.0)
    code, _out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err
    # Teardown went to the machine that runs the job now (moto's address for it does not answer here).
    assert "node 0 is unreachable" in err, err
    assert [m["instance_id"] for m in runs.load(run)["machines"]] == [second]
    assert not _leftovers(world, run)["groups"] and not _leftovers(world, run)["instances"]
    wait_until(lambda: not boot_emulator.live(), timeout=30, what="the machines to go")


@pytest.mark.slow
def test_a_job_failing_every_time_stops_after_the_budget_with_the_group_at_zero(
    world: dict[str, Any], boot_emulator: BootEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(world, "fail", "{max_restarts: 2, on_failure: true}")
    code, out, err = cli(capsys, "launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=90, what="the group scaled to 0")
    attempts = _attempts(world, run)
    assert attempts is not None
    assert attempts["state"] == "budget_spent" and attempts["restarts_used"] == 2
    assert attempts["machines"][0]["why"] == "restart budget spent" and attempts["machines"][0]["exit_code"] == 3
    wait_until(lambda: not boot_emulator.live(), timeout=30, what="the machine to go")
    [machine] = boot_emulator.instances
    assert _log(boot_emulator, machine, run).count("job started") == 3
    code, _out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err


@pytest.mark.slow
def test_a_machine_booting_after_the_budget_is_spent_scales_the_group_to_zero(
    world: dict[str, Any], boot_emulator: BootEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _spec(world, str(world["tmp"] / "never"), "{max_restarts: 1}")
    code, out, err = cli(capsys, "launch", str(spec), "--json")
    assert code == 0, err
    run = json.loads(out)["run"]
    autoscaling = boto3.client("autoscaling", endpoint_url=world["endpoint"], region_name="us-east-1")
    taken: list[str] = []
    for _reclaim in range(2):
        current = wait_until(lambda: [i for i in boot_emulator.live() if i not in taken], timeout=30, what="a machine")[
            0
        ]
        wait_until(lambda current=current: "job started" in _log(boot_emulator, current, run), timeout=60, what="job")
        taken.append(current)
        autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=current, ShouldDecrementDesiredCapacity=False)
    # The third machine finds the budget spent: it starts nothing and ends the group.
    wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=60, what="the group scaled to 0")
    attempts = _attempts(world, run)
    assert attempts is not None and attempts["state"] == "budget_spent" and attempts["restarts_used"] == 1
    assert [m["instance_id"] for m in attempts["machines"]] == taken
    third = [i for i in boot_emulator.instances if i not in taken]
    assert len(third) == 1 and _log(boot_emulator, third[0], run) == ""
    code, out, err = cli(capsys, "status", run, "--json")
    assert json.loads(out)[0]["state"] == "failed", out
    code, _out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err


def _capacity_failure(activity_id: str, instance_type: str, zone: str) -> dict[str, Any]:
    reason = (
        f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested "
        f"({zone}). Our system will be working on provisioning additional capacity."
    )
    return {
        "ActivityId": activity_id,
        "StatusCode": "Failed",
        "StatusMessage": reason,
        "Description": f"Launching a new EC2 instance.  Status Reason: {reason} Launching EC2 instance failed.",
        "Details": json.dumps({"Subnet ID": "subnet-0", "Availability Zone": zone}),
    }


#: What describe_scaling_activities answers, call after call (moto's is always empty), newest first as AWS
#: lists them: each call repeats what the previous one said, and the third activity ends on the fourth call.
ACTIVITIES = [
    [_capacity_failure("a1", "t3.micro", "us-east-1a")],
    [_capacity_failure("a2", "t3.micro", "us-east-1b"), _capacity_failure("a1", "t3.micro", "us-east-1a")],
    [
        {"ActivityId": "a3", "StatusCode": "InProgress", "Description": "Launching a new EC2 instance: a3"},
        _capacity_failure("a2", "t3.micro", "us-east-1b"),
        _capacity_failure("a1", "t3.micro", "us-east-1a"),
    ],
    [
        _capacity_failure("a3", "t3.small", "us-east-1a"),
        _capacity_failure("a2", "t3.micro", "us-east-1b"),
        _capacity_failure("a1", "t3.micro", "us-east-1a"),
    ],
]


def _no_capacity(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The group exists but AWS cannot start its machine: every zone is out of the types."""
    from botocore.awsrequest import AWSResponse

    calls = [0]

    def empty_group(params: dict[str, Any], **_: Any) -> Any:
        body = params.get("body") or {}
        if "AutoScalingGroupNames.member.1" not in body:
            return None  # teardown's own lookups see the real group
        answer = {
            "AutoScalingGroups": [{"AutoScalingGroupName": body["AutoScalingGroupNames.member.1"], "Instances": []}]
        }
        return AWSResponse(endpoint, 200, {}, None), answer

    def failed_activities(**_: Any) -> Any:
        calls[0] += 1
        answer = {"Activities": ACTIVITIES[min(calls[0], len(ACTIVITIES)) - 1]}
        return AWSResponse(endpoint, 200, {}, None), json.loads(json.dumps(answer))

    original_init = AwsProvider.__init__

    def patched_init(self: AwsProvider, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.event_handlers.append(("before-call.autoscaling.DescribeAutoScalingGroups", empty_group))
        self.event_handlers.append(("before-call.autoscaling.DescribeScalingActivities", failed_activities))

    monkeypatch.setattr(AwsProvider, "__init__", patched_init)


@pytest.mark.slow
def test_no_capacity_within_capacity_wait_exits_3_and_removes_everything(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_capacity(monkeypatch, world["endpoint"])
    spec = _spec(world, "x", "{max_restarts: 1}")
    # Long enough for the four answers above at the 0.2 s poll, even on a loaded machine.
    code, out, err = cli(capsys, "launch", str(spec), "--set", "aws.capacity_wait=6s")
    assert code == 3, err
    run = next(line.split()[1] for line in (out + err).splitlines() if line.startswith("launching "))
    # Every scaling activity is shown once as it appears, and once more when one seen in progress ends.
    shown = [line.split(f"group gpurun-{run}: ", 1)[1] for line in err.splitlines() if f"group gpurun-{run}: " in line]
    assert [line.split(": We currently")[0] for line in shown] == [
        "Failed (no capacity: t3.micro, us-east-1a)",
        "Failed (no capacity: t3.micro, us-east-1b)",
        "InProgress: Launching a new EC2 instance: a3",
        "Failed (no capacity: t3.small, us-east-1a)",
    ], err
    # Exit 3 says what was tried, from the activities.
    assert "started no machine in 6s" in err and "sufficient t3.small capacity" in err, err
    assert "3 failed launches tried t3.micro in us-east-1a, us-east-1b; t3.small in us-east-1a" in err, err
    assert _leftovers(world, run) == NOTHING_LEFT


@pytest.mark.slow
def test_keep_waiting_leaves_the_group_trying(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_capacity(monkeypatch, world["endpoint"])
    spec = _spec(world, "x", "{max_restarts: 1}")
    code, out, err = cli(capsys, "launch", str(spec), "--set", "aws.capacity_wait=1s", "--keep-waiting")
    assert code == 3, err
    assert "The group keeps trying" in err, err
    run = next(line.split()[1] for line in (out + err).splitlines() if line.startswith("launching "))
    assert _leftovers(world, run)["groups"], "the group is left to find capacity"
    code, out, err = cli(capsys, "status", run, "--json")
    assert json.loads(out)[0]["state"] == "launching" and "is gone" not in err, err
    # `logs -f` waits for the group's first machine; a teardown ends the wait (exit 5).
    follower = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "logs", run, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        code, _out, err = cli(capsys, "teardown", run, "--yes")
        assert code == 0, err
        _followed, said = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 5 and b"torn down while following" in said, said
    assert not _leftovers(world, run)["groups"]
    refused = cli(capsys, "launch", str(spec), "--keep-waiting", "--set", "recovery.max_restarts=0")
    assert refused[0] == 2 and "--keep-waiting: only for a run with recovery on AWS" in refused[2]
