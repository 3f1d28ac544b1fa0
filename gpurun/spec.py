"""The experiment spec: load the YAML, apply --set overrides, validate every field.

Errors name the file, the field and what would be accepted, as one line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpurun.durations import parse_duration
from gpurun.errors import SpecError
from gpurun.models import SpecDocument

# \Z, not $: "$" also matches before a trailing newline.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}\Z")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
SSH_USER_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
SECRET_SOURCE = re.compile(
    r"env(:[A-Za-z_][A-Za-z0-9_]{0,127})?"
    r"|ssm:/?[A-Za-z0-9_.\-/]{1,2047}"
    r"|secretsmanager:(arn:[a-z-]+:secretsmanager:[a-z0-9-]+:\d{12}:secret:)?[A-Za-z0-9/_+=.@-]{1,512}"
)
# env: keys that usually hold a credential (their values land in records and job.sh).
SECRET_LIKE_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
MAX_SPEC_BYTES = 1_000_000
MAX_YAML_NODES = 10_000
# NUL and the characters that end a line (in a message, a shell or a YAML file).
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def show(value: object, limit: int = 60) -> str:
    """`value` as a message shows it: repr (so control characters are escaped), long ones cut."""
    text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} chars)"
    return text


def label(text: str, limit: int = 200) -> str:
    """User text (a path, a key, a --set argument) as it appears in a one-line message."""
    if text.isprintable() and len(text) <= limit:
        return text
    return show(text, limit)


def _no_control(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{show(value)}: {what} must not contain control characters (NUL, newline, tab)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyncSpec(_Section):
    exclude: list[str] = Field(default_factory=list)
    # Held-back credential files (.env, *.pem, *.key, id_* keys, .netrc, .aws/, .ssh/) to send anyway.
    include: list[str] = Field(default_factory=list)

    @field_validator("exclude", "include")
    @classmethod
    def _patterns(cls, patterns: list[str], info: ValidationInfo) -> list[str]:
        what, example = ("exclude", "data/ or *.npy") if info.field_name == "exclude" else ("include", ".env")
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError(f"an {what} pattern must not be empty; use a pattern like {example}")
            _no_control(pattern, f"an {what} pattern")
            if ".." in PurePosixPath(pattern.strip("/")).parts:
                raise ValueError(
                    f"{show(pattern)} reaches outside workdir ('..' is not allowed); use a pattern like {example}"
                )
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
        if (
            not path.parts
            or path.is_absolute()
            or ".." in path.parts
            or value.startswith("~")
            or _CONTROL.search(value)
            or len(value) > 1024
        ):
            raise ValueError(f"{show(value)} must be a directory inside workdir, like checkpoints")
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
        if _CONTROL.search(value) or " " in value:
            raise ValueError(
                f"{show(value)} is not a store URL (spaces or control characters); "
                "use s3://bucket/prefix or file:///absolute/path"
            )
        if value.startswith("file://"):
            path = value[len("file://") :]
            if not path.startswith("/"):
                raise ValueError(f"{show(value)}: a file store needs an absolute path, like file:///data/checkpoints")
            return value.rstrip("/") or "file:///"
        if value.startswith("s3://"):
            bucket = value[len("s3://") :].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"{show(value)} has no valid bucket name; use s3://bucket/prefix")
            return value.rstrip("/")
        raise ValueError(f"{show(value)} is not a store URL; use s3://bucket/prefix or file:///absolute/path")


class AwsSpec(_Section):
    region: str = "us-east-1"
    profile: str | None = None
    instance_type: list[str] = Field(default_factory=lambda: ["g5.xlarge"])
    ami: str = "dlami-pytorch"
    # What `ami: auto` launches when no gpurun image matches the setup hash.
    ami_fallback: str = "dlami-pytorch"
    spot: bool = False
    max_price: float | None = Field(default=None, ge=0)
    disk_gb: int = Field(default=100, ge=8, le=16384)
    ssh_cidr: str = "auto"
    max_runtime: float = 12 * 3600.0
    idle_timeout: float | None = 30 * 60.0
    nodes: int = Field(default=1, ge=1, le=256)
    # Recovering runs: how long launch waits for the Auto Scaling group's first machine.
    capacity_wait: float = 600.0
    subnet_id: str | None = None
    vpc_id: str | None = None
    iam_instance_profile: str | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d", value):
            raise ValueError(f"{show(value)} is not an AWS region name, like us-east-1")
        return value

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        if value is not None and (not value or value.startswith("-") or _CONTROL.search(value) or len(value) > 128):
            raise ValueError(f"{show(value)} is not an AWS profile name; use a name from ~/.aws/config, or null")
        return value

    @field_validator("subnet_id")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"subnet-[0-9a-f]{8,17}", value):
            raise ValueError(f"{show(value)} is not a subnet id; use subnet-0123456789abcdef0, or null")
        return value

    @field_validator("vpc_id")
    @classmethod
    def _vpc(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"vpc-[0-9a-f]{8,17}", value):
            raise ValueError(f"{show(value)} is not a VPC id; use vpc-0123456789abcdef0, or null")
        return value

    @field_validator("iam_instance_profile")
    @classmethod
    def _instance_profile(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9+=,.@_-]{1,128}", value):
            raise ValueError(f"{show(value)} is not an instance profile name (letters, digits, +=,.@_-), or null")
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
                if not isinstance(item, str) or not re.fullmatch(r"[a-z0-9-]{1,32}\.[a-z0-9-]{1,32}", item):
                    raise ValueError(f"{show(item)} is not an instance type name, like g5.xlarge")
        return value

    @field_validator("ami")
    @classmethod
    def _ami(cls, value: str) -> str:
        if value == "auto" or re.fullmatch(r"image:[A-Za-z0-9][A-Za-z0-9._-]{2,127}", value):
            return value
        if value.startswith("image:"):
            raise ValueError(
                f"{show(value)} is not a gpurun image name; use image:<name> with 3 to 128 letters, digits, '.', '_' and '-'"
            )
        return cls._base_ami(value)

    @field_validator("ami_fallback")
    @classmethod
    def _ami_fallback(cls, value: str) -> str:
        if value == "auto" or value.startswith("image:"):
            raise ValueError(
                f"{show(value)} cannot be a fallback; use ami-..., ssm:/path, name:<pattern>@<owner>, dlami-pytorch or dlami-base"
            )
        return cls._base_ami(value)

    @staticmethod
    def _base_ami(value: str) -> str:
        if value in ("dlami-pytorch", "dlami-base") or re.fullmatch(r"ami-[0-9a-f]{8,17}", value):
            return value
        if re.fullmatch(r"ssm:/[A-Za-z0-9_.\-/]{1,2047}", value):
            return value
        if (
            value.startswith("name:")
            and "@" in value
            and value.split("@")[0] != "name:"
            and value.rsplit("@", 1)[1]
            and not _CONTROL.search(value)
            and len(value) <= 512
        ):
            return value
        raise ValueError(
            f"{show(value)} is not an AMI; use ami-..., ssm:/path, name:<pattern>@<owner>, dlami-pytorch, dlami-base, "
            "image:<name> or auto"
        )

    @field_validator("ssh_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        if value == "auto":
            return value
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{show(value)} is not a CIDR; use auto or an address block like 203.0.113.7/32") from None

    @field_validator("max_runtime", mode="before")
    @classmethod
    def _max_runtime(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("capacity_wait", mode="before")
    @classmethod
    def _capacity_wait(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _idle(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)


class RecoverySpec(_Section):
    """Restarts after a lost machine (or a killed job); None until the provider's default is chosen."""

    max_restarts: int | None = Field(default=None, ge=0, le=1000)
    on_failure: bool = False


class SshSpec(_Section):
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    hosts: list[str] = Field(default_factory=list)
    identity_file: str | None = None
    # False: a host key must be pinned (AWS console output) or in ~/.ssh/known_hosts.
    trust_on_first_use: bool = True

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not re.fullmatch(r"[A-Za-z0-9_.@:\[\]-]{1,255}", host) or host.startswith("-"):
                raise ValueError(f"{show(host)} is not a host name, address or ~/.ssh/config alias")
        return hosts

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not SSH_USER_PATTERN.match(value):
            raise ValueError(f"{show(value)} is not a user name; use letters, digits, '.', '_' and '-', or null")
        return value

    @field_validator("identity_file")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None:
            if not value or len(value) > 4096:
                raise ValueError(f"{show(value)} is not a key file path, like ~/.ssh/id_ed25519")
            _no_control(value, "a key file path")
        return value


class Spec(_Section):
    name: str
    provider: Literal["aws", "ssh", "local"] = "local"
    workdir: str = "."
    sync: SyncSpec = Field(default_factory=SyncSpec)
    env: dict[str, str] = Field(default_factory=dict)
    # NAME -> where its value comes from: env[:NAME] (this computer), ssm:/path, secretsmanager:name.
    # Only these references are recorded; values never are.
    secrets: dict[str, str] = Field(default_factory=dict)
    setup: str | None = None
    run: str
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    aws: AwsSpec = Field(default_factory=AwsSpec)
    ssh: SshSpec = Field(default_factory=SshSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    # Where the spec was read from: relative paths are resolved against it.
    spec_dir: str = Field(default=".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"{show(value)} is not a run name; use letters, digits, '-' and '_' (at most 40, starting with a letter or digit)"
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
                raise ValueError(
                    f"{show(key)} is not an environment variable name; use letters, digits and _, like KERAS_BACKEND"
                )
            if isinstance(item, bool):
                item = "true" if item else "false"
            if isinstance(item, int) and abs(item) > 10**100:
                raise ValueError(f"env.{key}: number too large; quote it to pass it as text")
            if isinstance(item, (int, float)):
                item = str(item)
            if not isinstance(item, str):
                raise ValueError(f"env.{key} must be a string, number or boolean, got {type(item).__name__}")
            if "\x00" in item:
                raise ValueError(f"env.{key} must not contain NUL bytes")
            result[key] = item
        return result

    @field_validator("secrets", mode="before")
    @classmethod
    def _secrets(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, list):
            if not all(isinstance(name, str) for name in value):
                raise ValueError("a list of environment variable names, like [WANDB_API_KEY]")
            value = dict.fromkeys(value, "env")
        if not isinstance(value, dict):
            raise ValueError(
                "a list of names, like [WANDB_API_KEY], or NAME: env | env:OTHER | ssm:/path | secretsmanager:name"
            )
        result = {}
        for name, source in value.items():
            if not isinstance(name, str) or not ENV_NAME_PATTERN.match(name):
                raise ValueError(f"{show(name)} is not an environment variable name; use letters, digits and _")
            if name.startswith("GPURUN_"):
                raise ValueError(f"{name}: GPURUN_ names are set by gpurun; pick another name")
            source = "env" if source is None else source
            if not isinstance(source, str) or not SECRET_SOURCE.fullmatch(source):
                # Never shown: a person may have written the value itself here.
                raise ValueError(
                    f"{name}: the source must be env, env:OTHER_NAME, ssm:/parameter/path or secretsmanager:name "
                    "(the value itself never goes in the spec: export it and write env)"
                )
            result[name] = source
        return result

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("run must be the command that starts training, like python train.py")
        if "\x00" in value:
            raise ValueError("run must not contain NUL bytes")
        return value

    @field_validator("setup")
    @classmethod
    def _setup(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("setup must not contain NUL bytes")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        if not value or "\x00" in value or len(value) > 4096:
            raise ValueError(f"{show(value)} is not a directory path, like . or src")
        return value

    @model_validator(mode="after")
    def _provider_needs(self) -> Spec:
        if self.provider == "ssh" and not self.ssh.hosts:
            # "field: message": _format_validation names the field for model-level checks.
            raise ValueError("ssh.hosts: provider ssh needs at least one host to run on, like hosts: [gpu-box]")
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise ValueError(f"secrets: {both[0]} is also in env; keep it in secrets only")
        if self.recovery.max_restarts is None:
            # Spot machines are taken away as a matter of course; elsewhere a restart is asked for.
            # Several nodes are not recovered (ranks would need agreeing again), so no default there.
            spot = self.provider == "aws" and self.aws.spot and self.num_nodes == 1
            self.recovery.max_restarts = 3 if spot else 0
        elif self.recovery.max_restarts > 0 and self.num_nodes > 1:
            raise ValueError(
                f"recovery.max_restarts: recovery of a run with {self.num_nodes} nodes is not supported; "
                "use one node, or recovery: {max_restarts: 0}"
            )
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

    def to_record(self) -> SpecDocument:
        """Plain data for run records: readable without pydantic."""
        data = self.model_dump(mode="json")
        data["workdir"] = str(self.workdir_path)
        return cast(SpecDocument, data)


_MODELS: dict[str, type[BaseModel]] = {
    "": Spec,
    "sync": SyncSpec,
    "checkpoint": CheckpointSpec,
    "aws": AwsSpec,
    "ssh": SshSpec,
    "recovery": RecoverySpec,
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


_MISSING_EXAMPLES = {"name": "name: my-experiment", "run": "run: python train.py"}
_SECTION_EXAMPLES = {
    "sync": "sync: {exclude: [data/]}",
    "env": "env: {KERAS_BACKEND: torch}",
    "checkpoint": "checkpoint: {every: 5m}",
    "aws": "aws: {region: us-east-1}",
    "ssh": "ssh: {hosts: [gpu-box]}",
    "recovery": "recovery: {max_restarts: 3}",
}


def _format_validation(source: str | Any, error: ValidationError) -> str:
    """One line for the first error: file, field, what is accepted.

    `source` is the file name, or a callable that picks it from the error's location
    (so a value that came from --set is blamed on --set).
    """
    errors = error.errors()
    # An unknown key first: a misspelt key also makes its real name "missing".
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    raw_location = tuple(first["loc"])
    location = [label(str(part), 80) for part in raw_location]
    if callable(source):
        source = source(raw_location)
    field = ".".join(location) or "spec"
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        section = ".".join(location[:-1])
        return f"{source}: {field}: unknown key{_did_you_mean(str(raw_location[-1]), _known_keys(section))}"
    if kind == "missing":
        example = _MISSING_EXAMPLES.get(field)
        return f"{source}: {field}: required field is missing" + (f"; add {example}" if example else "")
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        if (
            not location
            and ": " in message
            and message.split(": ", 1)[0] in ("ssh.hosts", "recovery.max_restarts", "secrets")
        ):
            field, message = message.split(": ", 1)
    elif kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        message = f"{show(value)} is not accepted; use one of {expected}"
    elif kind in ("model_type", "dict_type", "model_attributes_type") and field in _SECTION_EXAMPLES:
        message = f"expected a mapping of fields, like {_SECTION_EXAMPLES[field]}; got {show(value)}"
    elif kind == "list_type":
        message = f"expected a list, like [a, b]; got {show(value)}"
    elif kind == "invalid_key":
        message = "keys must be strings"
    else:
        message = message[:1].lower() + message[1:]
        message = f"{message}: {show(value)}" if ", got " in message else f"{message}, got {show(value)}"
    return f"{source}: {field}: {message}"


def _check_unknown_top(source: str, data: dict[str, Any]) -> None:
    for key in data:
        if not isinstance(key, str):
            raise SpecError(
                f"{source}: {show(key)}: keys must be strings, like name or run (quote keys like yes, no, 1)"
            )


_SET_USAGE = "expected FIELD=VALUE, like aws.spot=false"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` as (path, YAML-typed value)."""
    if "=" not in text:
        raise SpecError(f"--set {label(text, 80)}: {_SET_USAGE}")
    path, _, raw = text.partition("=")
    parts = path.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {label(text, 80)}: {_SET_USAGE}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # any YAML that does not read (or reads badly) is taken as text
        value = raw
    if isinstance(value, (dict, list)) and len(raw) > 10_000:
        raise SpecError(f"--set {label(text, 80)}: value too large; put it in the experiment file")
    return parts, value


def apply_override(data: dict[str, Any], text: str) -> None:
    """Apply one `--set a.b=value` to the parsed YAML, before validation."""
    parts, value = parse_override(text)
    where = f"--set {label(text, 80)}"
    if parts[0] in ("env", "secrets"):
        if len(parts) != 2:
            example = "env.KERAS_BACKEND=torch" if parts[0] == "env" else "secrets.WANDB_API_KEY=env"
            raise SpecError(f"{where}: use {parts[0]}.NAME=value, like {example}")
        mapping = data.get(parts[0])
        if mapping is None:
            mapping = data[parts[0]] = {}
        if parts[0] == "secrets" and isinstance(mapping, list):
            mapping = data["secrets"] = {name: "env" for name in mapping if isinstance(name, str)}
        if not isinstance(mapping, dict):
            raise SpecError(f"{where}: {parts[0]} in the experiment file is not a mapping")
        mapping[parts[1]] = value
        return
    section = ""
    target = data
    for depth, part in enumerate(parts):
        known = _known_keys(section)
        field = ".".join(parts[: depth + 1])
        if part not in known:
            raise SpecError(f"{where}: {label(field, 80)}: unknown field{_did_you_mean(part, known)}")
        if depth == len(parts) - 1:
            target[part] = value
            return
        if part not in _MODELS:
            raise SpecError(f"{where}: {field} is a field, not a section; use --set {field}=VALUE")
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{where}: {part} in the experiment file is not a mapping")
        target = child
        section = part
    raise SpecError(f"{where}: {_SET_USAGE}")  # pragma: no cover - the loop always returns


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, override and validate an experiment file."""
    path = Path(path)
    source = label(str(path))
    try:
        if not path.exists():
            raise SpecError(f"{source}: no such experiment file")
        if path.is_dir():
            raise SpecError(f"{source}: is a directory; give the experiment's YAML file")
        if not path.is_file():
            raise SpecError(f"{source}: not a regular file; give the experiment's YAML file")
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: file is larger than 1 MB; an experiment file is a few lines of YAML")
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
        spec_dir = path.resolve().parent
    except (OSError, ValueError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or (str(error).strip() or type(error).__name__).splitlines()[0]
        raise SpecError(f"{source}: cannot read the experiment file: {label(reason, 120)}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: file is larger than 1 MB; an experiment file is a few lines of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise SpecError(f"{source}: line {line}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    data = parse_yaml(source, text)
    origins: dict[tuple[str, ...], str] = {}
    for override in overrides:
        apply_override(data, override)
        origins[tuple(override.partition("=")[0].strip().split("."))] = override

    def blame(location: tuple[Any, ...]) -> str:
        where = tuple(str(part) for part in location)
        for path_set, override in reversed(list(origins.items())):
            size = min(len(where), len(path_set))
            if size and where[:size] == path_set[:size]:
                return f"{source} (--set {label(override, 80)})"
        return source

    return _validate(data, source, spec_dir, blame)


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, max(0, position)) + 1


def parse_yaml(source: str, text: str) -> dict[str, Any]:
    """The YAML document as a dict; every failure is one SpecError line."""
    try:
        # The composed node count bounds alias expansion ("billion laughs").
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None
            if node is not None:
                _check_nodes(source, node)
                try:
                    data = loader.construct_document(node)
                except (yaml.YAMLError, RecursionError, SpecError):
                    raise
                except Exception as error:  # PyYAML's constructors raise plain errors on bad tagged values
                    where = _failing_line(node)
                    raise SpecError(f"{source}:{where}: invalid YAML value: {_construct_problem(error)}") from None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" line {mark.line + 1}" if mark else ""
        problem = (error.problem or error.context or "invalid YAML").strip()
        if problem.startswith("but ") and error.context:
            problem = f"{error.context.strip()} {problem}"
        problem = label(problem, 160)
        raise SpecError(f"{source}:{where}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as error:
        where = f" line {_line_of(text, error.position)}"
        raise SpecError(f"{source}:{where}: invalid YAML: {label(str(error).splitlines()[0], 160)}") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"{source}: invalid YAML: {label(first, 160)}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nested too deeply; an experiment file is a few levels deep") from None
    if data is None:
        raise SpecError(f"{source}: empty experiment file; it needs at least name and run")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields (name:, run:, ...), got {type(data).__name__}")
    _check_unknown_top(source, data)
    return data


def _construct_problem(error: Exception) -> str:
    text = str(error)
    if "integer string conversion" in text:
        return "a number is too long; an experiment file needs no number of more than 4300 digits"
    if isinstance(error, ValueError) and text.strip():
        return f"{label(text.splitlines()[0], 120)} (check values with explicit tags like !!int or !!timestamp)"
    return (
        "a value does not read as its explicit tag (like !!bool, !!int, !!timestamp); remove the tag or fix the value"
    )


def _failing_line(root: yaml.Node) -> str:
    """' line N' of the first scalar that does not construct on its own, or ''."""
    stack = [root]
    seen = 0
    while stack and seen < MAX_YAML_NODES:
        node = stack.pop()
        seen += 1
        if isinstance(node, yaml.ScalarNode):
            loader = yaml.SafeLoader("")
            try:
                loader.construct_object(node, deep=True)
            except Exception:
                return f" line {node.start_mark.line + 1}"
            finally:
                loader.dispose()
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.extend((value, key))
    return ""


def _check_nodes(source: str, root: yaml.Node) -> None:
    """Bound the document's size after alias expansion, and refuse duplicate keys."""
    count = 0
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        current, where = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise SpecError(f"{source}: too many YAML nodes (alias expansion?); an experiment file is small")
        if isinstance(current, yaml.SequenceNode):
            stack.extend((item, where) for item in current.value)
        elif isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    name = key.value
                    field = f"{where}.{name}" if where else name
                    if name in seen:
                        raise SpecError(
                            f"{source}: line {key.start_mark.line + 1}: {label(field, 80)}: "
                            f"duplicate key (first on line {seen[name]}); keep one"
                        )
                    seen[name] = key.start_mark.line + 1
                    child_where = field if len(field) <= 200 else where
                else:
                    child_where = where
                stack.append((key, where))
                stack.append((value, child_where))


def validate_spec(data: dict[str, Any], *, source: str, spec_dir: Path | str) -> Spec:
    """Validate parsed YAML (after overrides) into a Spec; raises SpecError as one line."""
    return _validate(data, label(source), spec_dir, lambda location: label(source))


def _validate(data: dict[str, Any], source: str, spec_dir: Path | str, blame: Callable[[tuple[Any, ...]], str]) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields (name:, run:, ...), got {type(data).__name__}")
    if "spec_dir" in data:
        raise SpecError(f"{source}: spec_dir: unknown key{_did_you_mean('spec_dir', _known_keys(''))}")
    try:
        spec = Spec.model_validate({**data, "spec_dir": str(spec_dir)})
    except ValidationError as error:
        raise SpecError(_format_validation(blame, error)) from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply; an experiment file is a few levels deep") from None
    try:
        workdir = spec.workdir_path
        is_dir = workdir.is_dir()
    except (OSError, ValueError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise SpecError(
            f"{blame(('workdir',))}: workdir: {show(spec.workdir)} cannot be used ({reason}); "
            "give a directory relative to the experiment file, like ."
        ) from None
    if not is_dir:
        raise SpecError(
            f"{blame(('workdir',))}: workdir: {show(spec.workdir)} is not a directory "
            f"(resolved to {label(str(workdir), 200)}); give a directory relative to the experiment file, like ."
        )
    return spec


def spec_from_record(data: Mapping[str, Any]) -> Spec:
    """Rebuild the spec stored in a run record (its workdir is already absolute)."""
    try:
        return Spec.model_validate({**data, "spec_dir": "/"})
    except ValidationError as error:
        raise SpecError(_format_validation("run record", error)) from None
