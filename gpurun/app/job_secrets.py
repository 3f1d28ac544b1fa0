"""`secrets:` of a spec: where each value comes from, and getting it to the job without a trace.

A value from this computer's environment is read at launch and sent to the
machine on the stdin of one command, into `<run_dir>/secrets.env` (0600); an
`ssm:` or `secretsmanager:` reference is resolved on the machine itself, with
its own credentials (the run's instance role on AWS), into the same file. The
job script sources that file. Only names and references are ever recorded;
values stay out of records, the store, logs, `--json`, the plan and errors.
"""

from __future__ import annotations

import json
import os

from gpurun import jobs
from gpurun.errors import BadInput, GpurunError, TransportError
from gpurun.models import RunRecord
from gpurun.spec import SECRET_LIKE_NAME, Spec, label
from gpurun.transport.base import Transport


def _env_name(name: str, source: str) -> str:
    return source.split(":", 1)[1] if source.startswith("env:") else name


def local_values(secrets: dict[str, str]) -> dict[str, str]:
    """The values that come from this computer's environment; BadInput naming a missing one."""
    values = {}
    for name, source in secrets.items():
        if source == "env" or source.startswith("env:"):
            variable = _env_name(name, source)
            value = os.environ.get(variable)
            if value is None:
                raise BadInput(
                    f"secrets.{name}: {variable} is not set in this computer's environment; export it and launch again"
                )
            values[name] = value
    return values


def machine_references(secrets: dict[str, str]) -> dict[str, str]:
    """NAME -> ssm:/path or secretsmanager:name, resolved on the machine."""
    return {name: source for name, source in secrets.items() if not (source == "env" or source.startswith("env:"))}


def describe(secrets: dict[str, str]) -> str:
    """The plan's line: names and where their values come from, never the values."""
    parts = []
    for name, source in sorted(secrets.items()):
        where = f"${_env_name(name, source)} here" if source == "env" or source.startswith("env:") else source
        parts.append(f"{name} ({where})")
    return ", ".join(parts) or "-"


# A switch is no secret: TOKENIZERS_PARALLELISM=false, USE_KEY_CACHE=1.
_SWITCH_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off"})


def secret_like_env(spec: Spec) -> list[str]:
    """`env:` keys named like credentials (KEY, TOKEN, SECRET, PASSWORD) whose value is not a mere switch."""
    return sorted(
        name
        for name, value in spec.env.items()
        if SECRET_LIKE_NAME.search(name) and value.strip().lower() not in _SWITCH_VALUES
    )


def install(
    transport: Transport,
    run_dir: str,
    record: RunRecord,
    values: dict[str, str],
    python: str | None,
) -> None:
    """Write the run's secrets file on the machine: this computer's values, then the machine's references."""
    spec = record["spec"]
    references = machine_references(spec.get("secrets") or {})
    jobs.write_secrets(transport, run_dir, values)
    if not references:
        return
    if not python:
        raise TransportError("resolving secrets on the machine needs gpurun's agent environment there")
    request = json.dumps(
        {"file": jobs.secrets_path(run_dir), "region": spec.get("aws", {}).get("region"), "references": references}
    ).encode()
    result = transport.run(f"{python} -m gpurun.agent.resolve_secrets", input=request, timeout=120)
    if not result.ok:
        # The resolver's own message names the reference and the AWS error, never a value.
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        last = label(detail[-1], 400) if detail else f"exit status {result.exit_code}"
        raise GpurunError(f"resolving secrets on {transport.label} failed: {last}")
