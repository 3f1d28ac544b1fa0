"""Run names: resume picks --name runs too, an ended run's name can be used again, forget, status --all."""

from __future__ import annotations

from pathlib import Path

from gpurun import runs
from tests.helpers import gpurun, gpurun_json, wait_until, write_spec

TRAIN = """\
import os, pathlib
ckpt = pathlib.Path(os.environ["GPURUN_CHECKPOINT_DIR"])
ckpt.mkdir(parents=True, exist_ok=True)
(ckpt / "state.txt").write_text("saved by " + os.environ["GPURUN_RUN"])
print("resume from", os.environ.get("GPURUN_RESUME_FROM"))
"""


def finished(run: str) -> dict:
    return wait_until(
        lambda: (s := gpurun_json("status", run)[0])["state"] in ("succeeded", "failed") and s, what=f"{run} to end"
    )


def test_resume_auto_picks_a_named_run_and_the_name_is_free_again_after_teardown(
    tmp_path: Path, gpurun_home: Path
) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text(TRAIN)
    spec = write_spec(
        tmp_path,
        "name: named\nworkdir: code\nrun: python train.py\ncheckpoint: {dir: ckpt, every: 1h, resume: auto}\n",
    )
    gpurun_json("launch", str(spec), "--name", "my-experiment")
    finished("my-experiment")
    busy = gpurun("launch", str(spec), "--name", "my-experiment", check=False)
    assert busy.returncode == 2 and "a run by that name exists" in busy.stderr
    gpurun("teardown", "my-experiment", "--yes")

    plan = gpurun_json("launch", str(spec), "--dry-run")["plan"]
    resume = next(row["value"] for row in plan if row["item"] == "resume")
    assert resume.startswith("from my-experiment snapshot"), "a --name run of this spec is resumed from"

    again = gpurun_json("launch", str(spec), "--name", "my-experiment")
    assert again["run"] == "my-experiment" and [job["number"] for job in again["jobs"]] == [2]
    archived = list(runs.archive_dir().glob("my-experiment.*.json"))
    assert len(archived) == 1, "the ended run's record is archived, not lost"
    assert "resume from /" in gpurun("logs", "my-experiment", "-f").stdout
    gpurun("teardown", "my-experiment", "--yes")
    assert gpurun("logs", "my-experiment", "--job", "2").stdout.startswith("[gpurun] run: python train.py")


def test_forget_drops_only_ended_runs(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(tmp_path, "name: f\nworkdir: code\nrun: sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    live = gpurun("forget", run, check=False)
    assert live.returncode == 2 and "not ended" in live.stderr
    gpurun("teardown", run, "--yes", "--no-final-sync")
    gpurun("forget", run)
    assert run not in gpurun("status").stdout
    assert gpurun("forget", run, check=False).returncode == 2


def test_status_shows_active_and_recent_runs_unless_all(gpurun_home: Path) -> None:
    def record(name: str, state: str, ended_at: str | None) -> None:
        runs.save(
            {
                "run": name,
                "provider": "ssh",
                "state": state,
                "created_at": "2026-01-01T00:00:00+00:00",
                "ended_at": ended_at,
                "store": "file:///nowhere",
                "machines": [],
            }
        )

    record("old-aaaaaa", "ended", "2026-01-02T00:00:00+00:00")
    record("fresh-bbbbbb", "ended", runs.now_iso())
    shown = gpurun("status")
    assert "fresh-bbbbbb" in shown.stdout and "old-aaaaaa" not in shown.stdout
    assert "1 run(s) that ended more than a day ago are not shown" in shown.stderr
    assert {r["run"] for r in gpurun_json("status", "--all")} == {"fresh-bbbbbb", "old-aaaaaa"}
    assert gpurun_json("status", "old-aaaaaa")[0]["run"] == "old-aaaaaa", "a named run is always shown"
