"""Trust boundaries of code sync: credential files stay home, links on the machine are not followed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpurun import paths
from gpurun.sync.ignore import IgnoreRules
from gpurun.sync.push import META_DIR, sync_tree
from gpurun.transport.local import LocalTransport
from gpurun.transport.ssh import SshTransport
from tests.helpers import gpurun, gpurun_json

CREDENTIALS = [".env", ".env.production", "certs/server.pem", "deploy.key", "id_ed25519", "id_rsa", ".netrc"]
CREDENTIAL_DIRS = [".aws", "tools/.ssh"]
ORDINARY = ["train.py", "id_utils.py", "keys.py", "env.py", "certs/README", "config/settings.yaml"]


def credential_tree(root: Path) -> None:
    for name in [*CREDENTIALS, *ORDINARY, "config/.env", ".aws/credentials", "tools/.ssh/config"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")
    # An ignore file that knows nothing of credentials: it replaces .gitignore entirely.
    (root / ".gpurunignore").write_text("*.log\n")
    (root / ".gitignore").write_text(".env\n*.pem\n")


def test_credential_files_are_held_back_even_with_a_gpurunignore(tmp_path: Path) -> None:
    credential_tree(tmp_path)
    rules = IgnoreRules(tmp_path)
    sent = {f.path for f in rules.walk()}
    assert sent == {*ORDINARY, ".gpurunignore", ".gitignore"}
    assert sorted(rules.held_back) == sorted([*CREDENTIALS, "config/.env", ".aws/", "tools/.ssh/"])

    rules = IgnoreRules(tmp_path, include=["config/.env", "id_rsa"])
    sent = {f.path for f in rules.walk()}
    assert {"config/.env", "id_rsa"} <= sent and ".env" not in sent
    assert "config/.env" not in rules.held_back and ".env" in rules.held_back


def test_launch_lists_held_back_files_and_sync_include_sends_one(tmp_path: Path) -> None:
    code = tmp_path / "code"
    credential_tree(code)
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        "name: heldback\nworkdir: code\nrun: sleep 60\nsync: {include: [config/.env]}\ncheckpoint: {resume: never}\n"
    )
    plan = gpurun_json("launch", str(spec), "--dry-run")
    [held] = [row["value"] for row in plan["plan"] if row["item"] == "held back"]
    for name in [*CREDENTIALS, ".aws/", "tools/.ssh/"]:
        assert name in held
    assert "config/.env" not in held

    done = gpurun("launch", str(spec), "--json")
    run = json.loads(done.stdout)["run"]
    try:
        assert "not syncing" in done.stderr and ".netrc" in done.stderr and "sync.include" in done.stderr
        work = paths.local_runs_dir() / run / "work"
        arrived = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()}
        assert "config/.env" in arrived and "train.py" in arrived and "id_utils.py" in arrived
        for name in [*CREDENTIALS, ".aws/credentials", "tools/.ssh/config"]:
            assert name not in arrived

        # The next job's sync (gpurun exec) holds them back and says so too.
        (code / "new.pem").write_text("a new key\n")
        (code / "extra.py").write_text("print('extra')\n")
        again = gpurun("exec", run, "--replace", "--", "sleep 60")
        assert "not syncing" in again.stderr and "new.pem" in again.stderr
        assert (work / "extra.py").exists() and not (work / "new.pem").exists()
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync")


@pytest.fixture(params=["local", "ssh"])
def transport(request, sshd):
    if request.param == "local":
        yield LocalTransport()
        return
    transport = SshTransport(
        sshd.host, port=sshd.port, user=sshd.user, key_filename=sshd.key_path, pinned_keys=[sshd.host_key_line]
    )
    yield transport
    transport.close()


def test_extraction_never_follows_a_link_it_did_not_create(transport, tmp_path: Path) -> None:
    source, target, outside = tmp_path / "src", tmp_path / "work", tmp_path / "outside"
    for name in ("sub/code.py", "deep/a/b/c.py", "top.py", "gone/old.py"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(f"synced {name}\n")
    for name in ("sub", "deep-a", "meta", "gone"):
        (outside / name).mkdir(parents=True)
    target.mkdir()
    (target / "deep").mkdir()
    # Links someone made on the machine, where sync will need directories.
    os.symlink(outside / "sub", target / "sub")
    os.symlink(outside / "deep-a", target / "deep" / "a")
    os.symlink(outside / "meta", target / META_DIR)
    manifest = str(tmp_path / "sync.manifest")

    sync_tree(transport, source, str(target), manifest)
    assert [p for p in outside.rglob("*") if p.is_file()] == [], "sync wrote through a link outside the work tree"
    for name in ("sub/code.py", "deep/a/b/c.py", "top.py"):
        assert (target / name).read_text() == f"synced {name}\n"
    assert not (target / "sub").is_symlink() and not (target / "deep" / "a").is_symlink()

    # A re-sync after the machine swapped a synced directory for a link: the same.
    (target / "sub" / "code.py").unlink()
    (target / "sub").rmdir()
    os.symlink(outside / "sub", target / "sub")
    (source / "sub" / "code.py").write_text("changed\n")
    os.utime(source / "sub" / "code.py", ns=(1, 1))
    result = sync_tree(transport, source, str(target), manifest)
    assert result.files_sent == 1
    assert [p for p in outside.rglob("*") if p.is_file()] == []
    assert (target / "sub" / "code.py").read_text() == "changed\n"

    # A file deleted here, below a directory the machine swapped for a link: nothing outside is removed.
    (target / "gone" / "old.py").unlink()
    (target / "gone").rmdir()
    os.symlink(outside / "gone", target / "gone")
    (outside / "gone" / "old.py").write_text("not gpurun's to delete\n")
    (source / "gone" / "old.py").unlink()
    (source / "gone").rmdir()
    result = sync_tree(transport, source, str(target), manifest)
    assert result.deleted == 1
    assert (outside / "gone" / "old.py").read_text() == "not gpurun's to delete\n"
    assert not (target / "gone").is_symlink()
