"""A boto3 session for the spec's region and profile, checked before anything is created."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config

from gpurun.aws_files import check_shared_files
from gpurun.errors import BadInput, GpurunError, NoCredentials, UnknownRegion

# The boto3-stubs of the test extras: types only, nothing imported at run time. The pricing,
# service-quotas and sts stubs joined the extras later than some environments were installed:
# where one is missing its client is Any (hence the ignores), never an error.
if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_pricing import PricingClient  # type: ignore[import-not-found, unused-ignore]
    from mypy_boto3_service_quotas import ServiceQuotasClient  # type: ignore[import-not-found, unused-ignore]
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_sts import STSClient  # type: ignore[import-not-found, unused-ignore]

#: The AWS services gpurun calls (boto3's client() is typed per service name).
ServiceName = Literal["ec2", "iam", "ssm", "sts", "autoscaling", "service-quotas", "pricing"]

#: (event name, handler) pairs registered on every session; tests inject faults here.
EventHandlers = Iterable[tuple[str, Callable[..., Any]]]

_EXPIRED_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "AuthFailure",
}

_TIMEOUTS: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 60, "max_pool_connections": 32}

#: Per purpose. botocore's standard mode retries HTTP 500 answers, and AWS sends capacity errors
#: (InsufficientInstanceCapacity) as 500: RunInstances gets one attempt so they reach the failover at
#: once, and launch retries throttling itself. Rollback and teardown get clients of their own, so a
#: launch that spent its client's retry quota still leaves them theirs (botocore keeps one per client).
_CONFIGS = {
    "default": Config(retries={"mode": "standard", "max_attempts": 5}, **_TIMEOUTS),
    "single": Config(retries={"mode": "standard", "total_max_attempts": 1}, **_TIMEOUTS),
    "cleanup": Config(retries={"mode": "standard", "max_attempts": 10}, **_TIMEOUTS),
}


@dataclass
class Identity:
    account: str
    arn: str
    owner: str


@dataclass
class Aws:
    """One region's clients, made on first use and shared (boto3 clients are thread-safe)."""

    session: boto3.Session
    region: str
    profile: str | None
    identity: Identity | None = None
    #: Which retry settings this view's clients use: "default", "single" or "cleanup" (see _CONFIGS).
    purpose: str = "default"
    _clients: dict[str, Any] = field(default_factory=dict)
    _views: dict[str, Aws] = field(default_factory=dict)

    @overload
    def client(self, name: Literal["ec2"]) -> EC2Client: ...
    @overload
    def client(self, name: Literal["iam"]) -> IAMClient: ...
    @overload
    def client(self, name: Literal["ssm"]) -> SSMClient: ...
    @overload
    def client(self, name: Literal["autoscaling"]) -> AutoScalingClient: ...
    @overload
    def client(self, name: Literal["sts"]) -> STSClient: ...
    @overload
    def client(self, name: Literal["service-quotas"]) -> ServiceQuotasClient: ...
    @overload
    def client(self, name: Literal["pricing"]) -> PricingClient: ...
    def client(self, name: ServiceName) -> Any:
        client = self._clients.get(name)
        if client is None:
            config = _CONFIGS[self.purpose]
            client = self._clients[name] = self.session.client(name, region_name=self.region, config=config)
        return client

    def view(self, purpose: str) -> Aws:
        """The same account and region with clients of another retry purpose (made once, then shared)."""
        if purpose == self.purpose:
            return self
        view = self._views.get(purpose)
        if view is None:
            view = self._views[purpose] = Aws(self.session, self.region, self.profile, self.identity, purpose)
        view.identity = view.identity or self.identity
        return view

    def cleanup(self) -> Aws:
        """Clients for rollback and teardown, with a retry budget of their own."""
        return self.view("cleanup")

    @property
    def ec2(self) -> EC2Client:
        return self.client("ec2")

    @property
    def iam(self) -> IAMClient:
        return self.client("iam")

    @property
    def ssm(self) -> SSMClient:
        return self.client("ssm")

    @property
    def sts(self) -> STSClient:
        return self.client("sts")

    @property
    def partition(self) -> str:
        if self.identity and self.identity.arn.startswith("arn:"):
            return self.identity.arn.split(":")[1]
        return "aws"


def profile_label(profile: str | None) -> str:
    if profile:
        return f"profile {profile!r}"
    if os.environ.get("AWS_PROFILE"):
        return f"profile {os.environ['AWS_PROFILE']!r} (from AWS_PROFILE)"
    return "the default credential chain (profile 'default', environment, instance role)"


def _fix_hint(profile: str | None) -> str:
    name = profile or os.environ.get("AWS_PROFILE")
    if name:
        return f"run `aws sso login --profile {name}` (SSO) or `aws configure --profile {name}`"
    return "run `aws configure` (access keys) or `aws sso login --profile NAME` and set aws.profile"


def known_regions(session: boto3.Session) -> set[str]:
    regions: set[str] = set()
    for partition in session.get_available_partitions():
        try:
            regions.update(session.get_available_regions("ec2", partition_name=partition))
        except Exception:
            continue
    return regions


_shared_loader: Any = None


def new_botocore_session() -> botocore.session.Session:
    """A botocore session that shares the parsed service models with every other one made here.

    Loading the EC2 model alone costs a good part of a second; sessions made for
    other regions (orphans, status across regions) reuse it.
    """
    global _shared_loader
    session = botocore.session.get_session()
    if _shared_loader is None:
        _shared_loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _shared_loader)
    return session


def make_session(region: str, profile: str | None, *, handlers: EventHandlers = ()) -> Aws:
    """A session for region/profile; a missing profile, unknown region or malformed AWS file is BadInput."""
    check_shared_files(profile)
    try:
        session = boto3.Session(botocore_session=new_botocore_session(), region_name=region, profile_name=profile)
    except botocore.exceptions.ProfileNotFound:
        raise BadInput(
            f"aws.profile: profile {profile!r} is not in your AWS config; "
            f"run `aws configure --profile {profile}` or `aws configure sso --profile {profile}`"
        ) from None
    regions = known_regions(session)
    if regions and region not in regions:
        match = difflib.get_close_matches(region, sorted(regions), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise UnknownRegion(f"aws.region: {region!r} is not an AWS region{hint}")
    for event, handler in handlers:
        session.events.register(event, handler)
    return Aws(session=session, region=region, profile=profile)


def owner_from_arn(arn: str) -> str:
    """`user/alice`, `assumed-role/Admin/alice@example.com` or `root` from a caller ARN."""
    parts = arn.split(":", 5)
    resource = parts[5] if len(parts) == 6 else arn
    return re.sub(r"[^\w .:/=+\-@]", "_", resource)[:256] or "unknown"


def credential_error(error: BaseException, profile: str | None) -> GpurunError | None:
    """A one-line BadInput for a missing, expired or invalid credential; None for other errors."""
    tried = profile_label(profile)
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return NoCredentials(f"no AWS credentials found for {tried}; {_fix_hint(profile)}")
    if isinstance(error, botocore.exceptions.ProfileNotFound):
        return NoCredentials(f"aws.profile: {tried} is not in your AWS config; {_fix_hint(profile)}")
    token_errors = tuple(
        getattr(botocore.exceptions, name)
        for name in (
            "TokenRetrievalError",
            "SSOTokenLoadError",
            "UnauthorizedSSOTokenError",
            "CredentialRetrievalError",
            "PartialCredentialsError",
            "SSOError",
        )
        if hasattr(botocore.exceptions, name)
    )
    if isinstance(error, token_errors):
        return NoCredentials(f"AWS credentials for {tried} could not be loaded or have expired; {_fix_hint(profile)}")
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in _EXPIRED_CODES:
            return NoCredentials(f"AWS credentials for {tried} are expired or invalid ({code}); {_fix_hint(profile)}")
    return None


def check_identity(aws: Aws) -> Identity:
    """sts:GetCallerIdentity, before anything is created; the owner tag comes from it."""
    if aws.identity is not None:
        return aws.identity
    try:
        answer = aws.sts.get_caller_identity()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        mapped = credential_error(error, aws.profile)
        if mapped is not None:
            raise mapped from None
        if isinstance(error, botocore.exceptions.EndpointConnectionError):
            raise GpurunError(f"cannot reach AWS in {aws.region}: {error}; check the network") from None
        raise GpurunError(f"checking AWS credentials ({profile_label(aws.profile)}) failed: {error}") from None
    arn = answer.get("Arn", "")
    aws.identity = Identity(account=answer.get("Account", ""), arn=arn, owner=owner_from_arn(arn))
    return aws.identity


def client_error_code(error: BaseException) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def client_error_message(error: BaseException) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        info = error.response.get("Error", {})
        return f"{info.get('Code', 'Error')}: {info.get('Message', '')}".strip()
    return str(error) or type(error).__name__
