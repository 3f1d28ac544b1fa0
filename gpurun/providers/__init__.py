"""Providers acquire and release machines: `local`, `ssh`, `aws`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpurun.errors import BadInput

if TYPE_CHECKING:
    from gpurun.providers.base import Provider


def get_provider(name: str) -> Provider:
    if name == "local":
        from gpurun.providers.local import LocalProvider

        return LocalProvider()
    if name == "ssh":
        from gpurun.providers.ssh import SshProvider

        return SshProvider()
    if name == "aws":
        from gpurun.providers.aws import AwsProvider

        return AwsProvider()
    raise BadInput(f"unknown provider {name!r}; use aws, ssh or local")
