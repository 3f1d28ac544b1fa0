"""A recovering AWS run after a reclaim: what a user reaches once the group's second machine runs the job.

One scenario (module fixture `reclaimed`) serves every test here: the real
CLI launches a recovering run on moto's server and returns; `gpurun logs RUN
-f` starts following in its own process; a spot notice, the final snapshot,
and a reclaim (terminate without decrement) follow; the group's second
machine (booted by the boot emulator, with an sshd of its own on its own
loopback address) resumes from LATEST. With the launching process long gone,
the scenario runs `ssh` and `checkpoint-sync` (snapshot now) on the second
machine, then lets the job succeed. Each test checks one thing a user sees:
`ssh` reached the new machine, the snapshot was its agent's, `logs -f`
followed across the reclaim, `logs` shows the new machine's output (and
`--job 1` the first's), and `checkpoint-sync` lists and restores the
snapshots of both machines. The tests read what the scenario recorded, so
they hold in any order and on any xdist worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402

from gpurun.cli import main  # noqa: E402
from gpurun.providers.aws import AwsProvider  # noqa: E402
from tests.helpers import gpurun, wait_until  # noqa: E402
from tests.plugins.boot_emulator import BootEmulator  # noqa: E402
from tests.test_recovery_aws_e2e import AMI, TRAIN, _group, _latest, _log  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("recovery-replacement")]


@dataclass
class Reclaimed:
    run: str
    first: str
    second: str
    env: dict[str, str]
    world: dict[str, Any]
    emulator: BootEmulator
    saved_seq: int
    resumed_step: int
    ssh_first: subprocess.CompletedProcess[str]
    ssh_again: subprocess.CompletedProcess[str]
    synced: tuple[int, str]
    second_agent_seq: int | None
    followed: tuple[int, str, str]


def _cli(*args: str) -> tuple[int, str]:
    """The real CLI in this process (so the provider's test settings apply); its exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(list(args))
    return int(exited.value.code or 0), out.getvalue()


def _wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return process.poll()


def _environment(home: Path, endpoint: str, bundled_amis: str) -> dict[str, str]:
    """What tests/conftest.py's _isolated_home and moto_validation set, for the whole module."""
    return {
        "GPURUN_HOME": str(home),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "NO_COLOR": "1",
        "OMP_NUM_THREADS": "1",
        "MOTO_AMIS_PATH": bundled_amis,
        "GPURUN_IP_ECHO_URLS": "http://127.0.0.1:9/",
    }


@pytest.fixture(scope="module")
def reclaimed(moto_server: str, bundled_amis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reclaimed]:
    import getpass

    import moto.settings

    from tests.plugins.aws_moto import _VALIDATION
    from tests.plugins.sshd import _free_port

    root = tmp_path_factory.mktemp("reclaimed")
    env = _environment(root / "gpurun-home", moto_server, bundled_amis)
    (root / "gpurun-home").mkdir()
    run_keys = root / "run-keys"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        for name in _VALIDATION:
            patch.setattr(moto.settings, name, True)

        def before_import_key(params: dict[str, Any], **_: Any) -> None:
            # cloud-init puts the key pair's public key in authorized_keys; the emulator reads it at each boot.
            import base64

            material = params["body"]["PublicKeyMaterial"]
            key = base64.b64decode(material).decode() if not material.startswith("ssh-") else material
            with open(run_keys, "a") as handle:
                handle.write(key.strip() + "\n")

        original_init = AwsProvider.__init__

        def patched_init(self: AwsProvider, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.poll_interval = 0.2
            self.event_handlers.append(("before-call.ec2.ImportKeyPair", before_import_key))

        patch.setattr(AwsProvider, "__init__", patched_init)
        bucket = f"replacement-{os.getpid()}-{time.monotonic_ns() % 10**8}"
        boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
        world = {"bucket": bucket, "endpoint": moto_server}
        code_dir = root / "code"
        code_dir.mkdir()
        (code_dir / "train.py").write_text(TRAIN)
        finish_file = root / "finish"
        spec = root / "aws.yaml"
        port = _free_port()
        spec.write_text(
            "name: rec\nprovider: aws\nworkdir: code\n"
            f"run: {sys.executable} train.py {finish_file}\n"
            f"checkpoint: {{dir: ckpt, every: 1h, keep: 10, store: 's3://{bucket}/runs', resume: never}}\n"
            f"aws: {{instance_type: [t3.micro, t3.small], ami: {AMI}, disk_gb: 20, ssh_cidr: 127.0.0.1/32, "
            "spot: true, max_runtime: 2h, idle_timeout: 1s}\n"
            f"ssh: {{user: {getpass.getuser()}, port: {port}}}\n"
            "recovery: {max_restarts: 2}\n"
        )
        emulator = BootEmulator(moto_server, root / "machines", ssh_port=port, authorized_keys=run_keys)
        emulator.start()
        follower: subprocess.Popen[bytes] | None = None
        run = ""
        try:
            code, out = _cli("launch", str(spec), "--json")
            assert code == 0, out
            run = json.loads(out)["run"]
            # From here on no gpurun process of the laptop runs, but the follower started next.
            [first] = emulator.live()
            wait_until(lambda: "job started" in _log(emulator, first, run), timeout=60, what="the first job")
            follow_out, follow_err = root / "follow.out", root / "follow.err"
            with open(follow_out, "wb") as stdout, open(follow_err, "wb") as stderr:
                follower = subprocess.Popen(
                    [sys.executable, "-m", "gpurun", "logs", run, "-f"],
                    stdout=stdout,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ},
                )
            wait_until(lambda: "step 3" in _log(emulator, first, run), timeout=60, what="step 3")
            emulator.interrupt(first)
            wait_until(
                lambda: (emulator.run_dir(first, run) / "interrupted").exists() and _latest(world, run),
                timeout=60,
                what="the final snapshot after the spot notice",
            )
            wait_until(
                lambda: (
                    json.loads((emulator.run_dir(first, run) / "agent.status.json").read_text()).get("last_seq")
                    == (_latest(world, run) or {}).get("seq")
                ),
                timeout=30,
                what="the agent's final snapshot to be LATEST",
            )
            saved_seq = int((_latest(world, run) or {})["seq"])
            autoscaling = boto3.client("autoscaling", endpoint_url=moto_server, region_name="us-east-1")
            autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=first, ShouldDecrementDesiredCapacity=False)
            second = wait_until(lambda: [i for i in emulator.live() if i != first], timeout=60, what="a new machine")[0]
            resumed = wait_until(
                lambda: [line for line in _log(emulator, second, run).splitlines() if line.startswith("resumed at")],
                timeout=120,
                what="the new machine's job to resume",
            )
            resumed_step = int(resumed[0].split()[-1])
            # While the second machine runs the job: what a user does on it (each test asserts one).
            # pytest-xdist's xdist_group does not hold with pytest 9 here, so nothing depends on test order.
            ssh_first = gpurun("ssh", run, "--", "cat", "~/instance-id", check=False)
            ssh_again = gpurun("ssh", run, "--", "pwd;", "cat", "~/instance-id", check=False)
            synced = _cli("checkpoint-sync", run, "--json")
            status = json.loads((emulator.run_dir(second, run) / "agent.status.json").read_text())
            # The job succeeds: the run ends, and so does `logs -f`.
            finish_file.touch()
            followed_code = _wait_for_exit(follower, 90)
            assert followed_code is not None, "logs -f did not end with the run"
            wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=90, what="the group at 0")
            yield Reclaimed(
                run=run,
                first=first,
                second=second,
                env=env,
                world=world,
                emulator=emulator,
                saved_seq=saved_seq,
                resumed_step=resumed_step,
                ssh_first=ssh_first,
                ssh_again=ssh_again,
                synced=synced,
                second_agent_seq=status.get("last_seq"),
                followed=(followed_code, follow_out.read_text(), follow_err.read_text()),
            )
        finally:
            if follower is not None and follower.poll() is None:
                follower.kill()
                follower.wait(10)
            if run:
                _cli("teardown", run, "--yes")
            emulator.close()


@pytest.fixture
def scenario(reclaimed: Reclaimed, monkeypatch: pytest.MonkeyPatch) -> Reclaimed:
    """The scenario's state directory and moto endpoint in this test's environment."""
    for key, value in reclaimed.env.items():
        monkeypatch.setenv(key, value)
    return reclaimed


def test_ssh_reaches_the_replacement_machine(scenario: Reclaimed) -> None:
    done = scenario.ssh_first
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == scenario.second, "the group's current machine, not the first"
    # Its host key was trusted on first use and kept: the next connection checks it.
    known = Path(scenario.env["GPURUN_HOME"]) / "keys" / scenario.run / "known_hosts"
    second_sshd = scenario.emulator.instances[scenario.second].sshd
    assert second_sshd is not None and second_sshd.host_key_line in known.read_text()
    # It lands in the run's work directory there, which the machine reported (its home is its own).
    again = scenario.ssh_again
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [
        str(scenario.emulator.run_dir(scenario.second, scenario.run) / "work"),
        scenario.second,
    ]


def test_checkpoint_sync_takes_a_snapshot_on_the_replacement_machine(scenario: Reclaimed) -> None:
    code, out = scenario.synced
    assert code == 0, out
    taken = json.loads(out)
    assert taken["new"] is True and taken["seq"] > scenario.saved_seq, taken
    assert scenario.second_agent_seq == taken["seq"], "the second machine's agent took it"


def test_logs_follows_the_run_across_the_reclaim_until_it_ends(scenario: Reclaimed) -> None:
    code, out, err = scenario.followed
    assert code == 0, (out, err)
    lines = out.splitlines()
    [marker] = [line for line in lines if line.startswith("--- machine")]
    assert marker.startswith(f"--- machine 2 ({scenario.second}, t3.") and marker.endswith(
        "took over: resumed from LATEST ---"
    ), marker
    at = lines.index(marker)
    assert "job started" in lines[:at] and f"step {scenario.resumed_step}" in lines[:at], "the first machine's output"
    assert f"resumed at step {scenario.resumed_step}" in lines[at + 1 :] and lines[-1] == "done", out
    assert "the job exited with status 0 (1 of 2 restarts used)" in err, err


def test_logs_shows_the_new_machines_output_and_job_1_the_firsts(
    scenario: Reclaimed, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["logs", scenario.run])
    newest = capsys.readouterr().out
    assert exited.value.code in (0, None)
    assert f"resumed at step {scenario.resumed_step}\njob started\nstep {scenario.resumed_step + 1}\n" in newest
    assert newest.endswith("done\n") and "step 1\n" not in newest, "only the second machine's output"
    with pytest.raises(SystemExit):
        main(["logs", scenario.run, "--job", "1"])
    first = capsys.readouterr().out
    assert "job started\nstep 1\n" in first and f"step {scenario.resumed_step}\n" in first, first[:200]
    assert "resumed at step" not in first


def test_checkpoint_sync_lists_and_restores_snapshots_of_both_machines(
    scenario: Reclaimed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["checkpoint-sync", scenario.run, "--list", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert exited.value.code in (0, None)
    seqs = [item["seq"] for item in listed]
    assert scenario.saved_seq in seqs, "the first machine's final snapshot"
    assert max(seqs) > scenario.saved_seq, "snapshots taken by the second machine"

    def restored(seq: int | None) -> int:
        dest = tmp_path / f"restore-{seq}"
        arguments = ["checkpoint-sync", scenario.run, "--download", str(dest)]
        with pytest.raises(SystemExit) as exited:
            main(arguments + (["--seq", str(seq)] if seq else []))
        assert exited.value.code in (0, None), capsys.readouterr().err
        return int(json.loads((dest / "state.json").read_text())["step"])

    assert restored(scenario.saved_seq) == scenario.resumed_step, "what the first machine saved on the notice"
    assert restored(None) > scenario.resumed_step, "LATEST: the second machine went on from there"
