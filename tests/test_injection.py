"""Hostile values never reach a shell as code: env values, paths and names arrive byte for byte.

Every value below would run `touch PWNED` (or write a file called PWNED) if
gpurun pasted it into a shell command unquoted. The experiments are launched
for real: with the local provider (the state directory, the synced code and
the checkpoint directory all have hostile names) and over the ssh provider
against the loopback sshd. The job writes its environment and working
directory to a file; the test compares every value and then looks for PWNED
everywhere a shell could have run: the test's tree, the state directory, the
sshd login's home and this process's working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from gpurun import paths
from gpurun.cli import main
from tests.helpers import REPO, gpurun, gpurun_json, process_alive, wait_until

# name -> value; each one is an attack on a different shell construct.
HOSTILE = {
    "SUBST": "$(touch PWNED)",
    "SUBST_ABS": "$(touch {canary}/PWNED-subst)",
    "DQ_BREAK": '"; touch PWNED; "',
    "SQ_BREAK": "'; touch PWNED; '",
    "SQ_DQ_MIX": "x' \"$(touch PWNED)\" 'y",
    "BACKTICK": "`touch PWNED`",
    "NEWLINES": "first\ntouch PWNED\nlast",
    "CRLF": "a\r\ntouch PWNED\r\n",
    "IFS_TRICK": "${IFS}touch${IFS}PWNED",
    "ESCAPED": "\\$(touch PWNED)\\",
    "TRAILING_BACKSLASH": "ends with \\",
    "SEMICOLON_COMMENT": "; touch PWNED #",
    "PIPE": "| touch PWNED",
    "AMPERSAND": "& touch PWNED &",
    "REDIRECT": "> PWNED",
    "GLOB": "* ? [a-z]",
    "TILDE_VAR": "~ $HOME ${PATH}",
    "HISTORY": "!! !-1",
    "DASHES": "-n -e --",
    "PERCENT": "%s %n %%",
    "EMPTY": "",
    "SPACES": "  two  spaces  ",
    "UNICODE": "ünïcödé ✓ 日本",
    "BRACES": "{a,b} $((1+1)) $[1+1]",
    "HEREDOC": "<<EOF\ntouch PWNED\nEOF",
    "LONG": "x" * 5000 + "$(touch PWNED)",
}
# Through `--set env.NAME=VALUE` on the command line instead of the file.
SET_ON_COMMAND_LINE = {"FROM_SET": "$(touch PWNED) `touch PWNED` '\"; touch PWNED"}
HOSTILE_PATH = "dir $(touch PWNED) 'q' \"dq\" `touch PWNED` ;&|"
HOSTILE_CHECKPOINT_DIR = "my ckpts/$(touch PWNED) 'it''s'"

JOB = """\
import json, os, sys
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
with open(os.path.join(ckpt, "weights $(touch PWNED).txt"), "w") as handle:
    handle.write("w")
with open("env.json", "w") as handle:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}, handle)
print("job env written", flush=True)
"""

HOSTILE_NAMES = [
    "$(touch PWNED)",
    "a;touch PWNED",
    "`touch PWNED`",
    "x' 'y",
    "../../etc",
    "a/b",
    "-rf",
    "a b",
    "name\ntouch PWNED",
    "x" * 200,
    "",
]


def _values(canary: Path) -> dict[str, str]:
    return {name: value.replace("{canary}", str(canary)) for name, value in HOSTILE.items()}


def _experiment(tmp_path: Path, canary: Path, **extra) -> tuple[Path, Path]:
    """A spec whose workdir has a hostile name; returns (spec file, workdir)."""
    code = tmp_path / HOSTILE_PATH
    code.mkdir()
    (code / "job.py").write_text(JOB)
    (code / "file $(touch PWNED).txt").write_text("synced\n")
    data = {
        "name": "hostile",
        "workdir": HOSTILE_PATH,
        "env": _values(canary),
        "setup": "echo setup ran",
        # `run` is shell by design; its argument is quoted the way a user would.
        "run": f"{sys.executable} job.py 'arg $(touch PWNED)'",
        "checkpoint": {"dir": HOSTILE_CHECKPOINT_DIR, "every": "1h", "keep": 2, "resume": "never"},
        **extra,
    }
    spec = tmp_path / "hostile.yaml"
    spec.write_text(yaml.safe_dump(data, allow_unicode=True))
    return spec, code


def _pwned(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        if not root.exists():
            continue
        found += [str(p) for p in root.rglob("PWNED*")]
    found += [str(p) for p in REPO.glob("PWNED*")]
    found += [str(p) for p in Path.cwd().glob("PWNED*")]
    return found


def _set_args() -> list[str]:
    return [arg for name, value in SET_ON_COMMAND_LINE.items() for arg in ("--set", f"env.{name}={value}")]


def _check_job_saw(env_file: Path, canary: Path, work: str) -> None:
    seen = json.loads(env_file.read_text())
    expected = {**_values(canary), **SET_ON_COMMAND_LINE}
    wrong = {name: seen["env"].get(name) for name, value in expected.items() if seen["env"].get(name) != value}
    assert not wrong, f"values changed on the way to the job: {wrong}"
    assert seen["cwd"] == work
    assert seen["env"]["GPURUN_CHECKPOINT_DIR"] == f"{work}/{HOSTILE_CHECKPOINT_DIR}"
    assert seen["argv"] == ["arg $(touch PWNED)"]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "canary"
    path.mkdir()
    return path


@pytest.mark.slow
def test_hostile_values_arrive_verbatim_with_the_local_provider(tmp_path, canary, monkeypatch):
    state = tmp_path / f"state {HOSTILE_PATH}"
    monkeypatch.setenv("GPURUN_HOME", str(state))
    monkeypatch.chdir(tmp_path)
    spec, _code = _experiment(tmp_path, canary)

    launched = gpurun_json("launch", str(spec), *_set_args())
    run = launched["run"]
    run_dir = paths.local_runs_dir() / run
    assert str(run_dir).startswith(str(state))
    work = f"{run_dir}/work"
    assert (Path(work) / "file $(touch PWNED).txt").read_text() == "synced\n"
    wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", timeout=30, what="the job to finish")
    _check_job_saw(Path(work) / "env.json", canary, work)

    log = gpurun("logs", run).stdout
    assert "setup ran" in log and "job env written" in log
    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["final_checkpoint"] and down["final_checkpoint"]["files"] == 1
    target = tmp_path / f"download {HOSTILE_PATH}"
    gpurun("checkpoint-sync", run, "--download", str(target))
    assert (target / "weights $(touch PWNED).txt").read_text() == "w"
    assert not run_dir.exists()
    assert _pwned(tmp_path, state) == []


@pytest.mark.slow
def test_hostile_values_arrive_verbatim_over_ssh(sshd, tmp_path, canary, monkeypatch):
    client = tmp_path / "client-home"
    (client / ".ssh").mkdir(parents=True, mode=0o700)
    config = client / ".ssh/config"
    config.write_text(
        f"Host testbox\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    (client / ".ssh/known_hosts").write_text(sshd.known_hosts_line + "\n")
    monkeypatch.setenv("HOME", str(client))
    monkeypatch.setenv("GPURUN_SSH_CONFIG", str(config))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    spec, _code = _experiment(tmp_path, canary, provider="ssh", ssh={"hosts": ["testbox"]})
    data = yaml.safe_load(spec.read_text())
    data["checkpoint"]["store"] = f"file://{store}"
    spec.write_text(yaml.safe_dump(data, allow_unicode=True))

    launched = gpurun_json("launch", str(spec), *_set_args())
    run = launched["run"]
    run_dir = sshd.home / "gpurun" / run
    work = f"{run_dir}/work"
    assert (Path(work) / "file $(touch PWNED).txt").read_text() == "synced\n"
    wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", timeout=30, what="the job to finish")
    _check_job_saw(Path(work) / "env.json", canary, work)
    job_pid = int((run_dir / "job.pid").read_text())
    assert "job env written" in gpurun("logs", run).stdout

    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["final_checkpoint"] and down["final_checkpoint"]["files"] == 1
    assert not run_dir.exists()
    wait_until(lambda: not process_alive(job_pid), timeout=10, what="the job to be gone")
    assert _pwned(tmp_path, sshd.home, Path(os.environ["GPURUN_HOME"])) == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_run_names_are_rejected_everywhere(name, tmp_path, gpurun_home, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    spec = tmp_path / "ok.yaml"
    spec.write_text("name: fine\nworkdir: code\nrun: echo hi\n")
    commands = [
        ["launch", str(spec), "--name", name],
        ["launch", str(spec), "--resume", name],
        ["status", name],
        ["logs", name],
        ["teardown", name, "--yes"],
        ["checkpoint-sync", name],
        ["checkpoint-sync", name, "--list"],
        ["ssh", name, "--", "true"],
    ]
    for argv in commands:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        out, err = capsys.readouterr()
        assert exited.value.code == 2, (argv, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err
    records = list((gpurun_home / "runs").glob("*.json")) if (gpurun_home / "runs").exists() else []
    assert records == []
    assert not (gpurun_home / "local").exists() or not any((gpurun_home / "local").iterdir())
    assert _pwned(tmp_path, gpurun_home) == []


def test_hostile_name_in_a_real_process_and_in_the_spec(tmp_path, gpurun_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    spec = tmp_path / "ok.yaml"
    spec.write_text("name: fine\nworkdir: code\nrun: echo hi\n")
    done = gpurun("launch", str(spec), "--name", "$(touch PWNED)", check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: --name") and "Traceback" not in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x; touch PWNED", "workdir": "code", "run": "echo hi"}))
    done = gpurun("launch", str(bad), check=False)
    assert done.returncode == 2 and "name" in done.stderr and done.stderr.count("\n") == 1
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("*.json"))
    assert _pwned(tmp_path, gpurun_home) == []
