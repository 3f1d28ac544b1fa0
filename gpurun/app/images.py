"""`gpurun image create | list | delete`: bake a live aws run's machine into an AMI, and manage those AMIs.

`create` never stops the machine. It pauses the job and the agent for the
moments around CreateImage (NoReboot), while the run's directory, shell
history, secrets and the run's SSH key are moved off the root disk into a
tmpfs on the machine (`image_prep.py`), then puts everything back and lets
them continue. The image is kept only if the machine confirms the files were
still hidden when CreateImage returned; any failure or Ctrl-C after
CreateImage deregisters the image and deletes its snapshots.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpurun import jobs, paths, runs
from gpurun.app import common, connections
from gpurun.app.reporter import Reporter
from gpurun.errors import BadInput, GpurunError, Interrupted, InvalidDocument, TransportError
from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import capabilities_of
from gpurun.setup_hash import MAX_FILE_BYTES, setup_hash
from gpurun.store import documents

if TYPE_CHECKING:
    from gpurun.providers.aws import AwsProvider
    from gpurun.providers.aws.images import GpurunImage
    from gpurun.providers.aws.session import Aws
    from gpurun.transport.base import Transport

#: Seconds the machine keeps the files hidden (job paused) before putting them back by itself.
STASH_DEADLINE = 180
#: How long moving the run's files out (or back) may take over SSH.
MOVE_TIMEOUT = 1800
#: Shell history and similar files under the login's home that never go into an image.
HISTORY_FILES = (
    ".bash_history",
    ".zsh_history",
    ".python_history",
    ".lesshst",
    ".viminfo",
    ".wget-hsts",
    ".local/share/fish/fish_history",
    ".psql_history",
    ".mysql_history",
)
# A lone stdlib script the machine runs (beside bootstrap.py, outside app/: it parses what the
# laptop sends with its own copy of the documents' strictness, since gpurun is not on the machine).
_PREP_SCRIPT = Path(__file__).parent.parent / "image_prep.py"
STASH_PATH = re.compile(r"/[A-Za-z0-9._/-]{1,200}/gpurun-image-[A-Za-z0-9_]{1,40}")


def _provider() -> AwsProvider:
    from gpurun.providers.aws import AwsProvider

    return AwsProvider()


def _session(provider: AwsProvider, region: str | None, profile: str | None) -> Aws:
    from gpurun.providers.aws.provider import default_region

    return provider.session(region or default_region(profile), profile)


def _aws_record(run: str) -> RunRecord:
    record = runs.load(run)
    if not capabilities_of(record).bakes_images:
        raise BadInput(f"run {run} runs on provider {record['provider']}: only aws runs can be baked into an image")
    if record["state"] == "ended":
        raise BadInput(f"run {run} has ended; its machine is gone")
    if not record.get("machines") or not record["machines"][0].get("instance_id"):
        raise BadInput(f"run {run} has no machine yet")
    return record


def _remote_reader(transport: Transport, work_dir: str) -> Any:
    def read(path: str) -> bytes | None:
        quoted = shlex.quote(path)
        result = transport.run(
            f"cd {shlex.quote(work_dir)} && [ -f {quoted} ] && head -c {MAX_FILE_BYTES + 1} -- {quoted} | base64",
            timeout=60,
        )
        if not result.ok:
            return None
        return base64.b64decode(result.stdout)

    return read


def _key_blob(machine: Machine) -> str | None:
    """The run's public key (base64 part), as cloud-init put it into ~/.ssh/authorized_keys."""
    key_path = machine.get("key_path")
    if not key_path:
        return None
    try:
        fields = Path(f"{key_path}.pub").read_text().split()
    except OSError:
        return None
    return fields[1] if len(fields) >= 2 else None


def create(run: str, ui: Reporter, *, name: str | None = None) -> dict[str, Any]:
    from gpurun.app.launch import sigint_deferred
    from gpurun.providers.aws import images as ec2_images
    from gpurun.providers.aws.provider import _location
    from gpurun.providers.aws.teardown import describe_by_ids

    runs.check_name(run)
    record = _aws_record(run)
    machine = record["machines"][0]
    instance_id = machine["instance_id"]
    image_name = ec2_images.check_name(name or f"{run}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    provider = _provider()
    region, profile = _location(record)
    aws = provider.session(region, profile)
    provider.check_access(record)
    described = describe_by_ids(aws, [instance_id]).get(instance_id)
    state = described["State"]["Name"] if described else "gone"
    if state != "running":
        raise BadInput(f"run {run}: its machine {instance_id} is {state}, not running; nothing was created")
    if ec2_images.find_image(aws, image_name) is not None:
        raise BadInput(f"an image named {image_name} exists in {region}; pick another --name or delete it first")

    if not machine.get("host"):
        # A recovering run's replacement machine: its address is known to EC2, not yet to the record.
        machine = machine.copy()
        machine["host"] = (described or {}).get("PublicIpAddress")
        if not machine["host"]:
            raise BadInput(f"run {run}: its machine {instance_id} has no public address; nothing was created")
    transport = connections.open_transport(record, machine)
    try:
        home = transport.check('printf %s "$HOME"', what="finding the home directory").strip()
        # The machines of a recovering run set themselves up: the record may not name the directory.
        machine = machine.copy()
        machine["run_dir"] = machine.get("run_dir") or f"{home}/{paths.machine_run_dir(run)}"
        job_state = jobs.read_state(transport, machine["run_dir"])
        setup = record["spec"].get("setup")
        if setup and job_state["phase"] != "run":
            phase = job_state["phase"] or "not started"
            raise BadInput(f"run {run}: setup has not finished (phase: {phase}); bake the image after it succeeds")
        wanted, hashed = setup_hash(setup, _remote_reader(transport, common.work_dir(machine)))
        plan = {
            "run_dir": machine["run_dir"],
            "pid_files": [f"{machine['run_dir']}/job.pid", f"{machine['run_dir']}/agent.pid"],
            "paths": [f"{home}/{history}" for history in HISTORY_FILES],
            "authorized_keys": [f"{home}/.ssh/authorized_keys"],
            "key_blobs": [blob for blob in [_key_blob(machine)] if blob],
            "secret_words": ["secret", jobs.SECRETS_FILE],
            "deadline": STASH_DEADLINE,
        }
        stashed = _stash(transport, plan)
    except TransportError as error:
        transport.close()
        raise GpurunError(
            f"run {run}: cannot prepare its machine for an image ({error}); nothing was created"
        ) from None
    except KeyboardInterrupt:
        transport.close()
        raise Interrupted(
            f"image create of {run} interrupted while hiding the run's files; nothing was created; the machine "
            f"puts them back and lets the job continue by itself within {STASH_DEADLINE}s"
        ) from None
    except BaseException:
        transport.close()
        raise
    source_ami = str(described.get("ImageId") or "") if described else ""
    tags = ec2_images.image_tags(image_name, run, record.get("owner") or "unknown", source_ami, wanted)
    image_id: str | None = None
    restored = False
    try:
        ui.say(
            f"hid {stashed['moved'] + stashed['truncated']} files of {run} and {stashed['keys_removed']} SSH key(s) "
            f"from the disk; the job is paused for CreateImage"
        )
        image_id = ec2_images.create_image(
            aws, instance_id, image_name, tags, f"gpurun image of run {run} (setup hash {wanted[:12]})"
        )
        answer = _restore(transport, stashed["stash"])
        restored = True
        if answer.get("by") != "request":
            raise GpurunError(
                f"the machine put the run's files back before CreateImage returned (after {STASH_DEADLINE}s); "
                "the image could hold them and was removed: try again"
            )
        for problem in answer.get("problems") or []:
            ui.warn(f"putting files back on the machine: {problem}")
        ui.say(f"the job continues; image {image_id} ({image_name}) registered")
        snapshots = ec2_images.tag_snapshots(aws, image_id, tags)
        with ui.spinner(f"image {image_id} pending") as update:
            image = ec2_images.wait_available(aws, image_id, update, poll=provider.poll_interval, sleep=provider.sleep)
    except BaseException as error:
        with sigint_deferred():
            removed = _undo(aws, ec2_images, image_id, image_name)
            if not restored:
                try:
                    _restore(transport, stashed["stash"])
                except GpurunError as restore_error:
                    ui.error(f"could not put the run's files back: {restore_error}; the machine does so by itself")
        outcome = f"removed {', '.join(removed)}" if removed else "no image was left"
        if isinstance(error, (KeyboardInterrupt, Interrupted)):
            raise Interrupted(f"image create of {run} interrupted; {outcome}; the machine keeps running") from None
        if isinstance(error, GpurunError):
            error.args = (f"image create of {run} failed: {error}; {outcome}; the machine keeps running",)
            raise
        raise
    finally:
        transport.close()
    result = image.as_dict()
    result["snapshots"] = snapshots or image.snapshots
    result["setup_files"] = hashed
    result["run"] = run
    return result


def _stash(transport: Transport, plan: dict[str, Any]) -> dict[str, Any]:
    command = (
        'umask 077; f=$(mktemp "${TMPDIR:-/tmp}/gpurun-image-prep.XXXXXX") || exit 1; '
        f'cat > "$f"; python3 "$f" stash {shlex.quote(json.dumps(plan))}; code=$?; rm -f "$f"; exit $code'
    )
    # Moving a large checkpoint directory to the tmpfs takes about a second per GB.
    result = transport.run(command, input=_PREP_SCRIPT.read_bytes(), timeout=MOVE_TIMEOUT)
    answer = _last_json(result.stdout)
    if not result.ok or answer is None or "stash" not in answer:
        why = (
            str((answer or {}).get("error") or "")
            or (result.stderr or result.stdout).decode("utf-8", "replace").strip()
        )
        raise TransportError(
            f"hiding the run's files failed: {why.splitlines()[-1][:300] if why else result.exit_code}"
        )
    # What the machine says is untrusted: a directory of our naming, and counts.
    if not isinstance(answer["stash"], str) or not STASH_PATH.fullmatch(answer["stash"]):
        raise TransportError(
            f"hiding the run's files: the machine named an unexpected stash {str(answer['stash'])[:80]!r}"
        )
    counts = {key: answer.get(key) for key in ("moved", "truncated", "keys_removed")}
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in counts.values()):
        raise TransportError("hiding the run's files: the machine's answer is not understood")
    return {"stash": answer["stash"], **counts}


def _restore(transport: Transport, stash: str) -> dict[str, Any]:
    command = f"python3 - restore {shlex.quote(stash)}"
    try:
        result = transport.run(command, input=_PREP_SCRIPT.read_bytes(), timeout=MOVE_TIMEOUT)
    except TransportError as error:
        raise GpurunError(f"putting the run's files back failed: {error}") from None
    answer = _last_json(result.stdout)
    if not result.ok or answer is None:
        detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
        raise GpurunError(f"putting the run's files back failed: {detail[-1][:300] if detail else result.exit_code}")
    return answer


def _last_json(output: bytes) -> dict[str, Any] | None:
    """image_prep.py's last answer line, checked by its schema; lines of other output before it are skipped.

    A line that starts an object but is too big, too deep or of the wrong types is
    InvalidDocument naming the machine's answer, never a crash further on.
    """
    for line in reversed(output.splitlines()):
        if not line.lstrip().startswith(b"{"):
            continue
        try:
            return documents.read(
                line, documents.PrepAnswer, name="the machine's answer", limit=documents.PREP_ANSWER_LIMIT
            )
        except InvalidDocument as error:
            if error.reason != "not valid JSON":
                raise
    return None


def _undo(aws: Aws, ec2_images: Any, image_id: str | None, image_name: str) -> list[str]:
    """Deregister the image this create made (found by name when the id never came back)."""
    try:
        if image_id is None:
            found = ec2_images.find_image(aws, image_name)
            if found is None:
                return []
            image_id = found.id
        return list(ec2_images.delete_image(aws, image_id))
    except Exception as error:  # report, never hide the first error
        return [f"nothing: removing {image_id or image_name} failed ({error}); `gpurun image delete {image_name}`"]


def list_images(*, region: str | None = None, profile: str | None = None) -> list[GpurunImage]:
    from gpurun.providers.aws import images as ec2_images
    from gpurun.providers.aws.session import check_identity

    aws = _session(_provider(), region, profile)
    check_identity(aws)
    return list(ec2_images.list_images(aws, with_sizes=True))


def find_for_delete(names: list[str], *, region: str | None, profile: str | None) -> tuple[Aws, list[GpurunImage]]:
    """Every named gpurun image, or BadInput naming the first that does not exist (nothing touched)."""
    from gpurun.providers.aws import images as ec2_images
    from gpurun.providers.aws.session import check_identity

    if not names:
        raise BadInput("image delete needs image NAMEs (`gpurun image list` shows them)")
    for name in names:
        ec2_images.check_name(name)
    aws = _session(_provider(), region, profile)
    check_identity(aws)
    found = []
    for name in dict.fromkeys(names):
        image = ec2_images.find_image(aws, name)
        if image is None:
            raise BadInput(f"no gpurun image named {name} in {aws.region}; nothing was deleted")
        found.append(image)
    used = ec2_images.used_by_groups(aws)
    for image in found:
        if used.get(image.id):
            runs_text = ", ".join(used[image.id])
            raise BadInput(
                f"image {image.name} is what run {runs_text} boots its replacement machines from; "
                f"tear the run down first (`gpurun teardown {used[image.id][0]}`); nothing was deleted"
            )
    return aws, found


def delete(aws: Aws, images: list[GpurunImage]) -> list[str]:
    from gpurun.providers.aws import images as ec2_images

    removed: list[str] = []
    for image in images:
        removed += ec2_images.delete_image(aws, image.id, image.snapshots)
    return removed
