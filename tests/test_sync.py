"""Code sync over the loopback sshd and locally: the tree arrives exactly, re-syncs send only what changed."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from gpurun.errors import TransportError
from gpurun.sync.ignore import IgnoreRules
from gpurun.sync.push import sync_tree
from gpurun.transport.local import LocalTransport
from gpurun.transport.ssh import SshTransport


def make_tree(root: Path, files: int, rng: random.Random) -> None:
    for index in range(files):
        path = root / f"pkg{index % 7}" / f"sub{index % 3}" / f"m{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(0, 4000)))
    (root / ".gitignore").write_text("*.log\nbuild/\n!keep.log\n")
    (root / "pkg0/.gitignore").write_text("secret.txt\n")
    (root / "pkg0/secret.txt").write_text("never sent")
    (root / "x.log").write_text("ignored")
    (root / "keep.log").write_text("kept by negation")
    (root / "build").mkdir()
    (root / "build/out.o").write_text("ignored dir")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)


def digest(root: Path, relative: list[str]) -> dict[str, tuple[str, int]]:
    return {
        path: (hashlib.sha256((root / path).read_bytes()).hexdigest(), (root / path).stat().st_mode & 0o777)
        for path in relative
    }


def files_in(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


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


def test_tree_arrives_exactly_and_resyncs_send_only_changes(transport, tmp_path: Path) -> None:
    rng = random.Random(7)
    source, target = tmp_path / "src", tmp_path / "dst"
    make_tree(source, 300, rng)
    manifest = str(tmp_path / "sync.manifest")
    expected = sorted(f.path for f in IgnoreRules(source).walk())
    assert "pkg0/secret.txt" not in expected and "x.log" not in expected and "keep.log" in expected

    first = sync_tree(transport, source, str(target), manifest)
    assert first.files_sent == len(expected)
    assert files_in(target) == set(expected)
    assert digest(target, expected) == digest(source, expected), "content and modes match on both sides"

    again = sync_tree(transport, source, str(target), manifest)
    assert (again.files_sent, again.bytes_sent, again.deleted) == (0, 0, 0)

    for step in range(5):
        current = sorted(f.path for f in IgnoreRules(source).walk() if f.path.endswith(".py"))
        changed = rng.sample(current, 3)
        for path in changed:
            (source / path).write_bytes(rng.randbytes(500 + step))
            os.utime(source / path, ns=(time.time_ns(), time.time_ns() + step + 1))
        removed = rng.sample([p for p in current if p not in changed], 2)
        for path in removed:
            (source / path).unlink()
        (source / f"new{step}").mkdir()
        (source / f"new{step}/f.py").write_text(str(step))
        result = sync_tree(transport, source, str(target), manifest)
        assert result.files_sent == 4 and result.deleted == 2
        assert result.bytes_sent == 3 * (500 + step) + len(str(step)), "only the changed bytes go"
        expected = sorted(f.path for f in IgnoreRules(source).walk())
        assert files_in(target) == set(expected)
        assert digest(target, expected) == digest(source, expected)


def test_a_dropped_connection_mid_sync_then_a_retry_ends_with_the_same_tree(sshd, tmp_path: Path) -> None:
    rng = random.Random(3)
    source, target = tmp_path / "src", tmp_path / "dst"
    for index in range(40):
        (source / f"d{index % 4}").mkdir(parents=True, exist_ok=True)
        (source / f"d{index % 4}/blob{index}.bin").write_bytes(rng.randbytes(1_000_000))
    manifest = str(tmp_path / "sync.manifest")
    transport = SshTransport(
        sshd.host,
        port=sshd.port,
        user=sshd.user,
        key_filename=sshd.key_path,
        pinned_keys=[sshd.host_key_line],
        reconnect_retry_for=10.0,
    )
    seen = []

    def drop_when_streaming(_files: int, sent: int) -> None:
        if sent > 5_000_000 and not seen:
            seen.append(sent)
            threading.Thread(target=sshd.drop_connections, daemon=True).start()

    with pytest.raises(TransportError, match="lost"):
        sync_tree(transport, source, str(target), manifest, progress=drop_when_streaming)
    result = sync_tree(transport, source, str(target), manifest)
    expected = sorted(str(p.relative_to(source)) for p in source.rglob("*.bin"))
    assert result.files_sent == len(expected), "the cut-short sync is redone in full"
    assert digest(target, expected) == digest(source, expected)
    transport.close()
