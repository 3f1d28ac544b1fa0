"""`secrets:` end to end: a planted canary value reaches the job and nothing else gpurun writes.

The job prints each secret's sha256, so its log proves the value arrived
without holding it. Every file gpurun wrote (state directory, store, the
machine's run directory but for the one secrets file, logs) and everything it
printed is searched for the value, while the run lives and after teardown.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gpurun import paths
from tests.helpers import gpurun, wait_until
from tests.test_aws_e2e import aws_world  # noqa: F401 - the fixture
from tests.test_recovery_aws_e2e import world as recovery_world  # noqa: F401 - the fixture

JOB = """\
import hashlib, json, os, sys, time
checkpoints = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(checkpoints, exist_ok=True)
for name in sys.argv[1:]:
    print(name, hashlib.sha256(os.environ[name].encode()).hexdigest(), flush=True)
with open(os.path.join(checkpoints, "state.json.tmp"), "w") as handle:
    json.dump({"epoch": 1}, handle)
os.replace(os.path.join(checkpoints, "state.json.tmp"), os.path.join(checkpoints, "state.json"))
time.sleep(300)
"""


def canary(kind: str) -> str:
    return f"canary-{kind}-{uuid.uuid4().hex}"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def files_holding(roots: list[Path], values: list[str], *, except_file: Path | None = None) -> list[str]:
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if not path.is_file() or path.is_symlink() or path == except_file:
                continue
            data = path.read_bytes()
            found += [f"{path} holds {value[:14]}..." for value in values if value.encode() in data]
    return found


def write_experiment(tmp_path: Path, body: str) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text(JOB)
    spec = tmp_path / "experiment.yaml"
    spec.write_text(body)
    return spec


def cli(*args: str, printed: list[str], check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    done = gpurun(*args, check=check, env=env)
    printed += [done.stdout, done.stderr]
    return done


def test_secrets_reach_the_local_job_and_nothing_else(
    tmp_path: Path, gpurun_home: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    values = {"WANDB_API_KEY": canary("env"), "DB_PASSWORD": canary("ssm"), "HF_TOKEN": canary("sm")}
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("MY_WANDB_KEY", values["WANDB_API_KEY"])
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/team/db", Value=values["DB_PASSWORD"], Type="SecureString", Overwrite=True
    )
    secrets_manager = boto3.client("secretsmanager", region_name="us-east-1")
    name = f"hf-token-{uuid.uuid4().hex[:6]}"
    secrets_manager.create_secret(Name=name, SecretString=values["HF_TOKEN"])
    store = tmp_path / "store"
    spec = write_experiment(
        tmp_path,
        "name: secret\nworkdir: code\n"
        f"run: {sys.executable} job.py WANDB_API_KEY DB_PASSWORD HF_TOKEN\n"
        "env: {MY_API_KEY: harmless, KERAS_BACKEND: torch, TOKENIZERS_PARALLELISM: 'false'}\n"
        f"secrets: {{WANDB_API_KEY: 'env:MY_WANDB_KEY', DB_PASSWORD: 'ssm:/team/db', HF_TOKEN: 'secretsmanager:{name}'}}\n"
        f"checkpoint: {{dir: ckpt, every: 1s, store: 'file://{store}', resume: never}}\n",
    )
    printed: list[str] = []
    plan = cli("launch", str(spec), "--dry-run", "--json", printed=printed)
    [row] = [row["value"] for row in json.loads(plan.stdout)["plan"] if row["item"] == "secrets"]
    assert "WANDB_API_KEY ($MY_WANDB_KEY here)" in row and "DB_PASSWORD (ssm:/team/db)" in row
    assert "env.MY_API_KEY looks like a secret" in plan.stderr and "secrets:" in plan.stderr
    assert "KERAS_BACKEND" not in plan.stderr and "TOKENIZERS_PARALLELISM" not in plan.stderr

    launched = cli("launch", str(spec), "--json", printed=printed)
    run = json.loads(launched.stdout)["run"]
    run_dir = paths.local_runs_dir() / run
    secrets_file = run_dir / "secrets.env"
    try:
        log = run_dir / "job.log"
        wait_until(lambda: log.exists() and "HF_TOKEN " in log.read_text(), what="the job's hashes")
        for variable, value in values.items():
            assert f"{variable} {sha(value)}" in log.read_text(), "the job sees each secret as an env var"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert all(value in secrets_file.read_text() for value in values.values())
        wait_until(
            lambda: json.loads(cli("status", run, "--json", printed=printed).stdout)[0]["last_checkpoint"],
            what="a snapshot in the store",
        )
        cli("status", printed=printed)
        cli("logs", run, printed=printed)
        roots = [gpurun_home, store]
        assert files_holding(roots, list(values.values()), except_file=secrets_file) == []
    finally:
        cli("teardown", run, "--yes", "--json", printed=printed)
    assert not secrets_file.exists()
    assert files_holding([gpurun_home, store], list(values.values())) == []
    assert not [text for text in printed if any(value in text for value in values.values())]

    # A launch that fails resolving on the machine, with --debug: the traceback holds no value either.
    spec.write_text(spec.read_text().replace("ssm:/team/db", "ssm:/team/missing"))
    failed = cli("--debug", "launch", str(spec), printed=printed, check=False)
    assert failed.returncode == 1 and "secrets.DB_PASSWORD: cannot read ssm:/team/missing" in failed.stderr
    assert "Traceback" in failed.stderr
    assert not [text for text in printed if any(value in text for value in values.values())]
    assert files_holding([gpurun_home, store], list(values.values())) == []


def test_a_secret_missing_here_is_bad_input_and_creates_nothing(
    tmp_path: Path, gpurun_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    spec = write_experiment(tmp_path, "name: secret\nworkdir: code\nrun: python job.py\nsecrets: [NOT_SET_ANYWHERE]\n")
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: secrets.NOT_SET_ANYWHERE: NOT_SET_ANYWHERE is not set in this computer's environment; "
        "export it and launch again"
    ]
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("*.json"))


def test_a_value_written_into_secrets_is_refused_without_being_shown(tmp_path: Path) -> None:
    value = canary("typed")
    spec = write_experiment(
        tmp_path, f"name: secret\nworkdir: code\nrun: python job.py\nsecrets: {{API_TOKEN: {value}}}\n"
    )
    done = gpurun("launch", str(spec), "--dry-run", check=False)
    assert done.returncode == 2 and "secrets" in done.stderr and "API_TOKEN" in done.stderr
    assert value not in done.stderr and value not in done.stdout


def test_secrets_reach_the_ssh_job_and_go_at_teardown_even_with_keep_files(
    sshd, ssh_client_home: Path, tmp_path: Path, gpurun_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = canary("ssh")
    monkeypatch.setenv("WANDB_API_KEY", value)
    store = tmp_path / "store"
    spec = write_experiment(
        tmp_path,
        "name: secret\nprovider: ssh\nworkdir: code\n"
        f"run: {sys.executable} job.py WANDB_API_KEY\n"
        "secrets: [WANDB_API_KEY]\nssh: {hosts: [testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1s, store: 'file://{store}', resume: never}}\n",
    )
    printed: list[str] = []
    run = json.loads(cli("launch", str(spec), "--json", printed=printed).stdout)["run"]
    run_dir = sshd.home / "gpurun" / run
    secrets_file = run_dir / "secrets.env"
    try:
        log = run_dir / "job.log"
        wait_until(lambda: log.exists() and f"WANDB_API_KEY {sha(value)}" in log.read_text(), what="the job's hash")
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        wait_until(
            lambda: json.loads(cli("status", run, "--json", printed=printed).stdout)[0]["last_checkpoint"],
            what="a snapshot in the store",
        )
        cli("logs", run, printed=printed)
        assert files_holding([gpurun_home, store, run_dir], [value], except_file=secrets_file) == []
    finally:
        down = cli("teardown", run, "--yes", "--json", "--keep-files", printed=printed)
    assert any("secrets file" in item for item in json.loads(down.stdout)["runs"][0]["removed"])
    assert (run_dir / "job.log").exists() and not secrets_file.exists()
    assert files_holding([gpurun_home, store, run_dir], [value]) == []
    assert not [text for text in printed if value in text]


@pytest.mark.slow
def test_secrets_on_aws_over_moto_server_and_sshd(request, sshd, capsys, gpurun_home: Path, monkeypatch) -> None:
    """provider: aws on moto's server, the instance being the loopback sshd: the env value travels over
    SSH, the SSM reference is read on the machine (its own AWS access stands in for the role), and the
    role may read exactly that parameter."""
    import boto3

    from tests.test_aws_e2e import cli as aws_cli

    world = request.getfixturevalue("aws_world")

    values = {"WANDB_API_KEY": canary("aws-env"), "DB_PASSWORD": canary("aws-ssm")}
    monkeypatch.setenv("WANDB_API_KEY", values["WANDB_API_KEY"])
    endpoint = world["endpoint"]
    boto3.client("ssm", endpoint_url=endpoint, region_name="us-east-1").put_parameter(
        Name="/e2e/db", Value=values["DB_PASSWORD"], Type="SecureString", Overwrite=True
    )
    spec = world["spec"]
    (spec.parent / "code" / "job.py").write_text(JOB)
    text = spec.read_text().replace("train.py\n", "job.py WANDB_API_KEY DB_PASSWORD\n")
    spec.write_text(text + "secrets: {WANDB_API_KEY: env, DB_PASSWORD: 'ssm:/e2e/db'}\n")
    printed: list[str] = []
    code, out, err = aws_cli(capsys, "launch", str(spec), "--json")
    printed += [out, err]
    assert code == 0, err
    run = json.loads(out)["run"]
    run_dir = sshd.home / "gpurun" / run
    secrets_file = run_dir / "secrets.env"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")

    def bucket_texts() -> list[str]:
        listed = s3.list_objects_v2(Bucket=world["bucket"]).get("Contents", [])
        return [s3.get_object(Bucket=world["bucket"], Key=o["Key"])["Body"].read().decode("latin-1") for o in listed]

    try:
        log = run_dir / "job.log"
        wait_until(lambda: log.exists() and "DB_PASSWORD " in log.read_text(), what="the job's hashes")
        for variable, value in values.items():
            assert f"{variable} {sha(value)}" in log.read_text()
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        policy = iam.get_role_policy(RoleName=f"gpurun-{run}", PolicyName="gpurun-checkpoint-store")["PolicyDocument"]
        policy = json.loads(policy) if isinstance(policy, str) else policy
        [parameters] = [st for st in policy["Statement"] if st["Sid"] == "SecretParameters"]
        assert parameters["Resource"] == ["arn:aws:ssm:us-east-1:123456789012:parameter/e2e/db"]
        code, out, err = aws_cli(capsys, "status", run, "--json")
        printed += [out, err]
        assert files_holding([gpurun_home, run_dir], list(values.values()), except_file=secrets_file) == []
        assert not [t for t in bucket_texts() if any(v in t for v in values.values())]
    finally:
        code, out, err = aws_cli(capsys, "teardown", run, "--yes", "--json")
        printed += [out, err]
    assert code == 0, err
    assert not secrets_file.exists()
    assert files_holding([gpurun_home], list(values.values())) == []
    assert not [t for t in bucket_texts() if any(v in t for v in values.values())]
    assert not [t for t in printed if any(v in t for v in values.values())]


@pytest.mark.slow
def test_secrets_on_a_recovering_aws_run_are_read_by_each_machine(request, capsys, gpurun_home: Path) -> None:
    """Recovery on AWS (an Auto Scaling group, machines that bootstrap themselves): an ssm: reference is
    read by every new machine through its role; a value from this computer's environment is refused,
    since a replacement machine could never get it."""
    import boto3

    from tests.test_recovery_aws_e2e import _group, _log, _spec
    from tests.test_recovery_aws_e2e import cli as recovery_cli

    world = request.getfixturevalue("recovery_world")
    emulator = request.getfixturevalue("boot_emulator")
    value = canary("recovery")
    boto3.client("ssm", endpoint_url=world["endpoint"], region_name="us-east-1").put_parameter(
        Name="/rec/token", Value=value, Type="SecureString", Overwrite=True
    )
    (world["code"] / "job.py").write_text(JOB.replace("time.sleep(300)", "time.sleep(0)"))
    spec = _spec(world, "unused", "{max_restarts: 1}")
    spec.write_text(spec.read_text().replace("train.py unused", "job.py HF_TOKEN") + "secrets: [HF_TOKEN]\n")
    code, out, err = recovery_cli(capsys, "launch", str(spec), "--dry-run")
    assert code == 2 and "secrets.HF_TOKEN" in err and "ssm:" in err, err

    spec.write_text(spec.read_text().replace("secrets: [HF_TOKEN]", "secrets: {HF_TOKEN: 'ssm:/rec/token'}"))
    printed: list[str] = []
    code, out, err = recovery_cli(capsys, "launch", str(spec), "--json")
    printed += [out, err]
    assert code == 0, err
    run = json.loads(out)["run"]
    [machine] = emulator.live()
    wait_until(lambda: f"HF_TOKEN {sha(value)}" in _log(emulator, machine, run), timeout=60, what="the job's hash")
    run_dir = emulator.run_dir(machine, run)
    assert stat.S_IMODE((run_dir / "secrets.env").stat().st_mode) == 0o600
    wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=60, what="the group scaled to 0")
    code, out, err = recovery_cli(capsys, "teardown", run, "--yes", "--json")
    printed += [out, err]
    assert code == 0, err
    s3 = boto3.client("s3", endpoint_url=world["endpoint"], region_name="us-east-1")
    for item in s3.list_objects_v2(Bucket=world["bucket"]).get("Contents", []):
        body = s3.get_object(Bucket=world["bucket"], Key=item["Key"])["Body"].read()
        assert value.encode() not in body, item["Key"]
    assert files_holding([gpurun_home], [value]) == []
    assert not [text for text in printed if value in text]
