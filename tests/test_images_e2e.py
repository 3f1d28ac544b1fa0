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
from tests.helpers import (  # noqa: E402
    cli_captured,  # noqa: E402
    process_alive,
    wait_until,
)
from tests.test_aws_e2e import ACCOUNT, AMI, aws_world, cli, wide_aws_world  # noqa: E402,F401

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
    with image_world_of(aws_world, sshd, tmp_path, monkeypatch) as world:
        yield world


@contextlib.contextmanager
def image_world_of(aws_world, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
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
    try:
        yield world
    finally:
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


def _went_on(condition, what: str) -> bool:
    """wait_until, as an observation a test asserts on later."""
    try:
        wait_until(condition, timeout=60, what=what)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="class")
def image_story(moto_server: str, sshd, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory):
    """A run baked into an image, which a second launch then uses; list, doctor, dry runs against it;
    teardown, the orphan sweep and delete. Two launches cost most, so the story runs once and keeps
    what each step printed and what moto and the machine held after it, for the tests to check."""
    with (
        wide_aws_world(moto_server, sshd, bundled_amis, tmp_path_factory) as (world, monkeypatch),
        image_world_of(world, sshd, world["tmp_path"], monkeypatch) as image_world,
    ):
        endpoint, tag, spec = image_world["endpoint"], image_world["tag"], image_world["spec"]
        marker = sshd.home / f"setup-marker-{tag}"
        seen: dict = {"tag": tag, "spec": spec}
        code, out, err = cli_captured("launch", str(spec), "--json")
        assert code == 0, err
        run = seen["run"] = json.loads(out)["run"]
        second = None
        try:
            seen["marker after launch"] = marker.read_text()
            run_dir = sshd.home / "gpurun" / run
            job_pid = int((run_dir / "job.pid").read_text())
            wait_until(lambda: _last_epoch(run_dir / "job.log") >= 2, timeout=60, what="the job's output")
            (sshd.home / ".bash_history").write_text("export WANDB_API_KEY=canary\n")
            (run_dir / "secrets.env").write_text("export WANDB_API_KEY=canary\n")  # as the spec's secrets: would
            keys_before = seen["keys before"] = (sshd.home / ".ssh/authorized_keys").read_text()
            record_file = Path(os.environ["GPURUN_HOME"], "runs", f"{run}.json")
            run_key = Path(f"{json.loads(record_file.read_text())['machines'][0]['key_path']}.pub")
            seen["run key"] = run_key.read_text().split()[1]

            name = seen["name"] = f"img-{tag}"
            stashes = set(Path("/dev/shm").glob("gpurun-image-*"))
            seen["create"] = cli_captured("image", "create", run, "--name", name, "--json")
            seen["seen at create"] = list(image_world["seen_at_create"])
            seen["after create"] = {
                "train.py": (run_dir / "work/train.py").exists(),
                "history": (sshd.home / ".bash_history").exists(),
                "secrets.env": (run_dir / "secrets.env").read_text(),
                "keys unchanged": (sshd.home / ".ssh/authorized_keys").read_text() == keys_before,
                "job running": process_alive(job_pid) and _job_state(job_pid) != "T",
            }
            epoch = _last_epoch(run_dir / "job.log")
            seen["after create"]["job went on"] = _went_on(
                lambda: _last_epoch(run_dir / "job.log") > epoch, "the job to go on"
            )
            seen["after create"]["stash removed"] = set(Path("/dev/shm").glob("gpurun-image-*")) == stashes
            seen["images"] = _images(endpoint)
            seen["created"] = json.loads(seen["create"][1]) if seen["create"][0] == 0 else {}
            if seen["images"]:
                snapshot = seen["snapshot"] = seen["images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
                seen["snapshot described"] = _ec2(endpoint).describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]

            seen["list --json"] = cli_captured("image", "list", "--region", "us-east-1", "--json")
            seen["list"] = cli_captured("image", "list", "--region", "us-east-1")

            # A launch from the image with the same setup skips setup: the marker is not written again.
            code, out, err = seen["launch from image"] = cli_captured(
                "launch", str(spec), "--json", "--set", f"aws.ami=image:{name}"
            )
            assert code == 0, err
            second = json.loads(out)["run"]
            seen["job 2 ran"] = _went_on(lambda: _last_epoch(sshd.home / "gpurun" / second / "job.log") >= 1, "job 2")
            seen["marker after launch from image"] = marker.read_text()
            seen["second record"] = json.loads(Path(os.environ["GPURUN_HOME"], "runs", f"{second}.json").read_text())
            by_run = [{"Name": "tag:gpurun:run", "Values": [second]}]
            seen["second launched from"] = _ec2(endpoint).describe_instances(Filters=by_run)["Reservations"][0][
                "Instances"
            ][0]["ImageId"]

            seen["doctor auto"] = cli_captured("doctor", str(spec), "--set", "aws.ami=auto", "--json")

            # A changed requirements.txt matches no image: setup runs (image:<name>), or the fallback is used (auto).
            (Path(spec).parent / "code/requirements.txt").write_text("numpy==2.0.0\n")
            for ami in (f"image:{name}", "auto"):
                seen[f"dry run, changed setup, {ami}"] = cli_captured(
                    "launch",
                    str(spec),
                    "--dry-run",
                    "--json",
                    "--set",
                    f"aws.ami={ami}",
                    "--set",
                    f"aws.ami_fallback={AMI}",
                )
            (Path(spec).parent / "code/requirements.txt").write_text("numpy==1.26.4\n")
            seen["dry run, same setup, auto"] = cli_captured(
                "launch", str(spec), "--dry-run", "--json", "--set", "aws.ami=auto"
            )

            seen["teardowns"] = []
            for each in (run, second):
                seen["teardowns"].append(cli_captured("teardown", each, "--yes"))
                _kill_run_processes(sshd, each)
            seen["images after teardown"] = len(_images(endpoint))
            seen["create on an ended run"] = cli_captured("image", "create", run)

            # The orphan sweep lists the image (kept) and removes a snapshot no image refers to.
            ec2 = _ec2(endpoint)
            volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
            managed = [{"ResourceType": "snapshot", "Tags": [{"Key": "gpurun:managed", "Value": "true"}]}]
            seen["planted"] = ec2.create_snapshot(VolumeId=volume, TagSpecifications=managed)["SnapshotId"]
            ec2.delete_volume(VolumeId=volume)
            seen["orphans"] = cli_captured("teardown", "--orphans", "--region", "us-east-1", "--yes", "--json")
            seen["snapshots after orphans"] = _snapshot_ids(endpoint)
            seen["images after orphans"] = len(_images(endpoint))

            seen["delete"] = cli_captured("image", "delete", name, "--region", "us-east-1", "--yes", "--json")
            seen["images after delete"] = _images(endpoint)
            seen["snapshots after delete"] = _snapshot_ids(endpoint)
            seen["delete again"] = cli_captured("image", "delete", name, "--region", "us-east-1", "--yes")
        finally:
            for each in (run, second):  # moto's termination cannot stop processes on the loopback sshd
                if each:
                    _kill_run_processes(sshd, each)
        return seen


@pytest.mark.slow
class TestImageCreateUseListDeleteAndOrphanSweep:
    def test_the_image_holds_nothing_of_the_run_nor_its_key(self, image_story) -> None:
        assert image_story["marker after launch"] == "setup ran\n"
        assert image_story["run key"] in image_story["keys before"]
        code, out, err = image_story["create"]
        assert code == 0, err
        # What the image would hold: nothing of the run, no history, not the run's key; the other key stays.
        (seen,) = image_story["seen at create"]
        assert seen["nonempty_files"] == [] and not seen["history"]
        assert image_story["run key"] not in seen["keys"] and "other@box" in seen["keys"]

    def test_the_machine_is_as_it_was_and_the_job_runs_on(self, image_story) -> None:
        after = image_story["after create"]
        assert after["train.py"] and after["history"]
        assert after["secrets.env"] == "export WANDB_API_KEY=canary\n"
        assert after["keys unchanged"]
        assert after["job running"]
        assert after["job went on"], "the job went on after the image was made"
        assert after["stash removed"], "the tmpfs stash is removed"

    def test_the_image_and_its_snapshot_are_tagged_with_their_source(self, image_story) -> None:
        created, name, run = image_story["created"], image_story["name"], image_story["run"]
        (image,) = image_story["images"]
        tags = {t["Key"]: t["Value"] for t in image["Tags"]}
        assert image["Name"] == name and image["ImageId"] == created["id"] and image["State"] == "available"
        assert tags["gpurun:managed"] == "true" and tags["gpurun:image"] == name
        assert tags["gpurun:source-ami"] == AMI and tags["gpurun:source-run"] == run
        assert tags["gpurun:setup-hash"] == created["setup_hash"] and len(created["setup_hash"]) == 64
        assert created["setup_files"] == ["requirements.txt", "setup.sh"]
        described = image_story["snapshot described"]
        assert {t["Key"]: t["Value"] for t in described["Tags"]}["gpurun:image"] == name

    def test_image_list_shows_it_with_its_source_and_monthly_cost(self, image_story) -> None:
        name, run = image_story["name"], image_story["run"]
        code, out, err = image_story["list --json"]
        assert code == 0, err
        (listed,) = json.loads(out)
        assert listed["name"] == name and listed["source_ami"] == AMI and listed["monthly_usd"] > 0
        code, out, err = image_story["list"]
        assert code == 0 and name in out and f"{AMI} (run {run})" in out and "$0.75" in out, out  # 15 GB at $0.05

    def test_a_launch_from_the_image_with_the_same_setup_skips_setup(self, image_story) -> None:
        created = image_story["created"]
        code, out, err = image_story["launch from image"]
        assert "setup skipped" in err and image_story["name"] in err
        assert image_story["job 2 ran"]
        assert image_story["marker after launch from image"] == "setup ran\n"
        # The job's setup hash (what `exec` compares) is the image's: one function computes both.
        job = image_story["second record"]["jobs"][-1]
        assert job["setup_hash"] == created["setup_hash"] and job["setup_ran"] is False
        assert image_story["second launched from"] == created["id"]

    def test_doctor_resolves_auto_as_launch_does_and_says_which_image_and_why(self, image_story) -> None:
        code, out, err = image_story["doctor auto"]
        ami_check = next(check for check in json.loads(out) if check["check"] == "AMI")
        assert (
            ami_check["result"] == "pass"
            and image_story["created"]["id"] in ami_check["detail"]
            and "setup is skipped" in ami_check["detail"]
        )

    def test_a_changed_setup_matches_no_image(self, image_story) -> None:
        name = image_story["name"]
        # Setup runs (image:<name>), or the fallback is used (auto).
        for ami, expected in ((f"image:{name}", "differs"), ("auto", f"aws.ami_fallback {AMI}")):
            code, out, err = image_story[f"dry run, changed setup, {ami}"]
            assert code == 0, err
            plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
            assert expected in plan["image"] and not plan["setup"].startswith("skipped"), plan
        code, out, err = image_story["dry run, same setup, auto"]
        plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
        assert code == 0 and plan["setup"].startswith("skipped: auto: " + name), plan

    def test_teardown_never_deletes_images_and_an_ended_run_cannot_be_baked(self, image_story) -> None:
        for code, _out, err in image_story["teardowns"]:
            assert code == 0, err
        assert image_story["images after teardown"] == 1, "teardown never deletes images"
        code, out, err = image_story["create on an ended run"]
        assert code == 2 and "has ended" in err

    def test_the_orphan_sweep_keeps_the_image_and_removes_a_snapshot_no_image_uses(self, image_story) -> None:
        planted, snapshot, created = image_story["planted"], image_story["snapshot"], image_story["created"]
        code, out, err = image_story["orphans"]
        assert code == 0, err
        swept = json.loads(out)
        kinds = {(o["kind"], o["id"]) for o in swept["orphans"]}
        assert ("snapshot", planted) in kinds and ("image", created["id"]) in kinds
        assert ("snapshot", snapshot) not in kinds, "an image's own snapshot is no orphan"
        assert f"snapshot {planted}" in swept["removed"] and planted not in image_story["snapshots after orphans"]
        assert image_story["images after orphans"] == 1

    def test_image_delete_removes_the_image_and_its_snapshot_once(self, image_story) -> None:
        code, out, err = image_story["delete"]
        assert code == 0, err
        assert image_story["images after delete"] == []
        assert image_story["snapshot"] not in image_story["snapshots after delete"]
        code, out, err = image_story["delete again"]
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
