"""Prices per hour: on-demand from a table shipped with gpurun, spot from describe_spot_price_history.

The Pricing API is not needed (and often not allowed); prices are estimates
shown in plans and in `status` as cost so far.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.literals import InstanceTypeType

TABLE_REGION = "us-east-1"


@dataclass(frozen=True)
class OnDemandPrice:
    usd_per_hour: float
    exact_region: bool  # False: the us-east-1 figure, shown as an estimate elsewhere

    def describe(self) -> str:
        text = f"${self.usd_per_hour:.4f}/h on-demand"
        return text if self.exact_region else text + f" (~, {TABLE_REGION} table)"


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, float]]:
    data = json.loads(resources.files("gpurun").joinpath("data/ondemand_prices.json").read_text())
    regions: dict[str, dict[str, float]] = data["regions"]
    return regions


def ondemand_price(instance_type: str, region: str) -> OnDemandPrice | None:
    table = _table()
    if instance_type in table.get(region, {}):
        return OnDemandPrice(float(table[region][instance_type]), True)
    if instance_type in table.get(TABLE_REGION, {}):
        return OnDemandPrice(float(table[TABLE_REGION][instance_type]), region == TABLE_REGION)
    return None


def spot_prices(ec2: EC2Client, instance_type: str) -> dict[str, float]:
    """The latest spot price per zone for Linux; {} when unknown or not allowed."""
    try:
        answer = ec2.describe_spot_price_history(
            # The spec's name as the stubs' literal: AWS, not the stubs' list of its day, says which exist.
            InstanceTypes=[cast("InstanceTypeType", instance_type)],
            ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            StartTime=datetime.now(timezone.utc),
            MaxResults=100,
        )
    except Exception:
        return {}
    latest: dict[str, tuple[Any, float]] = {}
    for item in answer.get("SpotPriceHistory", []):
        zone = item.get("AvailabilityZone", "")
        try:
            price = float(item["SpotPrice"])
        except (KeyError, ValueError):
            continue
        stamp = item.get("Timestamp")
        if zone not in latest or (stamp is not None and latest[zone][0] is not None and stamp > latest[zone][0]):
            latest[zone] = (stamp, price)
    return {zone: price for zone, (_, price) in latest.items()}


def hourly_price(instance_type: str, region: str, spot_price: float | None) -> float | None:
    """What one hour of one machine costs, for cost-so-far: spot price at launch, else on-demand."""
    if spot_price is not None:
        return spot_price
    price = ondemand_price(instance_type, region)
    return price.usd_per_hour if price else None
