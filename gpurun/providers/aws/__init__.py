"""The AWS provider: EC2 machines with safe defaults, capacity failover, and teardown by tag.

`AwsProvider` is imported on first use, so the pure request builders
(`gpurun.providers.aws.requests`) load without boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpurun.providers.aws.provider import AwsProvider

__all__ = ["AwsProvider"]


def __getattr__(name: str) -> Any:
    if name == "AwsProvider":
        from gpurun.providers.aws.provider import AwsProvider

        return AwsProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
