"""Two gpurun processes on one state directory: launching, tearing down and reading status at once.

Each worker is a real child process that runs gpurun's CLI over and over
(in-process calls of `gpurun.cli.main`, so a few seconds hold many
operations): launch a local run, list every run, tear one of its own down,
look at the other worker's runs. Then both tear down everything at once.
Afterwards every record file is valid JSON with a consistent state, no launched
run lost its record, and no job or agent is left running. A truncated or
corrupt record is reported by name while the other runs still list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpurun import paths, runs
from gpurun.cli import main
from tests.helpers import REPO, gpurun, live_processes, process_alive, wait_until

WORKER = r"""
import contextlib, io, json, os, random, sys, time
from gpurun.cli import main

spec, seconds, report, tag, barrier = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def call(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
    return code, out.getvalue(), err.getvalue()

log, launched, live, torn = [], [], [], []
random.seed(tag)
deadline = time.monotonic() + seconds
step = 0
while time.monotonic() < deadline:
    step += 1
    code, out, err = call("launch", spec, "--json")
    log.append(["launch", code, err[-400:]])
    if code == 0:
        launched.append(json.loads(out)["run"])
        live.append(launched[-1])
    code, out, err = call("status", "--json")
    log.append(["status", code, err[-400:]])
    listed = [r["run"] for r in json.loads(out)] if code == 0 else []
    others = [name for name in listed if name not in launched]
    if others:
        code, out, err = call("status", random.choice(others), "--json")
        log.append(["status-other", code, err[-400:]])
    if live and (len(live) > 2 or step % 2 == 0):
        extra = ["--no-final-sync"] if step % 3 == 0 else []
        code, out, err = call("teardown", live.pop(0), "--yes", "--json", *extra)
        log.append(["teardown", code, err[-400:]])
        if code == 0:
            torn.append(json.loads(out)["runs"][0]["run"])

# Both workers then tear everything down at the same moment.
open(f"{barrier}.{tag}", "w").close()
while len([n for n in os.listdir(os.path.dirname(barrier)) if n.startswith(os.path.basename(barrier) + ".")]) < 2:
    time.sleep(0.02)
code, out, err = call("teardown", "--all", "--yes", "--json")
log.append(["teardown-all", code, err[-400:]])
final = [r["run"] for r in json.loads(out)["runs"]] if code == 0 else []
with open(report, "w") as handle:
    json.dump({"launched": launched, "torn": torn, "final": final, "log": log}, handle)
"""

REQUIRED = {"run", "provider", "state", "created_at", "store", "machines"}


def _pids(record: dict) -> list[int]:
    pids = []
    for machine in record.get("machines", []):
        pids += [int(machine[key]) for key in ("job_pid", "agent_pid") if machine.get(key)]
    return pids


@pytest.mark.slow
def test_two_processes_launch_teardown_and_read_status_at_once(tmp_path, gpurun_home):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('hi')\n")
    spec = tmp_path / "busy.yaml"
    # Short jobs: status flips records to succeeded while the other process tears them down.
    spec.write_text("name: busy\nworkdir: code\nrun: sleep 0.$((RANDOM % 8))\ncheckpoint: {every: 1h, resume: never}\n")
    barrier = tmp_path / "barrier"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(spec), "4", str(tmp_path / f"report-{tag}.json"), tag, str(barrier)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for tag in ("a", "b")
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, output.decode()[-3000:]
    reports = [json.loads((tmp_path / f"report-{tag}.json").read_text()) for tag in ("a", "b")]
    launched = [name for report in reports for name in report["launched"]]
    failures = [entry for report in reports for entry in report["log"] if entry[1] != 0]
    assert failures == [], failures
    operations = sum(len(report["log"]) for report in reports)
    assert len(launched) >= 4 and operations >= 16, (len(launched), operations)
    assert len(set(launched)) == len(launched)
    torn = {name for report in reports for name in report["torn"]}
    again = torn & {name for report in reports for name in report["final"]}
    assert not again, f"runs torn down earlier were no longer ended (a stale write undid it): {sorted(again)}"

    runs_dir = gpurun_home / "runs"
    leftovers = [p.name for p in runs_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], "a half-written record was left behind"
    files = sorted(runs_dir.glob("*.json"))
    assert sorted(p.stem for p in files) == sorted(launched), "a launched run lost its record (or one appeared)"
    pids = []
    for path in files:
        record = json.loads(path.read_text())
        assert set(record) >= REQUIRED, path
        assert record["run"] == path.stem
        assert record["state"] == "ended", (path.stem, record["state"])
        assert record.get("ended_at"), path.stem
        assert all(machine.get("cleaned") for machine in record["machines"]), path.stem
        assert not (paths.local_runs_dir() / record["run"]).exists()
        pids += _pids(record)
    assert pids
    wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=15, what="every job and agent to end")
    done = gpurun("status", "--json")
    assert sorted(r["run"] for r in json.loads(done.stdout)) == sorted(launched)
    assert done.stderr == ""


@pytest.mark.slow
def test_the_same_name_launched_twice_at_once_makes_one_run(tmp_path, gpurun_home):
    (tmp_path / "code").mkdir()
    spec = tmp_path / "same.yaml"
    spec.write_text("name: same\nworkdir: code\nrun: sleep 30\ncheckpoint: {every: 1h, resume: never}\n")
    command = [sys.executable, "-m", "gpurun", "launch", str(spec), "--json", "--name"]
    for round_ in range(3):
        name = f"same-{round_}"
        both = [
            subprocess.Popen(
                [*command, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
            )
            for _ in range(2)
        ]
        results = [(p.wait(timeout=60), *p.communicate()) for p in both]
        codes = sorted(code for code, _out, _err in results)
        assert codes == [0, 2], results
        winner = next(json.loads(out) for code, out, _err in results if code == 0)
        loser_err = next(err for code, _out, err in results if code == 2)
        assert "exists" in loser_err and loser_err.count("\n") == 1
        record = runs.load(name)
        assert record["state"] == "running" and record["created_at"] == winner["created_at"]
        job_pid = int((paths.local_runs_dir() / name / "job.pid").read_text())
        assert process_alive(job_pid)
        assert job_pid == record["machines"][0]["job_pid"], "the record must describe the job that runs"
        gpurun("teardown", name, "--yes", "--no-final-sync")
        wait_until(lambda pid=job_pid: not process_alive(pid), timeout=10, what="the job to end")
    # No second job kept running behind the record's back.
    stray = [pid for pid in _sleepers("sleep 30") if process_alive(pid)]
    assert stray == []


def _sleepers(command: str) -> list[int]:
    home = f"GPURUN_HOME={os.environ['GPURUN_HOME']}".encode()
    return live_processes(lambda cmdline, environ: command.encode() in cmdline and home in environ)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


BROKEN = {
    "zz-truncated": None,  # the first half of a real record
    "zz-empty": b"",
    "zz-list": b"[1, 2]",
    "zz-missing": b'{"run": "zz-missing"}',
    "zz-wrong-run": b'{"run": "someone-else", "provider": "local", "state": "running"}',
    "zz-binary": b"\xff\xfe\x00garbage",
}


def test_a_corrupt_record_is_named_while_the_others_still_list(tmp_path, gpurun_home, capsys):
    (tmp_path / "code").mkdir()
    spec = tmp_path / "ok.yaml"
    spec.write_text("name: ok\nworkdir: code\nrun: sleep 30\ncheckpoint: {every: 1h, resume: never}\n")
    launched = []
    for _ in range(2):
        code, out, err = _cli(capsys, "launch", str(spec), "--json")
        assert code == 0, err
        launched.append(json.loads(out)["run"])
    good = (gpurun_home / "runs" / f"{launched[0]}.json").read_bytes()
    contents = {name: good[: len(good) // 2] if data is None else data for name, data in BROKEN.items()}
    for name, data in contents.items():
        (gpurun_home / "runs" / f"{name}.json").write_bytes(data)

    for json_flag in (["--json"], []):
        code, out, err = _cli(capsys, "status", *json_flag)
        assert code == 0, err
        if json_flag:
            assert sorted(r["run"] for r in json.loads(out)) == sorted(launched)
        else:
            assert all(name in out for name in launched) and not any(name in out for name in BROKEN)
        warnings = err.splitlines()
        assert len(warnings) == len(BROKEN) and all(line.startswith("warning: run record ") for line in warnings)
        for name in BROKEN:
            assert sum(f"{name}.json" in line for line in warnings) == 1, (name, err)

    for name in BROKEN:
        code, out, err = _cli(capsys, "status", name)
        assert code == 1 and f"{name}.json" in err and err.count("\n") == 1 and "Traceback" not in err, err

    code, out, err = _cli(capsys, "teardown", "--all", "--yes", "--no-final-sync", "--json")
    assert code == 0, err
    assert sorted(r["run"] for r in json.loads(out)["runs"]) == sorted(launched)
    for name in launched:
        assert runs.load(name)["state"] == "ended"
    for name, data in contents.items():
        assert (gpurun_home / "runs" / f"{name}.json").read_bytes() == data, "a broken record is left as it was"
