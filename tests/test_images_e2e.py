"""`gpurun image`: bake a live aws run into an AMI, launch from it, list, delete, sweep orphans.

The same world as test_aws_e2e: moto's server over HTTP, its instance's public
IP set to 127.0.0.1, the "machine" being the loopback sshd's home. moto's
CreateImage never reads a disk, so what the image would hold is checked on
the machine at the moment gpurun calls CreateImage (a before-call handler).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402

from gpurun.providers.aws import AwsProvider  # noqa: E402
from tests.helpers import process_alive, wait_until  # noqa: E402
from tests.test_aws_e2e import ACCOUNT, AMI, aws_world, cli  # noqa: E402,F401

# Both image test files watch /dev/shm for the stash an image create leaves: one worker runs them.
pytestmark = pytest.mark.xdist_group("dev-shm-image-stash")

SETUP_SH = 'echo "setup ran" >> "$HOME/setup-marker-$1"\n'


def _ec2(endpoint: str):
    return boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")


def _images(endpoint: str) -> list[dict]:
    tagged = [{"Name": "tag:gpurun:managed", "Values": ["true"]}]
    return _ec2(endpoint).describe_images(Owners=["self"], Filters=tagged)["Images"]


def _snapshot_ids(endpoint: str) -> set[str]:
    return {s["SnapshotId"] for s in _ec2(endpoint).describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def _job_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as handle:
        return next(line.split()[1] for line in handle if line.startswith("State:"))


def _last_epoch(log: Path) -> int:
    epochs = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("epoch ")]
    return epochs[-1] if epochs else 0


@pytest.fixture
def image_world(aws_world, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """aws_world plus: a spec with a setup, the run's key put into ~/.ssh/authorized_keys as cloud-init
    would, and moto's images made EBS-backed (moto registers them as instance-store)."""
    tag = f"{os.getpid()}-{len(list(tmp_path.parent.iterdir()))}"
    seen_at_create: list[dict] = []
    world = {
        **aws_world,
        "tag": tag,
        "seen_at_create": seen_at_create,
        "interrupt_after_create": False,
        "before_create": None,
    }
    ssh_dir = sshd.home / ".ssh"
    ssh_dir.mkdir(exist_ok=True, mode=0o700)
    keys_file = ssh_dir / "authorized_keys"
    keys_file.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyThatStays other@box\n")

    def before_import_key(params, **_):
        material = params["body"]["PublicKeyMaterial"]
        key = material if material.startswith("ssh-") else base64.b64decode(material).decode()
        with open(keys_file, "a") as handle:
            handle.write(f"{key.strip()} cloud-init\n")

    def before_create_image(params, **_):
        run_dir = sshd.home / "gpurun" / params["body"]["Description"].split()[4]
        files = [p for p in run_dir.rglob("*") if p.is_file() or p.is_symlink()]
        seen_at_create.append(
            {
                "nonempty_files": [str(p.relative_to(run_dir)) for p in files if p.stat().st_size > 0],
                "history": (sshd.home / ".bash_history").exists(),
                "keys": keys_file.read_text(),
            }
        )
        if world["before_create"]:
            world["before_create"]()

    def after_create_image(parsed, **_):
        from moto.ec2.models import ec2_backends

        ec2_backends[ACCOUNT]["us-east-1"].amis[parsed["ImageId"]].root_device_type = "ebs"
        if world["interrupt_after_create"]:
            raise KeyboardInterrupt

    patched_init = AwsProvider.__init__

    def init(self, *args, **kwargs):
        patched_init(self, *args, **kwargs)
        self.poll_interval = 0.1
        self.event_handlers.append(("before-call.ec2.ImportKeyPair", before_import_key))
        self.event_handlers.append(("before-call.ec2.CreateImage", before_create_image))
        self.event_handlers.append(("after-call.ec2.CreateImage", after_create_image))

    monkeypatch.setattr(AwsProvider, "__init__", init)
    code = Path(aws_world["spec"]).parent / "code"
    (code / "setup.sh").write_text(SETUP_SH)
    (code / "requirements.txt").write_text("numpy==1.26.4\n")
    spec = Path(aws_world["spec"])
    spec.write_text(spec.read_text().replace("run:", f"setup: sh setup.sh {tag} -r requirements.txt\nrun:"))
    yield world
    ec2 = _ec2(aws_world["endpoint"])
    for image in _images(aws_world["endpoint"]):  # the moto server outlives this test: leave no image
        with contextlib.suppress(Exception):
            ec2.deregister_image(ImageId=image["ImageId"])
    tagged = [{"Name": "tag:gpurun:managed", "Values": ["true"]}]
    for snapshot in ec2.describe_snapshots(OwnerIds=["self"], Filters=tagged)["Snapshots"]:
        with contextlib.suppress(Exception):
            ec2.delete_snapshot(SnapshotId=snapshot["SnapshotId"])


def _launch(capsys, spec: Path, *extra: str) -> tuple[str, str]:
    code, out, err = cli(capsys, "launch", str(spec), "--json", *extra)
    assert code == 0, err
    return json.loads(out)["run"], err


def _kill_run_processes(sshd, run: str) -> None:
    # moto's termination cannot stop processes on the loopback sshd.
    for name in ("job.pid", "agent.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((sshd.home / "gpurun" / run / name).read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_image_create_use_list_delete_and_orphan_sweep(image_world, sshd, capsys) -> None:
    endpoint, tag, spec = image_world["endpoint"], image_world["tag"], image_world["spec"]
    marker = sshd.home / f"setup-marker-{tag}"
    run, _ = _launch(capsys, spec)
    assert marker.read_text() == "setup ran\n"
    run_dir = sshd.home / "gpurun" / run
    job_pid = int((run_dir / "job.pid").read_text())
    wait_until(lambda: _last_epoch(run_dir / "job.log") >= 2, timeout=60, what="the job's output")
    (sshd.home / ".bash_history").write_text("export WANDB_API_KEY=canary\n")
    (run_dir / "secrets.env").write_text("export WANDB_API_KEY=canary\n")  # as the spec's secrets: would
    keys_before = (sshd.home / ".ssh/authorized_keys").read_text()
    run_key = Path(
        f"{json.loads(Path(os.environ['GPURUN_HOME'], 'runs', f'{run}.json').read_text())['machines'][0]['key_path']}.pub"
    )
    blob = run_key.read_text().split()[1]
    assert blob in keys_before

    name = f"img-{tag}"
    stashes = set(Path("/dev/shm").glob("gpurun-image-*"))
    code, out, err = cli(capsys, "image", "create", run, "--name", name, "--json")
    assert code == 0, err
    created = json.loads(out)

    # What the image would hold: nothing of the run, no history, not the run's key; the other key stays.
    (seen,) = image_world["seen_at_create"]
    assert seen["nonempty_files"] == [] and not seen["history"]
    assert blob not in seen["keys"] and "other@box" in seen["keys"]
    # ...and afterwards the machine is as it was, the job running on.
    assert (run_dir / "work/train.py").exists() and (sshd.home / ".bash_history").exists()
    assert (run_dir / "secrets.env").read_text() == "export WANDB_API_KEY=canary\n"
    assert (sshd.home / ".ssh/authorized_keys").read_text() == keys_before
    assert process_alive(job_pid) and _job_state(job_pid) != "T"
    epoch = _last_epoch(run_dir / "job.log")
    wait_until(lambda: _last_epoch(run_dir / "job.log") > epoch, timeout=30, what="the job to go on")
    assert set(Path("/dev/shm").glob("gpurun-image-*")) == stashes, "the tmpfs stash is removed"

    (image,) = _images(endpoint)
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image["Name"] == name and image["ImageId"] == created["id"] and image["State"] == "available"
    assert tags["gpurun:managed"] == "true" and tags["gpurun:image"] == name
    assert tags["gpurun:source-ami"] == AMI and tags["gpurun:source-run"] == run
    assert tags["gpurun:setup-hash"] == created["setup_hash"] and len(created["setup_hash"]) == 64
    assert created["setup_files"] == ["requirements.txt", "setup.sh"]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    described = _ec2(endpoint).describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]
    assert {t["Key"]: t["Value"] for t in described["Tags"]}["gpurun:image"] == name

    code, out, err = cli(capsys, "image", "list", "--region", "us-east-1", "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    assert listed["name"] == name and listed["source_ami"] == AMI and listed["monthly_usd"] > 0
    code, out, err = cli(capsys, "image", "list", "--region", "us-east-1")
    assert code == 0 and name in out and f"{AMI} (run {run})" in out and "$0.75" in out, out  # 15 GB at $0.05

    # A launch from the image with the same setup skips setup: the marker is not written again.
    second, err = _launch(capsys, spec, "--set", f"aws.ami=image:{name}")
    assert "setup skipped" in err and name in err
    wait_until(lambda: _last_epoch(sshd.home / "gpurun" / second / "job.log") >= 1, timeout=60, what="job 2")
    assert marker.read_text() == "setup ran\n"
    # The job's setup hash (what `exec` compares) is the image's: one function computes both.
    record = json.loads(Path(os.environ["GPURUN_HOME"], "runs", f"{second}.json").read_text())
    assert record["jobs"][-1]["setup_hash"] == created["setup_hash"] and record["jobs"][-1]["setup_ran"] is False
    launched_from = _ec2(endpoint).describe_instances(Filters=[{"Name": "tag:gpurun:run", "Values": [second]}])[
        "Reservations"
    ][0]["Instances"][0]["ImageId"]
    assert launched_from == created["id"]

    # doctor resolves `auto` as launch does, and says which image and why.
    code, out, err = cli(capsys, "doctor", str(spec), "--set", "aws.ami=auto", "--json")
    ami_check = next(check for check in json.loads(out) if check["check"] == "AMI")
    assert (
        ami_check["result"] == "pass"
        and created["id"] in ami_check["detail"]
        and "setup is skipped" in ami_check["detail"]
    )

    # A changed requirements.txt matches no image: setup runs (image:<name>), or the fallback is used (auto).
    (Path(spec).parent / "code/requirements.txt").write_text("numpy==2.0.0\n")
    for ami, expected in ((f"image:{name}", "differs"), ("auto", f"aws.ami_fallback {AMI}")):
        code, out, err = cli(
            capsys,
            "launch",
            str(spec),
            "--dry-run",
            "--json",
            "--set",
            f"aws.ami={ami}",
            "--set",
            f"aws.ami_fallback={AMI}",
        )
        assert code == 0, err
        plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
        assert expected in plan["image"] and not plan["setup"].startswith("skipped"), plan
    (Path(spec).parent / "code/requirements.txt").write_text("numpy==1.26.4\n")
    code, out, err = cli(capsys, "launch", str(spec), "--dry-run", "--json", "--set", "aws.ami=auto")
    plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
    assert code == 0 and plan["setup"].startswith("skipped: auto: " + name), plan

    for each in (run, second):
        code, out, err = cli(capsys, "teardown", each, "--yes")
        assert code == 0, err
        _kill_run_processes(sshd, each)
    assert len(_images(endpoint)) == 1, "teardown never deletes images"
    code, out, err = cli(capsys, "image", "create", run)
    assert code == 2 and "has ended" in err

    # The orphan sweep lists the image (kept) and removes a snapshot no image refers to.
    ec2 = _ec2(endpoint)
    volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    planted = ec2.create_snapshot(
        VolumeId=volume,
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "gpurun:managed", "Value": "true"}]}],
    )["SnapshotId"]
    ec2.delete_volume(VolumeId=volume)
    code, out, err = cli(capsys, "teardown", "--orphans", "--region", "us-east-1", "--yes", "--json")
    assert code == 0, err
    swept = json.loads(out)
    kinds = {(o["kind"], o["id"]) for o in swept["orphans"]}
    assert ("snapshot", planted) in kinds and ("image", created["id"]) in kinds
    assert ("snapshot", snapshot) not in kinds, "an image's own snapshot is no orphan"
    assert f"snapshot {planted}" in swept["removed"] and planted not in _snapshot_ids(endpoint)
    assert len(_images(endpoint)) == 1

    code, out, err = cli(capsys, "image", "delete", name, "--region", "us-east-1", "--yes", "--json")
    assert code == 0, err
    assert _images(endpoint) == [] and snapshot not in _snapshot_ids(endpoint)
    code, out, err = cli(capsys, "image", "delete", name, "--region", "us-east-1", "--yes")
    assert code == 2 and "no gpurun image named" in err


@pytest.mark.slow
def test_image_create_refuses_bad_runs_and_undoes_an_interrupted_create(
    image_world, sshd, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurun import runs
    from gpurun.app import images

    endpoint = image_world["endpoint"]
    code, out, err = cli(capsys, "image", "create", "no-such-run")
    assert code == 2 and "no-such-run" in err
    code, out, err = cli(capsys, "image", "create", "x", "--name", "bad name!")
    assert code == 2
    run, _ = _launch(capsys, image_world["spec"])
    run_dir = sshd.home / "gpurun" / run
    job_pid = int((run_dir / "job.pid").read_text())
    code, out, err = cli(capsys, "image", "create", run, "--name", "a b")
    assert code == 2 and "not usable" in err and len(err.strip().splitlines()) == 1

    # Ctrl-C right after CreateImage: the image is deregistered, the files are back, the job runs on.
    image_world["interrupt_after_create"] = True
    code, out, err = cli(capsys, "image", "create", run, "--name", f"int-{image_world['tag']}")
    assert code == 130 and "interrupted" in err and "the machine keeps running" in err, err
    assert _images(endpoint) == []
    assert (run_dir / "work/train.py").exists() and process_alive(job_pid) and _job_state(job_pid) != "T"
    image_world["interrupt_after_create"] = False

    # CreateImage slower than the machine's watchdog: the files went back first, so the image is not kept.
    monkeypatch.setattr(images, "STASH_DEADLINE", 1)
    image_world["before_create"] = lambda: wait_until(
        lambda: (run_dir / "work/train.py").exists(), timeout=30, what="the watchdog to put the files back"
    )
    code, out, err = cli(capsys, "image", "create", run, "--name", f"slow-{image_world['tag']}")
    assert code == 1 and "put the run's files back before CreateImage returned" in err, err
    assert _images(endpoint) == [] and process_alive(job_pid) and _job_state(job_pid) != "T"
    image_world["before_create"] = None

    # Ctrl-C just as the files were hidden (or a laptop gone): the machine's watchdog puts them back.
    hide = images._stash

    def hide_then_interrupt(*args, **kwargs):
        hide(*args, **kwargs)
        assert not (run_dir / "work/train.py").exists() and _job_state(job_pid) == "T"
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_stash", hide_then_interrupt)
    calls = len(image_world["seen_at_create"])
    stashes = set(Path("/dev/shm").glob("gpurun-image-*"))
    code, out, err = cli(capsys, "image", "create", run, "--name", f"gone-{image_world['tag']}")
    assert code == 130 and "puts them back and lets the job continue by itself" in err, err
    wait_until(lambda: (run_dir / "work/train.py").exists(), timeout=30, what="the watchdog to put the files back")
    wait_until(lambda: _job_state(job_pid) != "T", timeout=10, what="the job to continue")
    assert _images(endpoint) == [] and len(image_world["seen_at_create"]) == calls, "CreateImage was never called"
    monkeypatch.setattr(images, "_stash", hide)
    for left in set(Path("/dev/shm").glob("gpurun-image-*")) - stashes:
        shutil.rmtree(left)  # the watchdog keeps its answer 10 minutes for a late caller; it ends when this goes

    # A machine that does not answer: exit 1, one line, nothing created.
    from gpurun.providers.aws import connect

    saved = runs.load(run)
    runs.update(run, machines=[{**m, "port": 1} for m in saved["machines"]])
    connect.AWS_CONNECT_RETRY_FOR, retry = 0.0, connect.AWS_CONNECT_RETRY_FOR
    try:
        code, out, err = cli(capsys, "image", "create", run)
    finally:
        connect.AWS_CONNECT_RETRY_FOR = retry
    assert code == 1 and "nothing was created" in err and len(err.strip().splitlines()) == 1, err
    assert _images(endpoint) == []
    runs.update(run, machines=saved["machines"])

    # A machine AWS no longer runs: bad input, nothing created.
    _ec2(endpoint).stop_instances(InstanceIds=[saved["machines"][0]["instance_id"]])
    code, out, err = cli(capsys, "image", "create", run)
    assert code == 2 and "not running" in err
    assert _images(endpoint) == []
    code, out, err = cli(capsys, "teardown", run, "--yes")
    assert code == 0, err
    _kill_run_processes(sshd, run)


def test_image_create_of_a_local_run_is_bad_input_and_creates_nothing(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "local.yaml"
    spec.write_text(f"name: here\nprovider: local\nrun: {sys.executable} -c 'import time; time.sleep(60)'\n")
    run, _ = _launch(capsys, spec)
    try:
        code, out, err = cli(capsys, "image", "create", run)
        assert code == 2 and out == "" and f"run {run} runs on provider local" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        code, out, err = cli(capsys, "teardown", run, "--yes")
        assert code == 0, err
