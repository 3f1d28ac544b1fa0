"""The experiment spec: load the YAML, apply --set overrides, validate every field.

Errors name the file, the field and what would be accepted, as one line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpurun.durations import parse_duration
from gpurun.errors import SpecError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_SPEC_BYTES = 1_000_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyncSpec(_Section):
    exclude: list[str] = Field(default_factory=list)

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("an exclude pattern must not be empty")
            if ".." in PurePosixPath(pattern.strip("/")).parts:
                raise ValueError(f"{pattern!r} reaches outside workdir ('..' is not allowed)")
        return patterns


class CheckpointSpec(_Section):
    dir: str = "checkpoints"
    store: str | None = None
    every: float = 300.0
    keep: int = Field(default=3, ge=1, le=10_000)
    resume: Literal["auto", "never"] = "auto"
    nodes: Literal["rank0", "all"] = "rank0"

    @field_validator("dir")
    @classmethod
    def _relative_dir(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\x00" in value:
            raise ValueError(f"{value!r} must be a path inside workdir, like checkpoints")
        return value

    @field_validator("every", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("file://"):
            path = value[len("file://") :]
            if not path.startswith("/"):
                raise ValueError(f"{value!r}: a file store needs an absolute path, like file:///data/checkpoints")
            return value.rstrip("/") or "file:///"
        if value.startswith("s3://"):
            bucket = value[len("s3://") :].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"{value!r} has no valid bucket name; use s3://bucket/prefix")
            return value.rstrip("/")
        raise ValueError(f"{value!r} is not a store URL; use s3://bucket/prefix or file:///absolute/path")


class AwsSpec(_Section):
    region: str = "us-east-1"
    profile: str | None = None
    instance_type: list[str] = Field(default_factory=lambda: ["g5.xlarge"])
    ami: str = "dlami-pytorch"
    spot: bool = False
    max_price: float | None = Field(default=None, ge=0)
    disk_gb: int = Field(default=100, ge=8, le=16384)
    ssh_cidr: str = "auto"
    max_runtime: float = 12 * 3600.0
    idle_timeout: float | None = 30 * 60.0
    nodes: int = Field(default=1, ge=1, le=256)
    subnet_id: str | None = None
    vpc_id: str | None = None
    iam_instance_profile: str | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d", value):
            raise ValueError(f"{value!r} is not an AWS region name, like us-east-1")
        return value

    @field_validator("instance_type", mode="before")
    @classmethod
    def _types(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one instance type, like g5.xlarge")
            for item in value:
                if not isinstance(item, str) or not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+", item):
                    raise ValueError(f"{item!r} is not an instance type name, like g5.xlarge")
        return value

    @field_validator("ami")
    @classmethod
    def _ami(cls, value: str) -> str:
        if value in ("dlami-pytorch", "dlami-base") or re.fullmatch(r"ami-[0-9a-f]{8,17}", value):
            return value
        if value.startswith("ssm:/") and len(value) > 5:
            return value
        if value.startswith("name:") and "@" in value and value.split("@")[0] != "name:":
            return value
        raise ValueError(
            f"{value!r} is not an AMI; use ami-..., ssm:/path, name:<pattern>@<owner>, dlami-pytorch or dlami-base"
        )

    @field_validator("ssh_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        if value == "auto":
            return value
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR; use auto or an address block like 203.0.113.7/32") from None

    @field_validator("max_runtime", mode="before")
    @classmethod
    def _max_runtime(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _idle(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)


class SshSpec(_Section):
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    hosts: list[str] = Field(default_factory=list)
    identity_file: str | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not re.fullmatch(r"[A-Za-z0-9_.@:\[\]-]+", host) or host.startswith("-"):
                raise ValueError(f"{host!r} is not a host name, address or ~/.ssh/config alias")
        return hosts


class Spec(_Section):
    name: str
    provider: Literal["aws", "ssh", "local"] = "local"
    workdir: str = "."
    sync: SyncSpec = Field(default_factory=SyncSpec)
    env: dict[str, str] = Field(default_factory=dict)
    setup: str | None = None
    run: str
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    aws: AwsSpec = Field(default_factory=AwsSpec)
    ssh: SshSpec = Field(default_factory=SshSpec)
    # Where the spec was read from: relative paths are resolved against it.
    spec_dir: str = Field(default=".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a run name; use letters, digits, '-' and '_' (at most 40, starting with a letter or digit)"
            )
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        result = {}
        for key, item in value.items():
            if not isinstance(key, str) or not ENV_NAME_PATTERN.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if isinstance(item, bool):
                item = "true" if item else "false"
            if isinstance(item, (int, float)):
                item = str(item)
            if not isinstance(item, str):
                raise ValueError(f"env.{key} must be a string, number or boolean")
            if "\x00" in item:
                raise ValueError(f"env.{key} must not contain NUL bytes")
            result[key] = item
        return result

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("run must be the command that starts training, like python train.py")
        return value

    @model_validator(mode="after")
    def _provider_needs(self) -> Spec:
        if self.provider == "ssh" and not self.ssh.hosts:
            raise ValueError("provider ssh needs ssh.hosts: the machines to run on")
        return self

    @property
    def workdir_path(self) -> Path:
        return (Path(self.spec_dir) / self.workdir).resolve()

    @property
    def num_nodes(self) -> int:
        if self.provider == "aws":
            return self.aws.nodes
        if self.provider == "ssh":
            return len(self.ssh.hosts)
        return 1

    def to_record(self) -> dict[str, Any]:
        """Plain data for run records: readable without pydantic."""
        data = self.model_dump(mode="json")
        data["workdir"] = str(self.workdir_path)
        return data


_MODELS: dict[str, type[BaseModel]] = {
    "": Spec,
    "sync": SyncSpec,
    "checkpoint": CheckpointSpec,
    "aws": AwsSpec,
    "ssh": SshSpec,
}


def _known_keys(section: str) -> list[str]:
    model = _MODELS.get(section)
    if model is None:
        return []
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _did_you_mean(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if match:
        return f" (did you mean {match[0]!r}?)"
    return f" (known: {', '.join(choices)})"


def _format_validation(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    field = ".".join(location) or "spec"
    kind = first["type"]
    if kind == "extra_forbidden":
        section = ".".join(location[:-1])
        return f"{source}: {field}: unknown key{_did_you_mean(location[-1], _known_keys(section))}"
    if kind == "missing":
        return f"{source}: {field}: required field is missing"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    elif kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        message = f"{first['input']!r} is not accepted; use one of {expected}"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        message = f"{message.lower()}, got {first['input']!r}" if not isinstance(first["input"], dict) else message
    return f"{source}: {field}: {message}"


def _check_unknown_top(source: str, data: dict[str, Any]) -> None:
    for key in data:
        if not isinstance(key, str):
            raise SpecError(f"{source}: {key!r}: keys must be strings")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` as (path, YAML-typed value)."""
    if "=" not in text:
        raise SpecError(f"--set {text}: expected FIELD=VALUE, like aws.spot=false")
    path, _, raw = text.partition("=")
    parts = path.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {text}: expected FIELD=VALUE, like aws.spot=false")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    section = ""
    target = data
    for depth, part in enumerate(parts):
        known = _known_keys(section)
        if part not in known or (depth < len(parts) - 1 and part not in _MODELS and part != "env"):
            if section == "env" or (depth == 1 and parts[0] == "env"):
                break
            raise SpecError(f"--set {text}: {'.'.join(parts[: depth + 1])}: unknown field{_did_you_mean(part, known)}")
        if depth == len(parts) - 1:
            target[part] = value
            return
        if part == "env":
            env = target.setdefault("env", {})
            if not isinstance(env, dict) or len(parts) != 2:
                raise SpecError(f"--set {text}: use env.NAME=value")
            env[parts[1]] = value
            return
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {text}: {part} is not a section")
        target = child
        section = part
    raise SpecError(f"--set {text}: unknown field")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, override and validate an experiment file."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise SpecError(f"{source}: no such experiment file")
    if path.is_dir():
        raise SpecError(f"{source}: is a directory; give the experiment's YAML file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SpecError(f"{source}: cannot read: {error.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: file is larger than 1 MB; an experiment file is a few lines of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{source}: not UTF-8 text (byte {error.start})") from None
    data = parse_yaml(source, text)
    for override in overrides:
        apply_override(data, override)
    return validate_spec(data, source=source, spec_dir=path.resolve().parent)


def parse_yaml(source: str, text: str) -> dict[str, Any]:
    try:
        # The composed node count bounds alias expansion ("billion laughs").
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _count_nodes(node) > 10_000:
                raise SpecError(f"{source}: too many YAML nodes (alias expansion?); an experiment file is small")
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" line {mark.line + 1}" if mark else ""
        problem = (error.problem or error.context or "invalid YAML").strip()
        raise SpecError(f"{source}:{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: invalid YAML: {str(error).splitlines()[0]}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nested too deeply") from None
    if data is None:
        raise SpecError(f"{source}: empty experiment file; it needs at least name and run")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields (name:, run:, ...), got {type(data).__name__}")
    _check_unknown_top(source, data)
    return data


def _count_nodes(node: yaml.Node, limit: int = 10_001) -> int:
    count = 0
    stack = [node]
    while stack and count < limit:
        current = stack.pop()
        count += 1
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.append(key)
                stack.append(value)
    return count


def validate_spec(data: dict[str, Any], *, source: str, spec_dir: Path | str) -> Spec:
    if "spec_dir" in data:
        raise SpecError(f"{source}: spec_dir: unknown key{_did_you_mean('spec_dir', _known_keys(''))}")
    try:
        spec = Spec.model_validate({**data, "spec_dir": str(spec_dir)})
    except ValidationError as error:
        raise SpecError(_format_validation(source, error)) from None
    workdir = spec.workdir_path
    if not workdir.is_dir():
        raise SpecError(f"{source}: workdir: {spec.workdir!r} is not a directory (resolved to {workdir})")
    return spec


def spec_from_record(data: dict[str, Any]) -> Spec:
    """Rebuild the spec stored in a run record (its workdir is already absolute)."""
    try:
        return Spec.model_validate({**data, "spec_dir": "/"})
    except ValidationError as error:
        raise SpecError(_format_validation("run record", error)) from None
