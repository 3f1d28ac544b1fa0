"""Small pieces the workflows share: store of a run, machine layout, agent arguments."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from gpurun import jobs, paths
from gpurun.errors import BadInput
from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import capabilities
from gpurun.store import open_store
from gpurun.store.base import ObjectStore

if TYPE_CHECKING:
    from gpurun.spec import Spec

MASTER_PORT_BASE = 29500


def master_port(run: str) -> int:
    """A port per run (29500-29999): two runs on one box must not fight over torchrun's default."""
    import zlib

    return MASTER_PORT_BASE + zlib.crc32(run.encode()) % 500


def store_url_for(spec: Spec) -> str:
    url = spec.checkpoint.store
    if capabilities(spec.provider).machines_disposable and (url is None or not url.startswith("s3://")):
        raise BadInput(
            f"checkpoint.store: provider {spec.provider} needs an s3:// store (the machine's disk goes with it), "
            "like s3://my-bucket/gpurun"
        )
    return url or paths.default_store_url()


def store_options(record_or_spec: RunRecord | Spec) -> dict[str, Any]:
    if isinstance(record_or_spec, dict):
        spec = record_or_spec.get("spec", {})
        aws = spec.get("aws", {})
        url = record_or_spec.get("store", "")
        region, profile = aws.get("region"), aws.get("profile")
    else:
        url = record_or_spec.checkpoint.store or ""
        region, profile = record_or_spec.aws.region, record_or_spec.aws.profile
    if url.startswith("s3://"):
        return {"region": region, "profile": profile}
    return {}


def open_run_store(record: RunRecord) -> ObjectStore:
    return open_store(record["store"], **store_options(record))


def work_dir(machine: Machine) -> str:
    return f"{machine['run_dir']}/work"


def checkpoint_dir(record: RunRecord, machine: Machine) -> str:
    return f"{work_dir(machine)}/{record['spec']['checkpoint']['dir']}"


def agent_arguments(record: RunRecord, machine: Machine, *, once: bool = False) -> list[str]:
    spec = record["spec"]
    arguments = [
        "--watch",
        checkpoint_dir(record, machine),
        "--to",
        record["store"],
        "--run",
        agent_run_name(record, machine),
        "--every",
        str(spec["checkpoint"]["every"]),
        "--keep",
        str(spec["checkpoint"]["keep"]),
        "--run-dir",
        machine["run_dir"],
    ]
    if capabilities(record["provider"]).spot_notice and spec["aws"].get("spot"):
        arguments.append("--spot-notice")
    if record["store"].startswith("s3://") and spec.get("aws", {}).get("region"):
        arguments += ["--region", spec["aws"]["region"]]
    listed = record.get("jobs")
    if (
        isinstance(listed, list)
        and listed
        and isinstance(listed[-1], dict)
        and isinstance(listed[-1].get("number"), int)
    ):
        arguments += ["--job", str(listed[-1]["number"])]
    if once:
        arguments.append("--once")
    return arguments


def max_restarts(record: RunRecord) -> int:
    """The run's restart budget (0: recovery off; a record from before recovery has none)."""
    value = record.get("spec", {}).get("recovery", {}).get("max_restarts")
    return value if isinstance(value, int) and value > 0 else 0


def job_restarts(record: RunRecord, machine: Machine, python: str | None) -> jobs.Restarts | None:
    """How the job's wrapper restarts a lost job on this machine; None with recovery off."""
    if not python or max_restarts(record) <= 0:
        return None
    return jobs.Restarts(
        max_restarts=max_restarts(record),
        on_failure=bool(record["spec"].get("recovery", {}).get("on_failure")),
        checkpoint_dir=checkpoint_dir(record, machine),
        restore=agent_command(python, restore_arguments(record, machine)),
    )


def restore_arguments(record: RunRecord, machine: Machine) -> list[str]:
    """The agent's arguments that put this run's LATEST into the machine's checkpoint directory."""
    arguments = ["--to", record["store"], "--restore-from", agent_run_name(record, machine)]
    # --force: the dead job's files are replaced by the snapshot's (kept beside the directory).
    arguments += ["--into", checkpoint_dir(record, machine), "--force"]
    region = store_options(record).get("region")
    if region:
        arguments += ["--region", region]
    return arguments


def rank_run_name(run: str, rank: int | None) -> str:
    """Rank 0 writes under the run; with checkpoint.nodes=all, other ranks write under <run>/rank-K."""
    return run if not rank else f"{run}/rank-{rank}"


def agent_run_name(record: RunRecord, machine: Machine) -> str:
    return rank_run_name(str(record["run"]), machine.get("rank", 0))


def agent_machines(record: RunRecord) -> list[Machine]:
    machines: list[Machine] = record.get("machines", [])
    if record["spec"]["checkpoint"].get("nodes") == "all":
        return machines
    return machines[:1]


def job_environment(record: RunRecord, machine: Machine, resume_from: str | None) -> dict[str, str]:
    spec = record["spec"]
    machines = record.get("machines", [])
    ips = [m.get("private_ip") or m.get("host") for m in machines]
    env: dict[str, Any] = dict(spec.get("env", {}))  # the master's address as before, even when unknown
    env.update(
        {
            "GPURUN_RUN": record["run"],
            "GPURUN_CHECKPOINT_DIR": checkpoint_dir(record, machine),
            "GPURUN_NODE_RANK": str(machine.get("rank", 0)),
            "GPURUN_NUM_NODES": str(len(machines) or 1),
            "GPURUN_MASTER_ADDR": ips[0] if ips else "127.0.0.1",
            "GPURUN_MASTER_PORT": str(master_port(record["run"])),
            "GPURUN_NODE_IPS": ",".join(ip for ip in ips if ip),
            "PYTHONUNBUFFERED": "1",
        }
    )
    listed = record.get("jobs")
    if isinstance(listed, list) and listed and isinstance(listed[-1], dict):
        env["GPURUN_JOB"] = str(listed[-1].get("number"))
    # A local run's venv (PATH, VIRTUAL_ENV); see app/local_python.py.
    extra = record.get("job_env")
    if isinstance(extra, dict):
        env.update({str(key): str(value) for key, value in extra.items()})
    if resume_from:
        env["GPURUN_RESUME_FROM"] = resume_from
    return env


def agent_command(python: str, arguments: list[str]) -> str:
    return f"{python} -m gpurun.agent " + " ".join(shlex.quote(a) for a in arguments)
