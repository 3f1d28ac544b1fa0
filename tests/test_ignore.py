"""Ignore rules against git itself: for every file of a tree, git ignores it <=> walk() leaves it out.

Each case builds a real tree, runs `git init`, and asks git (`git ls-files --others
--exclude-standard` and `git check-ignore`) which files it would add. gpurun's walk
and is_ignored must agree on every file.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from gpurun.sync.ignore import IgnoreRules

# git decides what is ignored here; a machine without it fails these tests rather than skipping them.


def _git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "git-home"
    home.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    # No global or system config: a core.excludesFile elsewhere must not change the answer.
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    return env


def build(root: Path, files: dict[str, str | bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def all_files(root: Path) -> set[str]:
    """Every file and symlink in the tree, .git aside."""
    found = set()
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git" and not os.path.islink(os.path.join(directory, d))]
        relative = os.path.relpath(directory, root)
        for name in names + [d for d in os.listdir(directory) if os.path.islink(os.path.join(directory, d))]:
            path = name if relative == "." else f"{relative}/{name}"
            if name != ".git":
                found.add(path.replace(os.sep, "/"))
    return found


def git_kept(root: Path, env: dict[str, str]) -> set[str]:
    """What `git add -A` would take: untracked files that are not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    ).stdout
    return {name for name in out.decode().split("\0") if name}


def git_check_ignore(root: Path, env: dict[str, str], paths: list[str]) -> set[str]:
    result = subprocess.run(
        ["git", "check-ignore", "-z", "--stdin"],
        cwd=root,
        env=env,
        input="\0".join(paths).encode() + b"\0",
        capture_output=True,
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    return {name for name in result.stdout.decode().split("\0") if name}


def compare_with_git(root: Path, tmp_path: Path, extra: tuple[str, ...] = ()) -> set[str]:
    env = _git_env(tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], env=env, check=True)
    files = all_files(root)
    kept_by_git = git_kept(root, env)
    ignored_by_git = git_check_ignore(root, env, sorted(files))
    # The two git answers agree with each other (a sanity check on the oracle).
    assert kept_by_git == files - ignored_by_git
    rules = IgnoreRules(root, extra)
    walked = {item.path for item in rules.walk()}
    # Credential files git would send are held back on purpose (tested on their own below).
    held = {path for path in kept_by_git if any(path == h or path.startswith(h) for h in rules.held_back)}
    kept_by_git = kept_by_git - held
    assert walked == kept_by_git, {
        "walk sends, git ignores": sorted(walked - kept_by_git),
        "git keeps, walk skips": sorted(kept_by_git - walked),
    }
    wrong = sorted(path for path in files if rules.is_ignored(path) != (path in ignored_by_git))
    assert not wrong, f"is_ignored disagrees with git check-ignore on {wrong}"
    return walked


BASIC_GITIGNORE = """\
# a comment, then the patterns of a typical project
*.log
!keep.log
build/
/top.txt
**/cache/**
docs/**/*.tmp
\\#hash.txt
\\!bang.txt
trailing.txt{three_spaces}
escaped\\ space.txt\\{one_space}
[abc].dat
?.md
tmp
*.py[cod]
""".format(three_spaces="   ", one_space=" ")

CASES: dict[str, dict[str, str | bytes]] = {
    "basic patterns": {
        ".gitignore": BASIC_GITIGNORE,
        "a.log": "",
        "keep.log": "",
        "sub/a.log": "",
        "sub/keep.log": "",
        "build/x.o": "",
        "sub/build/y.o": "",
        "buildx/z": "",
        "top.txt": "",
        "sub/top.txt": "",
        "x/cache/z": "",
        "cache/w": "",
        "cache.txt": "",
        "docs/a/b/c.tmp": "",
        "docs/c.tmp": "",
        "docs/c.txt": "",
        "other/docs/d.tmp": "",
        "#hash.txt": "",
        "!bang.txt": "",
        "trailing.txt": "",
        "escaped space.txt ": "",
        "escaped space.txt": "",
        "a.dat": "",
        "d.dat": "",
        "x.md": "",
        "xy.md": "",
        "tmp/t": "",
        "sub/tmp": "",
        "src/tmp.py": "",
        "src/main.py": "",
        "src/main.pyc": "",
    },
    "nested gitignore files, deeper wins": {
        ".gitignore": "*.log\n/local.txt\nbuild/\nsecret*\n",
        "a.log": "",
        "local.txt": "",
        "secret.key": "",
        "sub/.gitignore": "!a.log\n/local.txt\n!secret.key\n!build/\n",
        "sub/a.log": "",
        "sub/b.log": "",
        "sub/local.txt": "",
        "sub/secret.key": "",
        "sub/secret.txt": "",
        "sub/build/kept.o": "",
        "build/gone.o": "",
        "sub/deeper/local.txt": "",
        "sub/deeper/a.log": "",
        "sub/deeper/.gitignore": "*.txt\n",
        "sub/deeper/notes.txt": "",
        "sub/deeper/code.py": "",
        "other/local.txt": "",
    },
    "excluded directory cannot be re-included": {
        ".gitignore": "logs/\n!logs/important.log\nout\n!out/keep.txt\nstar/*\n!star/keep.txt\n",
        "logs/important.log": "",
        "logs/other.log": "",
        "out/keep.txt": "",
        "out/other.txt": "",
        "star/keep.txt": "",
        "star/other.txt": "",
        "star/deep/x.txt": "",
    },
    "gitignore inside an ignored directory is never read": {
        ".gitignore": "vendor/\n",
        "vendor/.gitignore": "!*\n",
        "vendor/lib.py": "",
        "main.py": "",
    },
    "whitelist: ignore all but python files": {
        ".gitignore": "*\n!*/\n!*.py\n!.gitignore\n",
        "a.py": "",
        "a.txt": "",
        "pkg/b.py": "",
        "pkg/b.json": "",
        "pkg/deep/c.py": "",
        "pkg/deep/c.bin": "",
    },
    "middle slash anchors, leading and trailing double star": {
        ".gitignore": "a/b.txt\n**/foo\nabc/**\nx/**/y\n/**/z.txt\n",
        "a/b.txt": "",
        "x/a/b.txt": "",
        "foo": "",
        "e/foo": "",
        "d/foo/inner": "",
        "food": "",
        "abc/1": "",
        "abc/d/2": "",
        "abcd/3": "",
        "x/y": "",
        "x/p/q/y": "",
        "w/x/y": "",
        "z.txt": "",
        "m/z.txt": "",
    },
    "directory-only pattern does not match a file": {
        ".gitignore": "data/\nmodels/*/\n",
        "data": "a file named data",
        "sub/data/x.npy": "",
        "models/a/w.bin": "",
        "models/readme": "",
    },
    "negated directory in a nested file": {
        ".gitignore": "build/\n*.bin\n",
        "build/a.bin": "",
        "pkg/build/b.txt": "",
        "pkg/.gitignore": "!build/\n!*.bin\n",
        "pkg/c.bin": "",
        "d.bin": "",
    },
    "unicode, spaces and dotfiles": {
        ".gitignore": "*.tmp\n.cache/\nweird name/\n",
        "ünïcode.py": "",
        "ünïcode.tmp": "",
        "with space.py": "",
        ".env": "",
        ".cache/x": "",
        "weird name/a": "",
        "weird namex/b": "",
    },
    "crlf line endings": {
        ".gitignore": b"*.log\r\n!keep.log\r\nbuild/\r\n",
        "a.log": "",
        "keep.log": "",
        "build/x": "",
    },
    "no ignore file at all": {
        "a.py": "",
        "b/c.txt": "",
        ".hidden": "",
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_walk_matches_git(name: str, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, CASES[name])
    compare_with_git(root, tmp_path)


def test_symlinks_are_files_for_git_and_walk(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, {".gitignore": "linked/\n*.lnk\n", "target/a.py": "", "real.py": ""})
    (root / "dir-link").symlink_to("target")  # git: a symlink is a file, a dir pattern does not match it
    (root / "linked").symlink_to("target")
    (root / "file.lnk").symlink_to("real.py")
    (root / "dangling").symlink_to("nowhere")
    walked = compare_with_git(root, tmp_path)
    assert {"dir-link", "linked", "dangling"} <= walked
    links = {item.path: item.is_link for item in IgnoreRules(root).walk()}
    assert links["dir-link"] and not links["real.py"]


_NAMES = ["a", "b", "c.log", "d.txt", "build", "keep.log", "x.py", "cache", "[x]", "a b", "é", "!n", "#h", "*", "ab"]
_PATTERNS = [
    "*.log",
    "!keep.log",
    "build/",
    "/d.txt",
    "**/cache",
    "a/",
    "!a/",
    "b",
    "!b",
    "*.py",
    "!x.py",
    "/a/b",
    "c.log",
    "**/b/**",
    "!*.txt",
    "*",
    "!*/",
    "a/**",
    "?.py",
    "[ab]",
    "cache/",
    "!cache",
    "/build",
    "d.*",
    "a/**/",
    "**/",
    "a**",
    "**b",
    "a/**/b",
    "b/**/",
    "[!a]",
    "[^ab]*",
    "[a-c]*",
    "[[:alpha:]]",
    "[[:digit:]]*",
    "\\[x\\]",
    "[x]",
    "a\\ b",
    "a b  ",
    "\\!n",
    "\\#h",
    "\\*",
    "*/",
    "*/*",
    "/*",
    "/*/",
    "**",
    "/**",
    "a/*",
    "*/b",
    "[]]",
    "[!]]",
    "[a-]",
    "[z-a]",
    "é",
    "?",
    "??",
    "!b/",
    "/a",
    "!/a",
    "a/b/",
    "**/a/**",
    "[[:bad:]]",
    "[",
    "a\\",
    "[[:alpha:]",
]


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_match_git(seed: int, tmp_path: Path) -> None:
    """Random trees with random root and nested ignore files (hostile patterns too): git is the oracle."""
    rng = random.Random(seed)
    files: dict[str, str | bytes] = {}
    for _ in range(rng.randint(5, 30)):
        path = "/".join(rng.choice(_NAMES) for _ in range(rng.randint(1, 4)))
        # Skip paths that would need a file and a directory of the same name.
        if any(old == path or old.startswith(path + "/") or path.startswith(old + "/") for old in files):
            continue
        files[path] = ""
    directories = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
    for where in [""] + rng.sample(directories, k=min(len(directories), rng.randint(0, 3))):
        ignore = f"{where}/.gitignore" if where else ".gitignore"
        if ignore in files or any(old.startswith(ignore + "/") for old in files):
            continue
        files[ignore] = "\n".join(rng.sample(_PATTERNS, k=rng.randint(1, 8))) + "\n"
    root = tmp_path / "tree"
    build(root, files)
    compare_with_git(root, tmp_path)


def test_ignore_file_oddities_match_git(tmp_path: Path) -> None:
    """A BOM, bytes that are not UTF-8, a symlinked and a directory .gitignore (git reads neither)."""
    root = tmp_path / "tree"
    build(
        root,
        {
            ".gitignore": b"\xef\xbb\xbf*.log\n\xff\xfe.bin\n!keep.log",  # no final newline
            "a.log": "",
            "keep.log": "",
            "b.bin": "",
            "real-rules": "*.py\n",
            "linked/x.py": "",
            "linked/y.txt": "",
            "dir-rules/.gitignore/inner": "",
            "dir-rules/z.py": "",
        },
    )
    (root / "linked" / ".gitignore").symlink_to("../real-rules")
    compare_with_git(root, tmp_path)


# ---- gpurun's own rules on top of git's ------------------------------------------------


def test_gpurunignore_at_root_replaces_gitignore(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(
        root,
        {
            ".gitignore": "*.log\n",
            ".gpurunignore": "data/\n*.npy\n",
            "a.log": "",
            "data/x.csv": "",
            "w.npy": "",
            "train.py": "",
            "sub/.gitignore": "*.py\n",
            "sub/m.py": "",
            "sub/.gpurunignore": "*.txt\n",
            "sub/n.txt": "",
            "sub/o.csv": "",
        },
    )
    walked = {item.path for item in IgnoreRules(root).walk()}
    # .gitignore files (root and nested) no longer count; nested .gpurunignore files do.
    assert walked == {
        ".gitignore",
        ".gpurunignore",
        "a.log",
        "train.py",
        "sub/.gitignore",
        "sub/m.py",
        "sub/.gpurunignore",
        "sub/o.csv",
    }
    rules = IgnoreRules(root)
    assert rules.is_ignored("data/x.csv") and rules.is_ignored("sub/n.txt") and not rules.is_ignored("a.log")


def test_gpurunignore_only_in_a_subdirectory_does_not_replace(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, {".gitignore": "*.log\n", "a.log": "", "sub/.gpurunignore": "*.py\n", "sub/b.py": "", "sub/c.log": ""})
    walked = {item.path for item in IgnoreRules(root).walk()}
    assert walked == {".gitignore", "sub/.gpurunignore", "sub/b.py"}


def test_sync_exclude_applies_on_top(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(
        root,
        {
            ".gitignore": "*.log\n",
            "a.log": "",
            "data/big.npy": "",
            "sub/data/x": "",
            "w.npy": "",
            "checkpoints/c.pt": "",
            "sub/checkpoints/d": "",
            "train.py": "",
        },
    )
    rules = IgnoreRules(root, ["data/", "*.npy", "/checkpoints/"])
    walked = {item.path for item in rules.walk()}
    assert walked == {".gitignore", "train.py", "sub/checkpoints/d"}
    assert rules.is_ignored("a.log") and rules.is_ignored("sub/data/x") and rules.is_ignored("checkpoints/c.pt")
    assert not rules.is_ignored("sub/checkpoints/d")


def test_sync_exclude_without_any_ignore_file(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, {"a.py": "", "out/x": "", "deep/out/y": ""})
    assert {item.path for item in IgnoreRules(root, ("out/",)).walk()} == {"a.py"}
    assert {item.path for item in IgnoreRules(root, ("/out/",)).walk()} == {"a.py", "deep/out/y"}


def test_dot_git_is_never_sent(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(
        root,
        {
            ".gitignore": "!.git\n!.git/\n!*\n",
            ".gpurunignore": "!.git\n",
            "a.py": "",
            "sub/.git": "gitdir: ../elsewhere\n",  # a worktree's .git file
            "vendored/.git/config": "",
            "vendored/lib.py": "",
        },
    )
    subprocess.run(["git", "init", "-q", str(root)], env=_git_env(tmp_path), check=True)
    for extra in [(), ("!.git/",)]:
        rules = IgnoreRules(root, extra)
        walked = {item.path for item in rules.walk()}
        assert not any(part == ".git" for path in walked for part in path.split("/")), walked
        assert {"a.py", "vendored/lib.py"} <= walked
        assert rules.is_ignored(".git/config") and rules.is_ignored(".git") and rules.is_ignored("sub/.git")


def test_walk_reports_stat_fields(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, {"a.sh": "#!/bin/sh\n"})
    (root / "a.sh").chmod(0o755)
    (item,) = list(IgnoreRules(root).walk())
    assert (item.path, item.size, item.mode, item.is_link) == ("a.sh", 10, 0o755, False)
    assert item.mtime_ns == (root / "a.sh").stat().st_mtime_ns


def test_unreadable_or_special_entries_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    build(root, {"a.py": ""})
    os.mkfifo(root / "pipe")
    assert {item.path for item in IgnoreRules(root).walk()} == {"a.py"}
