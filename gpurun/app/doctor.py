"""`gpurun doctor [SPEC]`: is everything a launch of SPEC needs in place? Checked, never created.

Each check answers pass, warn (a launch works, but read this), fail (with the
fix) or skip (it depends on a check that failed). Only read-only calls are
made, through the same functions `launch` uses (credentials via STS, the AMI,
the instance types, the network, the caller's IP). The one write is the
probe launch also makes before it creates anything: a small object put under
the checkpoint store's prefix and deleted right after (a temporary file for a
`file://` store that already exists). Nothing is tagged, rented or kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpurun.errors import BadInput, GpurunError, NoSuchBucket, UnknownRegion
from gpurun.providers.capabilities import capabilities

if TYPE_CHECKING:
    from gpurun.providers.aws.instance_types import TypeInfo
    from gpurun.providers.aws.session import Aws
    from gpurun.spec import Spec
    from gpurun.ssh_config import SshTarget

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
MIN_PYTHON = (3, 10)  # the checkpoint agent's floor on a machine (gpurun.app.agent_install.MIN_PYTHON)

# What an SSH host must offer: python3 (3.10+, with venv) for the agent, tar for the code, nvidia-smi for GPUs.
_HOST_PROBE = r"""
if command -v python3 >/dev/null 2>&1; then
  python3 -c 'import sys; print("python=%d.%d" % sys.version_info[:2])' 2>/dev/null
  python3 -c 'import venv' >/dev/null 2>&1 && echo venv=yes
fi
command -v tar >/dev/null 2>&1 && echo tar=yes
if command -v nvidia-smi >/dev/null 2>&1; then
  echo nvidia-smi=yes
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'
fi
exit 0
"""


@dataclass
class Check:
    check: str
    result: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (PASS, WARN)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "result": self.result, "detail": self.detail, "fix": self.fix or None}

    def shown(self) -> str:
        """The DETAIL / FIX column: what was found, and for a failure what to do."""
        if self.fix and self.result in (FAIL, WARN):
            return f"{self.detail}. FIX: {self.fix}"
        return self.detail


def _message(error: BaseException) -> str:
    """One line for an error: gpurun's own as written, anything else with its kind."""
    if isinstance(error, GpurunError):
        return str(error)
    import botocore.exceptions

    from gpurun.providers.aws.session import client_error_message

    text = client_error_message(error)
    if not isinstance(error, botocore.exceptions.ClientError):
        text = f"{type(error).__name__}: {text}"
    return (text.strip().splitlines() or ["failed"])[0]


def split_fix(message: str, default_fix: str) -> tuple[str, str]:
    """gpurun's messages read "what is wrong; what to do": cut them at the last "; " outside
    brackets (what is wrong may itself list causes, "(a: refused; b: timed out)")."""
    depth, cut = 0, -1
    for index, char in enumerate(message):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char == ";" and depth == 0 and message[index + 1 : index + 2] == " ":
            cut = index
    if cut > 0 and message[cut + 2 :].strip():
        return message[:cut].strip(), message[cut + 2 :].strip()
    return message.strip(), default_fix


class Doctor:
    def __init__(self, on_check: Callable[[Check], None] | None = None) -> None:
        self.checks: list[Check] = []
        self.on_check = on_check

    def add(self, check: str, result: str, detail: str, fix: str = "") -> Check:
        item = Check(check, result, detail, fix)
        self.checks.append(item)
        if self.on_check is not None:
            self.on_check(item)
        return item

    def failed(self, check: str, error: BaseException | str, default_fix: str) -> Check:
        detail, fix = split_fix(str(error), default_fix)
        return self.add(check, FAIL, detail, fix)

    # -- this computer -------------------------------------------------------------------------

    def ssh_client(self) -> None:
        path = shutil.which("ssh")
        if path is None:
            self.add(
                "ssh client",
                FAIL,
                "no `ssh` program on PATH (`gpurun ssh` and `gpurun tunnel` run it)",
                "install the OpenSSH client (Debian/Ubuntu: apt install openssh-client; Fedora: dnf install openssh-clients)",
            )
            return
        try:
            answer = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
            version = (answer.stderr or answer.stdout).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            version = "version unknown"
        self.add("ssh client", PASS, f"{path} ({version})")

    def tar(self) -> None:
        path = shutil.which("tar")
        if path is None:
            self.add(
                "tar",
                FAIL,
                "no `tar` program on PATH (the code is sent to the machine as a tar stream)",
                "install tar (Debian/Ubuntu: apt install tar)",
            )
        else:
            self.add("tar", PASS, path)

    def python(self) -> None:
        version = ".".join(str(part) for part in sys.version_info[:3])
        if sys.version_info[:2] < MIN_PYTHON:
            self.add(
                "python",
                FAIL,
                f"{sys.executable} is Python {version}",
                f"run gpurun with Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
            )
        else:
            self.add("python", PASS, f"{sys.executable} (Python {version}; runs the job's checkpoint agent)")

    # -- AWS -------------------------------------------------------------------------------------

    def aws_session(self, region: str, profile: str | None, region_source: str = "") -> Aws | None:
        """Region and credentials; the session for later checks, or None when either failed."""
        from gpurun.providers.aws.session import check_identity, make_session, profile_label

        region_text = f"{region}{region_source}"
        try:
            aws = make_session(region, profile)
        except BadInput as error:
            if isinstance(error, UnknownRegion):
                self.failed("aws region", error, "set aws.region to a region such as us-east-1")
                self.add("aws credentials", SKIP, "not checked: needs a valid region")
                return None
            try:  # the profile is the problem; the region can still be judged without it
                make_session(region, None)
                self.add("aws region", PASS, region_text)
            except BadInput as region_error:
                self.failed("aws region", region_error, "set aws.region to a region such as us-east-1")
            self.failed("aws credentials", error, "run `aws configure`")
            return None
        self.add("aws region", PASS, region_text)
        try:
            identity = check_identity(aws)
        except Exception as error:
            self.failed("aws credentials", _message(error), "run `aws configure` or `aws sso login`")
            return None
        self.add(
            "aws credentials",
            PASS,
            f"account {identity.account}, {identity.arn} ({profile_label(profile)})",
        )
        return aws

    def aws_launch(self, aws: Aws | None, spec: Spec) -> None:
        """Network, instance types, AMI: what `prepare` looks up before a launch creates anything."""
        from gpurun.providers.aws.images import resolve_spec_ami
        from gpurun.providers.aws.instance_types import describe_types, zones_offering
        from gpurun.providers.aws.network import find_subnets

        settings = spec.aws
        names = list(dict.fromkeys(settings.instance_type))
        if aws is None:
            for check in ["aws network", *(f"instance type {name}" for name in names), "AMI"]:
                self.add(check, SKIP, "not checked: needs AWS credentials and a region")
            return

        zones: list[str] = []
        try:
            vpc_id, subnets = find_subnets(aws, subnet_id=settings.subnet_id, vpc_id=settings.vpc_id)
            zones = [subnet.zone for subnet in subnets]
            self.add("aws network", PASS, f"{vpc_id}, {len(subnets)} subnet(s) in {', '.join(zones)}")
        except Exception as error:
            self.failed("aws network", _message(error), "set aws.subnet_id to a subnet in a VPC with internet access")

        try:
            offered = zones_offering(aws, names) if not settings.subnet_id else {}
        except Exception:
            offered = {}  # only used to warn about a type no zone offers
        arches: list[str] = []
        infos: list[TypeInfo] = []
        for name in names:
            check = f"instance type {name}"
            try:
                info = describe_types(aws, [name])[name]
            except Exception as error:
                self.failed(check, _message(error), "use a type such as g5.xlarge or g6.xlarge")
                continue
            infos.append(info)
            if info.arch not in arches:
                arches.append(info.arch)
            detail = info.describe()
            if settings.spot and not info.spot_supported:
                self.add(check, FAIL, f"{detail}; not offered as spot", "set aws.spot=false or pick another type")
                continue
            in_zones = sorted(offered.get(name, set()) & set(zones)) if offered and zones else []
            if offered and zones and not in_zones:
                self.add(
                    check,
                    WARN,
                    f"{detail}; not offered in any zone of the network ({', '.join(zones)})",
                    "list another type after it in aws.instance_type, or set aws.subnet_id to a zone that offers it",
                )
            elif not info.has_gpu:
                self.add(check, WARN, f"{detail}", "pick a GPU type such as g5.xlarge unless a CPU machine is meant")
            else:
                where = f"; offered in {len(in_zones)} zone(s)" if in_zones else ""
                self.add(check, PASS, detail + where)

        self.vcpu_quotas(aws, spec, infos)
        assumed = ""
        if not arches:
            arches, assumed = ["x86_64"], " (x86_64 assumed: no instance type could be checked)"
        for arch in arches:
            check = "AMI" if len(arches) == 1 else f"AMI ({arch})"
            try:
                ami, choice = resolve_spec_ami(aws, spec, arch)
            except Exception as error:
                self.failed(
                    check,
                    _message(error),
                    "set aws.ami to dlami-pytorch, dlami-base or an ami-... that exists in the region",
                )
                continue
            date = ami.created[:10] if ami.created else "date unknown"
            detail = f"{ami.id} {ami.name}, created {date} ({ami.source}){assumed}"
            if choice is not None:
                detail += f"; {choice.reason}"
            if ami.snapshot_gb and settings.disk_gb < ami.snapshot_gb:
                self.add(
                    check,
                    FAIL,
                    f"{detail}; its root snapshot ({ami.snapshot_gb} GB) is larger than aws.disk_gb={settings.disk_gb}",
                    f"set aws.disk_gb to at least {ami.snapshot_gb}",
                )
            else:
                self.add(check, PASS, detail)

    def vcpu_quotas(self, aws: Aws, spec: Spec, infos: list[TypeInfo]) -> None:
        """The per-family vCPU quota (Service Quotas) against what the launch needs.

        New accounts often have 0 vCPUs for G and P: quotas stop more first launches
        than anything else. Failover launches one type, so a family needs its largest.
        """
        from gpurun.providers.aws.requests import quota_for

        settings = spec.aws
        market = "spot" if settings.spot else "on-demand"
        needs: dict[tuple[str, str | None], tuple[int, str]] = {}
        for info in infos:
            if not info.vcpus:
                continue
            key = quota_for(info.name, settings.spot)
            need = info.vcpus * settings.nodes
            if key not in needs or needs[key][0] < need:
                needs[key] = (need, f"{info.name} x{settings.nodes}")
        console = f"https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas (region {aws.region})"
        for (name, code), (need, what) in needs.items():
            check = f"vCPU quota: {name}"
            if code is None:
                self.add(
                    check, WARN, f"{what} needs {need} vCPUs ({market}); its quota code is not known here", console
                )
                continue
            try:
                answer = aws.client("service-quotas").get_service_quota(ServiceCode="ec2", QuotaCode=code)
                limit = float(answer["Quota"]["Value"])
            except Exception as error:
                self.add(
                    check,
                    WARN,
                    f"could not read quota {code} ({_message(error)}); {what} needs {need} vCPUs",
                    f"allow servicequotas:GetServiceQuota, or look it up: {console}",
                )
                continue
            shown = f"{limit:g} vCPUs in {aws.region} ({code}); {what} needs {need}"
            if limit < need:
                self.add(
                    check,
                    FAIL,
                    shown,
                    f"aws service-quotas request-service-quota-increase --region {aws.region} --service-code ec2 "
                    f"--quota-code {code} --desired-value {need}",
                )
            else:
                self.add(check, PASS, shown + " (running instances of the family count against it too)")

    def caller_ip(self, ssh_cidr: str) -> None:
        from gpurun.providers.aws.network import resolve_cidr
        from gpurun.providers.aws.requests import is_open_to_world

        check = "caller IP (aws.ssh_cidr)"
        try:
            cidr, source = resolve_cidr(ssh_cidr)
        except (GpurunError, ValueError) as error:
            self.failed(check, error, "set it with --set aws.ssh_cidr=<your-ip>/32 (or GPURUN_IP_ECHO_URLS)")
            return
        if is_open_to_world(cidr):
            self.add(
                check,
                WARN,
                f"SSH would be open to the whole internet ({cidr}, {source})",
                "use aws.ssh_cidr=auto or your own /32",
            )
        else:
            self.add(check, PASS, f"SSH allowed from {cidr} only ({source})")

    # -- the checkpoint store ----------------------------------------------------------------------

    def store(self, spec: Spec, credentials_ok: bool | None) -> None:
        from gpurun.app.common import store_url_for

        check = "checkpoint store"
        try:
            url = store_url_for(spec)
        except BadInput as error:
            self.failed(check, error, "set checkpoint.store to s3://bucket/prefix")
            return
        if url.startswith("s3://"):
            if credentials_ok is False:
                self.add("checkpoint bucket", SKIP, f"{url}: not checked: needs AWS credentials")
                return
            self._s3_store(url, spec.aws.region, spec.aws.profile)
        else:
            self._file_store(url)

    def _s3_store(self, url: str, region: str, profile: str | None) -> None:
        from gpurun.store.s3 import S3Store

        check = "checkpoint bucket"
        try:
            store = S3Store(url, region=region, profile=profile)
            store.check_writable()
        except Exception as error:
            if isinstance(error, NoSuchBucket):
                bucket = url[len("s3://") :].split("/", 1)[0]
                self.add(
                    check,
                    FAIL,
                    f"{url}: bucket {bucket} does not exist (or is not visible to these credentials)",
                    f"create it: `aws s3 mb s3://{bucket} --region {region}` (or launch with --create-bucket: "
                    "private, encrypted), or point checkpoint.store at a bucket you own",
                )
            else:
                self.failed(
                    check, _message(error), "grant s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on it"
                )
            return
        self.add(
            check,
            PASS,
            f"{url}: bucket exists and is writable (a probe object was written there and deleted right after)",
        )

    def _file_store(self, url: str) -> None:
        from gpurun.store.file import FileStore

        check = "checkpoint store"
        root = Path(url[len("file://") :])
        if root.is_dir():
            try:
                FileStore(url).check_writable()
            except GpurunError as error:
                self.failed(check, error, f"make {root} writable, or set checkpoint.store to a directory you can write")
                return
            self.add(check, PASS, f"{url} is writable (a probe file was written there and removed right after)")
            return
        if root.exists():
            self.add(check, FAIL, f"{url} is not a directory", "set checkpoint.store to a directory")
            return
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            self.add(check, PASS, f"{url} does not exist yet; launch creates it ({parent} is writable)")
        else:
            self.add(
                check,
                FAIL,
                f"{url} does not exist and {parent} is not writable",
                "set checkpoint.store to a directory you can write, like file:///home/you/checkpoints",
            )

    # -- provider ssh ------------------------------------------------------------------------------

    def ssh_hosts(self, spec: Spec) -> None:
        from gpurun.providers.ssh import targets

        try:
            hosts = targets(spec)
        except GpurunError as error:
            self.failed("ssh hosts", error, "fix ssh.hosts / ssh.identity_file, or the entry in ~/.ssh/config")
            return
        with ThreadPoolExecutor(max_workers=min(8, len(hosts)) or 1) as pool:
            results = list(pool.map(_probe_host, hosts))
        for result in results:
            for check in result:
                self.add(check.check, check.result, check.detail, check.fix)


def _probe_host(target: SshTarget) -> list[Check]:
    """Connect (keys as launch would use them), then look for python3, tar and nvidia-smi."""
    import getpass

    from gpurun.providers.ssh import describe_gpus
    from gpurun.transport.ssh import SshTransport

    user = target.user or getpass.getuser()
    label = f"{user}@{target.alias}" + (
        f" ({target.host}:{target.port})" if target.alias != target.host else f":{target.port}"
    )
    host_check, gpu_check = f"ssh host {target.alias}", f"GPUs on {target.alias}"
    warnings: list[str] = []
    # Host keys not in ~/.ssh/known_hosts are accepted into a scratch file that goes away: nothing is kept.
    with tempfile.TemporaryDirectory(prefix="gpurun-doctor-") as scratch:
        transport = SshTransport(
            target.host,
            port=target.port,
            user=user,
            key_filename=target.identity_file,
            known_hosts_file=os.path.join(scratch, "known_hosts"),
            trust_on_first_use=True,
            proxy_jump=target.proxy_jump,
            connect_timeout=10.0,
            label=label,
            on_warning=warnings.append,
        )
        try:
            output = transport.check(_HOST_PROBE, what="checking the machine", timeout=60)
        except Exception as error:
            message = str(error) if isinstance(error, GpurunError) else f"{type(error).__name__}: {error}"
            detail, fix = split_fix(message, f"check that `ssh {target.alias}` logs in without a password")
            return [
                Check(host_check, FAIL, detail, fix),
                Check(gpu_check, SKIP, "not checked: cannot log in"),
            ]
        finally:
            transport.close()
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values.setdefault(key.strip(), []).append(value.strip())
    checks: list[Check] = []
    python = (values.get("python") or [""])[0]
    problems = []
    if not python:
        problems.append("no python3 (the checkpoint agent needs Python 3.10+ with venv)")
    elif tuple(int(part) for part in python.split(".")) < MIN_PYTHON:
        problems.append(f"python3 is {python}; the checkpoint agent needs 3.10+")
    elif "venv" not in values:
        problems.append("python3 has no venv module")
    if "tar" not in values:
        problems.append("no tar (code arrives as a tar stream)")
    if problems:
        checks.append(
            Check(
                host_check,
                FAIL,
                f"logged in as {label}, but: {'; '.join(problems)}",
                "install python3, python3-venv and tar there",
            )
        )
    elif warnings:
        checks.append(
            Check(
                host_check,
                WARN,
                f"logged in as {label} (python {python}, tar); its host key is not in ~/.ssh/known_hosts, "
                "so launch trusts it on first use",
                f"check the key and add it: ssh-keyscan -p {target.port} {target.host} >> ~/.ssh/known_hosts",
            )
        )
    else:
        checks.append(Check(host_check, PASS, f"logged in as {label}, host key known (python {python}, tar)"))
    if "nvidia-smi" not in values:
        checks.append(
            Check(
                gpu_check,
                FAIL,
                "nvidia-smi not found",
                f"install the NVIDIA driver on {target.alias} (nvidia-smi comes with it)",
            )
        )
    elif not values.get("gpu"):
        checks.append(
            Check(
                gpu_check,
                FAIL,
                "nvidia-smi found but lists no GPU",
                f"check the driver on {target.alias}: run nvidia-smi there",
            )
        )
    else:
        checks.append(Check(gpu_check, PASS, describe_gpus(values["gpu"])))
    return checks


# -- the whole diagnosis -------------------------------------------------------------------------


def _default_region() -> tuple[str, str]:
    """The region of the default credential chain's config, else the spec default (us-east-1)."""
    import botocore.session

    try:
        region = botocore.session.Session().get_config_variable("region")
    except Exception:
        region = None
    if region:
        return region, " (your AWS config's default region)"
    return "us-east-1", " (no default region configured; the spec default)"


def diagnose(spec: Spec | None, on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check for a launch of `spec` (or, without a spec, for the default AWS setup)."""
    doctor = Doctor(on_check)
    doctor.ssh_client()
    if spec is None:
        region, source = _default_region()
        doctor.aws_session(region, None, source)
        return doctor.checks
    doctor.tar()
    store = spec.checkpoint.store or ""
    credentials_ok: bool | None = None
    provider = capabilities(spec.provider)
    if provider.rents_aws_machines:
        aws = doctor.aws_session(spec.aws.region, spec.aws.profile)
        credentials_ok = aws is not None
        doctor.aws_launch(aws, spec)
        doctor.caller_ip(spec.aws.ssh_cidr)
    elif store.startswith("s3://"):
        aws = doctor.aws_session(spec.aws.region, spec.aws.profile)
        credentials_ok = aws is not None
    if provider.machines_are_spec_hosts:
        doctor.ssh_hosts(spec)
    elif provider.run_dir_here:
        doctor.python()  # this Python runs the job's checkpoint agent
    doctor.store(spec, credentials_ok)
    return doctor.checks


def summary(checks: list[Check]) -> str | None:
    """None when every check passed (warnings allowed); else the one line the CLI prints.

    Skipped checks are not failures: they wait on one that failed, and are counted apart.
    """
    failed = [check.check for check in checks if check.result == FAIL]
    skipped = sum(1 for check in checks if check.result == SKIP)
    if not failed and not skipped:
        return None
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    also = f"; {skipped} skipped until {'they pass' if len(failed) > 1 else 'it passes'}" if skipped else ""
    return f"{len(failed)} of {len(checks)} checks failed ({shown}){also}; each failed check says how to fix it"
