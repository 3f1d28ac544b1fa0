"""On the machine: resolve `ssm:` and `secretsmanager:` references into the run's secrets file.

Reads {"file", "region", "references": {NAME: "ssm:/path" | "secretsmanager:name"}}
on stdin, fetches each value with the machine's own credentials (the run's
instance role on AWS), and appends `export NAME=value` lines to the file,
which stays 0600. Messages name the reference and the AWS error code; a value
is never printed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any


def _fetch(reference: str, region: str | None) -> str:
    import boto3

    kind, _, name = reference.partition(":")
    if kind == "ssm":
        parameter = boto3.client("ssm", region_name=region).get_parameter(Name=name, WithDecryption=True)
        return str(parameter["Parameter"]["Value"])
    secret = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=name)
    if "SecretString" in secret:
        return str(secret["SecretString"])
    raise ValueError("it is a binary secret; store it as a string")


def _why(error: Exception) -> str:
    response: Any = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(error).__name__ if not isinstance(error, ValueError) else str(error)


def resolve_into(path: str, region: str | None, references: dict[str, str]) -> str | None:
    """Append `export NAME=value` for each reference to the 0600 file at `path`; None when done,
    else the one line that says which reference failed (never a value). Machines that
    bootstrap themselves (recovery on AWS) call this too."""
    lines = []
    for name, reference in sorted(references.items()):
        try:
            value = _fetch(reference, region)
        except Exception as error:  # any failure: name the reference, never a value
            return f"secrets.{name}: cannot read {reference} ({_why(error)})"
        if "\x00" in value:
            return f"secrets.{name}: {reference} holds a NUL byte, which an environment cannot carry"
        lines.append(f"export {name}={shlex.quote(value)}\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write("".join(lines))
    return None


def main() -> int:
    request = json.loads(sys.stdin.read())
    problem = resolve_into(request["file"], request.get("region"), request["references"])
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
