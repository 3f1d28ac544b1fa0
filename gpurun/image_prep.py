"""Runs ON THE MACHINE (stdlib only, Python 3.8+): hide what must never be in an image, then put it back.

`gpurun image create` sends this file and runs it twice around CreateImage:

    python3 image_prep.py stash PLAN_JSON     pause the job and the agent (SIGSTOP), move the run's
                                              files, shell history and extra files into a fresh
                                              directory on a tmpfs, strip the run's key from
                                              ~/.ssh/authorized_keys, sync the disk; prints JSON
    python3 - restore STASH                   put everything back, continue the job and agent;
                                              prints JSON saying who restored ("request" or "watchdog")

A watchdog started by `stash` restores by itself after `deadline` seconds, so a
laptop that vanishes between the two calls never leaves the job paused or its
files hidden; the caller then learns that the watchdog came first and discards
the image. Files that a process holds open (job.log) keep their inode: their
content is copied out and the file truncated, then written back. Directories
stay in place (empty) so the job's working directory remains valid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

TMPFS_CANDIDATES = ("/dev/shm", "/run/user/{uid}")
WATCHDOG_ANSWER_KEPT = 600
#: Bytes of a plan, a stash manifest or a restore answer: far above what gpurun writes.
DOCUMENT_LIMIT = 16 * 1024 * 1024
DOCUMENT_DEPTH = 8

# The schemas of what this script reads: the plan the laptop sends, and the manifest and answer it
# wrote into the stash itself. This is a local copy of gpurun.store.documents' strictness (a size
# limit, a depth limit, strict types, a bool is never a number) rather than an import of it, because
# this file runs on the machine as a lone script under the system python3: gpurun is not there.


class _ListOf:
    """A JSON array whose every item fits `item` (a type, a tuple of types, or a list: a fixed-length row)."""

    def __init__(self, item: Any) -> None:
        self.item = item


_STRINGS = _ListOf(str)
_PLAN = {
    "run_dir": str,
    "paths": _STRINGS,
    "pid_files": _STRINGS,
    "secret_words": _STRINGS,
    "authorized_keys": _STRINGS,
    "key_blobs": _STRINGS,
    "deadline": (int, float),
}
_PLAN_REQUIRED = ("run_dir", "deadline")
_MANIFEST = {
    "run_dir": str,
    "pids": _ListOf(int),
    "moved": _ListOf([str, str]),
    "truncated": _ListOf([str, str]),
    "keys": _ListOf([str, str, int]),
}
_ANSWER = {"by": str, "problems": _STRINGS}


class BadDocument(Exception):
    """A plan, manifest or answer that is not what this script writes; the message names it."""


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, _ListOf):
        return isinstance(value, list) and all(_fits(item, kind.item) for item in value)
    if isinstance(kind, list):
        return isinstance(value, list) and len(value) == len(kind) and all(map(_fits, value, kind))
    return isinstance(value, kind) and not isinstance(value, bool)


def strict_document(text: str | bytes, schema: dict[str, Any], required: tuple[str, ...], what: str) -> dict[str, Any]:
    """`text` parsed, once it is a JSON object of at most DOCUMENT_LIMIT bytes whose fields fit `schema`."""
    if len(text) > DOCUMENT_LIMIT:
        raise BadDocument(f"{what} is larger than {DOCUMENT_LIMIT} bytes")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadDocument(f"{what} is nested too deep") from None
    except ValueError:
        raise BadDocument(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadDocument(f"{what} is not a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > DOCUMENT_DEPTH:
            raise BadDocument(f"{what} is nested deeper than {DOCUMENT_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    for key in required:
        if key not in value:
            raise BadDocument(f"{what} lacks {key}")
    for key, kind in schema.items():
        if key in value and not _fits(value[key], kind):
            raise BadDocument(f"{what}: {key} has the wrong type")
    return value


def _read_document(path: str, schema: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return strict_document(handle.read(DOCUMENT_LIMIT + 1), schema, required, path)


def _open_inodes() -> set[tuple[int, int]]:
    """(dev, inode) of every file any process we may look at holds open, and of their working directories."""
    held: set[tuple[int, int]] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        base = f"/proc/{pid}"
        try:
            names = [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")] + [f"{base}/cwd"]
        except OSError:
            continue
        for name in names:
            try:
                info = os.stat(name)
            except OSError:
                continue
            held.add((info.st_dev, info.st_ino))
    return held


def _size_of(paths: list[str]) -> int:
    total = 0
    for top in paths:
        if os.path.isfile(top) and not os.path.islink(top):
            total += os.path.getsize(top)
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    return total


def _stash_root(needed: int) -> str:
    for pattern in TMPFS_CANDIDATES:
        root = pattern.format(uid=os.getuid())
        if not os.path.isdir(root) or not os.access(root, os.W_OK):
            continue
        stats = os.statvfs(root)
        if stats.f_bavail * stats.f_frsize >= needed * 1.2 + 1024 * 1024:
            return root
    raise SystemExit(
        json.dumps(
            {"error": f"the run's files ({needed} bytes) do not fit in a tmpfs here ({', '.join(TMPFS_CANDIDATES)})"}
        )
    )


def _signal_groups(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.killpg(int(pid), sig)
        except (OSError, ValueError):
            pass


def _zero(path: str) -> None:
    """Overwrite a secret's bytes before its name goes, so freed blocks do not carry it into the image."""
    try:
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        pass


def stash(plan: dict[str, Any]) -> dict[str, Any]:
    run_dir = plan["run_dir"]
    extra = [path for path in plan.get("paths", []) if os.path.lexists(path)]
    needed = _size_of([run_dir, *extra])
    stash_dir = tempfile.mkdtemp(prefix="gpurun-image-", dir=_stash_root(needed))
    shutil.copyfile(os.path.abspath(__file__), os.path.join(stash_dir, "image_prep.py"))
    pids = []
    for pid_file in plan.get("pid_files", []):
        try:
            with open(pid_file) as handle:
                pids.append(int(handle.read().strip()))
        except (OSError, ValueError):
            pass
    manifest = {"run_dir": run_dir, "pids": pids, "moved": [], "truncated": [], "keys": []}
    _signal_groups(manifest["pids"], signal.SIGSTOP)
    secret_words = tuple(plan.get("secret_words", ["secret"]))
    try:
        held = _open_inodes()
        sources = []
        if os.path.isdir(run_dir) and not os.path.islink(run_dir):
            for root, _dirs, files in os.walk(run_dir):
                sources += [os.path.join(root, name) for name in files]
        sources += extra
        for index, path in enumerate(sources, 1):
            target = os.path.join(stash_dir, f"{index:06d}")
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) in held and os.path.isfile(path) and not os.path.islink(path):
                shutil.copyfile(path, target)
                with open(path, "r+b") as handle:
                    handle.truncate(0)
                manifest["truncated"].append([path, target])
            else:
                if any(word in os.path.basename(path).lower() for word in secret_words) and not os.path.islink(path):
                    shutil.copy2(path, target)
                    _zero(path)
                    os.unlink(path)
                else:
                    shutil.move(path, target)
                manifest["moved"].append([path, target])
        for keys_file in plan.get("authorized_keys", []):
            blobs = [blob for blob in plan.get("key_blobs", []) if blob]
            if not blobs or not os.path.isfile(keys_file):
                continue
            with open(keys_file, "rb") as handle:
                original = handle.read()
            kept = [line for line in original.splitlines(True) if not any(b.encode() in line for b in blobs)]
            if len(kept) == len(original.splitlines(True)):
                continue
            target = os.path.join(stash_dir, f"keys-{len(manifest['keys'])}")
            with open(target, "wb") as handle:
                handle.write(original)
            with open(keys_file, "r+b") as handle:  # the same inode: its mode and owner stay
                handle.truncate(0)
                handle.write(b"".join(kept))
            manifest["keys"].append([keys_file, target, len(original.splitlines(True)) - len(kept)])
        _write_manifest(stash_dir, manifest)
        os.sync()
    except BaseException:
        _write_manifest(stash_dir, manifest)
        restore(stash_dir, "failed stash")
        raise
    watchdog = subprocess.Popen(
        [sys.executable, os.path.join(stash_dir, "image_prep.py"), "watchdog", stash_dir, str(plan["deadline"])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )
    return {
        "stash": stash_dir,
        "moved": len(manifest["moved"]),
        "truncated": len(manifest["truncated"]),
        "keys_removed": sum(entry[2] for entry in manifest["keys"]),
        "bytes": needed,
        "watchdog": watchdog.pid,
    }


def _write_manifest(stash_dir: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(stash_dir, "manifest.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(manifest, handle)
    os.replace(path + ".tmp", path)


def restore(stash_dir: str, who: str) -> dict[str, Any]:
    done_file = os.path.join(stash_dir, "restored.json")
    if not os.path.isdir(stash_dir):
        return {"by": "watchdog", "problems": ["the files were put back earlier and the stash removed"]}
    try:
        os.close(os.open(os.path.join(stash_dir, "restoring"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        for _ in range(600):  # the other restorer is at work: wait for its answer
            if os.path.exists(done_file):
                return _read_document(done_file, _ANSWER, ("by",))
            time.sleep(0.1)
        return {"by": "unknown", "problems": ["another restore did not finish"]}
    manifest = _read_document(os.path.join(stash_dir, "manifest.json"), _MANIFEST, tuple(_MANIFEST))
    problems = []
    try:
        for path, source in manifest["moved"]:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if os.path.lexists(path):  # something new took the name: keep both
                    path = f"{path}.gpurun-image-{int(time.time())}"
                    problems.append(f"kept a newer file; ours is {path}")
                shutil.move(source, path)
            except OSError as error:
                problems.append(f"{path}: {error}")
        for path, source in manifest["truncated"]:
            try:
                with open(source, "rb") as saved, open(path, "r+b") as handle:
                    grown = handle.read()
                    handle.seek(0)
                    handle.truncate(0)
                    shutil.copyfileobj(saved, handle)
                    handle.write(grown)
            except OSError as error:
                problems.append(f"{path}: {error}")
        for keys_file, source, _count in manifest["keys"]:
            try:
                with open(source, "rb") as saved:
                    original = saved.read()
                with open(keys_file, "r+b") as handle:
                    now = handle.read()
                    missing = [line for line in original.splitlines(True) if line not in now.splitlines(True)]
                    handle.seek(0, os.SEEK_END)
                    if missing and now and not now.endswith(b"\n"):
                        handle.write(b"\n")
                    handle.write(b"".join(missing))
            except OSError as error:
                problems.append(f"{keys_file}: {error}")
    finally:
        _signal_groups(manifest["pids"], signal.SIGCONT)
    answer = {"by": who, "problems": problems}
    for name in os.listdir(stash_dir):
        if name not in ("restored.json", "restoring"):
            full = os.path.join(stash_dir, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
    with open(done_file + ".tmp", "w") as handle:
        json.dump(answer, handle)
    os.replace(done_file + ".tmp", done_file)
    return answer


def main(argv: list[str]) -> int:
    command = argv[1]
    if command == "stash":
        # A dropped connection must not cut the stash short: its watchdog starts only at the end.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            plan = strict_document(argv[2], _PLAN, _PLAN_REQUIRED, "the plan")
        except BadDocument as error:
            print(json.dumps({"error": str(error)}), flush=True)
            return 2
        stashed = stash(plan)
        try:
            print(json.dumps(stashed), flush=True)
        except OSError:
            pass  # nobody listens any more: the watchdog puts everything back
        return 0
    if command == "restore":
        try:
            answer = restore(argv[2], "request")
        except BadDocument as error:
            print(json.dumps({"error": str(error)}), flush=True)
            return 2
        print(json.dumps(answer), flush=True)
        shutil.rmtree(argv[2], ignore_errors=True)
        return 0
    if command == "watchdog":
        deadline = time.monotonic() + float(argv[3])
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if not os.path.isdir(argv[2]):
                return 0
        if os.path.isdir(argv[2]) and not os.path.exists(os.path.join(argv[2], "restoring")):
            restore(argv[2], "watchdog")
            # Keep the answer a while for a late caller (it learns the watchdog came first), then tidy up.
            until = time.monotonic() + WATCHDOG_ANSWER_KEPT
            while time.monotonic() < until and os.path.isdir(argv[2]):
                time.sleep(1.0)
            shutil.rmtree(argv[2], ignore_errors=True)
        return 0
    print(json.dumps({"error": f"unknown command {command}"}))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
