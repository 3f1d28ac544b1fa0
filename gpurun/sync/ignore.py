"""Which files of the workdir are sent: git's ignore rules, decided per entry as git does.

`.gpurunignore` files take the place of `.gitignore` files when the workdir
has one at its root; `sync.exclude` patterns apply on top; `.git` never goes.
Nested ignore files apply to their own directory, deeper files win, the last
matching line of a file wins, and a file inside an excluded directory cannot
be re-included (git never looks inside an excluded directory).

Patterns follow git's dir.c and wildmatch.c: a pattern with no slash (a trailing
one aside) matches the entry's name at any depth; any other is matched against
the path relative to the ignore file's directory; a trailing slash matches
directories only (never a symlink); `*` and `?` stop at '/'; `**` between
slashes spans directories; `[...]` with `!`/`^` negation, ranges and
`[:class:]`; backslash escapes; trailing spaces dropped unless escaped; CR
before LF dropped. Matching is on bytes, as git does.

(pathspec's GitIgnoreSpec answers "is this file ignored, given only its path"
and disagrees with git for a walker that asks per entry, e.g. `*` + `!*/` +
`!*.py`, or `a/**/`: hence this small translator.)
"""

from __future__ import annotations

import os
import re
import stat as stat_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ALWAYS_EXCLUDED = (".git",)
# Files that hold credentials, kept back whatever the ignore files say (a `.gpurunignore`
# replaces `.gitignore` entirely, and rarely repeats them); `sync.include` sends one on purpose.
SENSITIVE_FILES = re.compile(r"\.env|\.env\..+|.+\.pem|.+\.key|\.netrc|id_(rsa|dsa|ecdsa|ed25519)(_sk)?")
SENSITIVE_DIRS = frozenset({".aws", ".ssh"})
_NEVER = re.compile(rb"(?!)")

_CLASSES: dict[bytes, set[int]] = {
    b"alnum": set(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
    b"alpha": set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
    b"blank": set(b" \t"),
    b"cntrl": set(range(32)) | {127},
    b"digit": set(b"0123456789"),
    b"graph": set(range(33, 127)),
    b"lower": set(b"abcdefghijklmnopqrstuvwxyz"),
    b"print": set(range(32, 127)),
    b"punct": set(range(33, 127)) - set(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
    b"space": set(b" \t\n\v\f\r"),
    b"upper": set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    b"xdigit": set(b"0123456789ABCDEFabcdef"),
}


@dataclass(frozen=True)
class WalkedFile:
    path: str  # relative, POSIX
    size: int
    mtime_ns: int
    mode: int
    is_link: bool


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[bytes]
    negative: bool
    dir_only: bool
    basename: bool  # no slash in the pattern: match the entry's name at any depth

    def matches(self, relative: bytes, name: bytes, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(name if self.basename else relative) is not None


class _Abort(Exception):
    """wildmatch's WM_ABORT_ALL: a malformed pattern that never matches."""


def _bracket(pattern: bytes, start: int) -> tuple[bytes, int]:
    """Translate the `[...]` at pattern[start]; returns (regex, index after it)."""
    p = start + 1
    if p >= len(pattern):
        raise _Abort
    negated = False
    if pattern[p] in b"!^":
        negated = True
        p += 1
    chosen: set[int] = set()
    prev: int | None = None
    first = True
    while True:
        if p >= len(pattern):
            raise _Abort
        ch = pattern[p]
        if ch == ord("]") and not first:
            break
        first = False
        if ch == ord("\\"):
            p += 1
            if p >= len(pattern):
                raise _Abort
            ch = pattern[p]
            chosen.add(ch)
            prev = ch
        elif ch == ord("-") and prev is not None and p + 1 < len(pattern) and pattern[p + 1] != ord("]"):
            p += 1
            high = pattern[p]
            if high == ord("\\"):
                p += 1
                if p >= len(pattern):
                    raise _Abort
                high = pattern[p]
            chosen.update(range(prev, high + 1))
            prev = None
        elif ch == ord("[") and p + 1 < len(pattern) and pattern[p + 1] == ord(":"):
            close = pattern.find(b"]", p + 2)
            if close < 0:
                raise _Abort
            if close - 1 < p + 2 or pattern[close - 1] != ord(":"):
                chosen.add(ch)  # no ":]": a plain '['
                prev = ch
            else:
                name = pattern[p + 2 : close - 1]
                if name not in _CLASSES:
                    raise _Abort
                chosen |= _CLASSES[name]
                p = close
                prev = None
        else:
            chosen.add(ch)
            prev = ch
        p += 1
    if negated:
        chosen = set(range(256)) - chosen
    chosen.discard(ord("/"))
    if not chosen:
        return rb"(?!)", p + 1
    return b"[" + b"".join(b"\\x%02x" % byte for byte in sorted(chosen)) + b"]", p + 1


def _wildmatch_regex(pattern: bytes) -> re.Pattern[bytes]:
    """git's wildmatch with WM_PATHNAME, as a regex for fullmatch."""
    out: list[bytes] = []
    i = 0
    n = len(pattern)
    try:
        while i < n:
            ch = pattern[i]
            if ch == ord("\\"):
                if i + 1 >= n:
                    raise _Abort  # a trailing backslash never matches
                out.append(re.escape(pattern[i + 1 : i + 2]))
                i += 2
            elif ch == ord("?"):
                out.append(rb"[^/]")
                i += 1
            elif ch == ord("["):
                regex, i = _bracket(pattern, i)
                out.append(regex)
            elif ch == ord("*"):
                j = i
                while j < n and pattern[j] == ord("*"):
                    j += 1
                if j - i >= 2:
                    before_ok = i == 0 or pattern[i - 1] == ord("/")
                    after = pattern[j:]
                    if before_ok and (not after or after.startswith(b"/") or after.startswith(b"\\/")):
                        if not after:
                            out.append(rb".*")
                            i = j
                        else:
                            # "**/" spans zero or more directories.
                            out.append(rb"(?:.*/)?")
                            i = j + (1 if after.startswith(b"/") else 2)
                        continue
                out.append(rb"[^/]*")
                i = j
            else:
                out.append(re.escape(pattern[i : i + 1]))
                i += 1
    except _Abort:
        return _NEVER
    return re.compile(b"".join(out), re.DOTALL)


def _trim_trailing_spaces(line: bytes) -> bytes:
    last_space = None
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == ord(" "):
            if last_space is None:
                last_space = i
        elif ch == ord("\\"):
            i += 1
            if i >= len(line):
                return line
            last_space = None
        else:
            last_space = None
        i += 1
    return line if last_space is None else line[:last_space]


def parse_pattern(line: bytes | str) -> Pattern | None:
    """One line of an ignore file as git reads it, or None for comments and blanks."""
    if isinstance(line, str):
        line = os.fsencode(line)
    line = line.rstrip(b"\n")
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line or line.startswith(b"#"):
        return None
    line = _trim_trailing_spaces(line)
    negative = line.startswith(b"!")
    if negative:
        line = line[1:]
    dir_only = line.endswith(b"/")
    if dir_only:
        line = line[:-1]
    basename = b"/" not in line
    if not basename and line.startswith(b"/"):
        line = line[1:]
    if not line:
        return None
    return Pattern(_wildmatch_regex(line), negative, dir_only, basename)


def parse_lines(lines: list[bytes] | list[str]) -> list[Pattern]:
    patterns = (parse_pattern(line) for line in lines)
    return [pattern for pattern in patterns if pattern is not None]


def _load(path: Path) -> list[Pattern] | None:
    """An ignore file's patterns; git reads neither symlinks nor directories here."""
    try:
        info = os.lstat(path)
        if not stat_module.S_ISREG(info.st_mode):
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return parse_lines(data.split(b"\n"))


def _last_match(patterns: list[Pattern], relative: bytes, name: bytes, is_dir: bool) -> bool | None:
    """True (ignored), False (re-included) or None (no line matches): the last matching line wins."""
    for pattern in reversed(patterns):
        if pattern.matches(relative, name, is_dir):
            return not pattern.negative
    return None


Level = tuple[bytes, list[Pattern]]  # (directory relative to root, no trailing slash; its patterns)


def is_sensitive(name: str, is_dir: bool) -> bool:
    """A file or directory name that usually holds a credential (see SENSITIVE_FILES)."""
    if is_dir:
        return name in SENSITIVE_DIRS
    return SENSITIVE_FILES.fullmatch(name) is not None


class IgnoreRules:
    def __init__(
        self, root: Path, extra: list[str] | tuple[str, ...] = (), include: list[str] | tuple[str, ...] = ()
    ) -> None:
        self.root = Path(root)
        self.file_name = ".gpurunignore" if (self.root / ".gpurunignore").is_file() else ".gitignore"
        self.extra = parse_lines(list(extra)) if extra else []
        self.include = parse_lines(list(include)) if include else []
        #: Paths not sent because they look like credentials (directories end in '/'), from the last walk.
        self.held_back: list[str] = []

    def _held_back(self, relative: str, is_dir: bool) -> bool:
        name = relative.rsplit("/", 1)[-1]
        if not is_sensitive(name, is_dir):
            return False
        path = os.fsencode(relative)
        return _last_match(self.include, path, path.rsplit(b"/", 1)[-1], is_dir) is not True

    def _decide(self, relative: str, levels: list[Level], is_dir: bool) -> bool:
        """True when `relative` is ignored; `levels` are the ignore files above it, shallowest first."""
        path = os.fsencode(relative)
        name = path.rsplit(b"/", 1)[-1]
        if self.extra:
            decided = _last_match(self.extra, path, name, is_dir)
            if decided is not None:
                return decided
        for base, patterns in reversed(levels):
            inner = path[len(base) + 1 :] if base else path
            decided = _last_match(patterns, inner, name, is_dir)
            if decided is not None:
                return decided
        return False

    def walk(self) -> Iterator[WalkedFile]:
        """Every file that is sent, with the stat fields the manifest compares."""
        self.held_back = []
        yield from self._walk(self.root, "", [])

    def _walk(self, directory: Path, relative: str, levels: list[Level]) -> Iterator[WalkedFile]:
        patterns = _load(directory / self.file_name)
        if patterns:
            levels = [*levels, (os.fsencode(relative), patterns)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name in ALWAYS_EXCLUDED:
                continue
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if self._decide(path, levels, is_dir):
                continue
            if self._held_back(path, is_dir):
                self.held_back.append(path + "/" if is_dir else path)
                continue
            if is_dir:
                yield from self._walk(Path(entry.path), path, levels)
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_link = stat_module.S_ISLNK(stat.st_mode)
            if not is_link and not stat_module.S_ISREG(stat.st_mode):
                continue  # sockets, fifos: nothing to send
            yield WalkedFile(path, stat.st_size, stat.st_mtime_ns, stat.st_mode & 0o7777, is_link)

    def is_ignored(self, relative: str) -> bool:
        """For one path (tests and `--dry-run`): walks its parents like `walk` does."""
        parts = relative.strip("/").split("/")
        levels: list[Level] = []
        current = self.root
        for depth, part in enumerate(parts):
            if part in ALWAYS_EXCLUDED:
                return True
            patterns = _load(current / self.file_name)
            if patterns:
                levels.append((os.fsencode("/".join(parts[:depth])), patterns))
            path = "/".join(parts[: depth + 1])
            is_dir = depth < len(parts) - 1 or ((self.root / path).is_dir() and not (self.root / path).is_symlink())
            if self._decide(path, levels, is_dir):
                return True
            current = current / part
        return False
