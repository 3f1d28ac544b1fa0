"""The pure builders of a recovering AWS run: launch template, group, guard, role scope."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any

from gpurun.providers.aws import recovery as rc
from gpurun.providers.aws import requests as rq
from gpurun.providers.aws.group import ScalingActivities

RUN = "sine-lstm-ab12cd"


def _template(**overrides: object) -> dict:
    base: dict = dict(
        run=RUN,
        owner="alice",
        ami_id="ami-0123456789abcdef0",
        instance_type="t3.micro",
        root_device="/dev/sda1",
        disk_gb=120,
        key_name=f"gpurun-{RUN}",
        security_group_id="sg-1234",
        instance_profile=f"gpurun-{RUN}",
        user_data="#!/usr/bin/env python3\nprint('hi')\n",
    )
    base.update(overrides)
    return rc.launch_template_data(**base)


def test_launch_template_carries_every_security_default() -> None:
    data = _template()
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    [disk] = data["BlockDeviceMappings"]
    assert disk["Ebs"] == {"VolumeSize": 120, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}
    [interface] = data["NetworkInterfaces"]
    assert interface["Groups"] == ["sg-1234"] and interface["DeleteOnTermination"] is True
    assert data["IamInstanceProfile"] == {"Name": f"gpurun-{RUN}"}
    tagged = {spec["ResourceType"]: rq.tag_dict(spec["Tags"]) for spec in data["TagSpecifications"]}
    assert set(tagged) == {"instance", "volume", "network-interface"}
    assert all(tags["gpurun:run"] == RUN and tags["gpurun:managed"] == "true" for tags in tagged.values())
    assert base64.b64decode(data["UserData"]).decode().startswith("#!/usr/bin/env python3")


def test_launch_template_has_no_shutdown_guard_or_market() -> None:
    data = _template()
    # A machine that ends itself inside a group is replaced: the guard is the group's scheduled action.
    assert "InstanceInitiatedShutdownBehavior" not in data
    # A mixed instances policy refuses a template that asks for spot.
    assert "InstanceMarketOptions" not in data
    assert "IamInstanceProfile" not in _template(instance_profile=None)


def test_create_launch_template_is_tagged_itself() -> None:
    kwargs = rc.create_launch_template_kwargs(RUN, "alice", _template())
    assert kwargs["LaunchTemplateName"] == f"gpurun-{RUN}"
    [spec] = kwargs["TagSpecifications"]
    assert spec["ResourceType"] == "launch-template" and rq.is_managed(spec["Tags"], RUN)


def test_group_lists_types_in_order_over_every_subnet() -> None:
    kwargs = rc.auto_scaling_group_kwargs(
        run=RUN,
        owner="alice",
        instance_types=["g6.xlarge", "g5.xlarge", "g6.xlarge"],
        subnet_ids=["subnet-a", "subnet-b", "subnet-c"],
        nodes=1,
        spot=True,
        max_price=0.5,
    )
    assert (kwargs["MinSize"], kwargs["MaxSize"], kwargs["DesiredCapacity"]) == (0, 1, 1)
    assert kwargs["VPCZoneIdentifier"] == "subnet-a,subnet-b,subnet-c"
    policy = kwargs["MixedInstancesPolicy"]
    assert policy["LaunchTemplate"]["Overrides"] == [{"InstanceType": "g6.xlarge"}, {"InstanceType": "g5.xlarge"}]
    assert policy["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateName"] == f"gpurun-{RUN}"
    distribution = policy["InstancesDistribution"]
    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0 and distribution["SpotMaxPrice"] == "0.5"
    assert kwargs["CapacityRebalance"] is True
    group_tags = {item["Key"]: item["Value"] for item in kwargs["Tags"]}
    assert group_tags["gpurun:run"] == RUN and group_tags["gpurun:managed"] == "true"
    assert all(item["ResourceId"] == f"gpurun-{RUN}" for item in kwargs["Tags"])


def test_on_demand_group_uses_the_types_in_order_without_rebalancing() -> None:
    kwargs = rc.auto_scaling_group_kwargs(
        run=RUN, owner="alice", instance_types=["g5.xlarge"], subnet_ids=["subnet-a"], nodes=1, spot=False
    )
    distribution = kwargs["MixedInstancesPolicy"]["InstancesDistribution"]
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 100
    assert distribution["OnDemandAllocationStrategy"] == "prioritized"
    assert "SpotMaxPrice" not in distribution and kwargs["CapacityRebalance"] is False


def test_guard_is_launch_plus_max_runtime_at_capacity_and_max_zero() -> None:
    launched = datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc)
    at = rc.guard_time(launched, 12 * 3600)
    assert at == datetime(2026, 12, 4, 22, 0, 0, tzinfo=timezone.utc)
    kwargs = rc.scheduled_guard_kwargs(RUN, at)
    assert kwargs["AutoScalingGroupName"] == f"gpurun-{RUN}"
    assert (kwargs["MinSize"], kwargs["MaxSize"], kwargs["DesiredCapacity"]) == (0, 0, 0)
    assert kwargs["StartTime"] == at


def test_role_may_scale_only_its_own_group() -> None:
    statement = rc.own_group_statement(RUN, region="eu-west-1", account="123456789012")
    assert statement["Action"] == ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    assert statement["Resource"] == (
        f"arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:*:autoScalingGroupName/gpurun-{RUN}"
    )
    assert "*" not in statement["Resource"].rsplit("/", 1)[1]


def test_plan_rows_name_group_types_zones_guard_and_budget() -> None:
    rows = dict(
        rc.plan_rows(
            run=RUN,
            instance_types=["g5.xlarge", "g6.xlarge"],
            zones=["us-east-1a", "us-east-1b"],
            spot=True,
            nodes=1,
            max_runtime_text="12h",
            idle_timeout_text="30m",
            max_restarts=3,
            on_failure=False,
        )
    )
    assert rows["auto scaling group"].startswith(f"gpurun-{RUN}")
    assert rows["types"] == "g5.xlarge, g6.xlarge (spot, price-capacity-optimized)"
    assert rows["zones"] == "us-east-1a, us-east-1b"
    assert "12h" in rows["guard"] and "30m after the job ends" in rows["guard"]
    assert rows["restart budget"].startswith("3 ")


def test_moto_accepts_the_template_group_and_guard(session) -> None:
    """What the builders make is what AWS's API takes: the group starts its machine from the template."""
    ec2, autoscaling = session.client("ec2"), session.client("autoscaling")
    subnets = [subnet["SubnetId"] for subnet in ec2.describe_subnets()["Subnets"]]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    group_id = ec2.create_security_group(GroupName=f"gpurun-{RUN}", Description="x")["GroupId"]
    ec2.create_key_pair(KeyName=f"gpurun-{RUN}")
    data = _template(ami_id=image, security_group_id=group_id, instance_profile=None)
    ec2.create_launch_template(**rc.create_launch_template_kwargs(RUN, "alice", data))
    autoscaling.create_auto_scaling_group(
        **rc.auto_scaling_group_kwargs(
            run=RUN, owner="alice", instance_types=["t3.micro", "t3.small"], subnet_ids=subnets, nodes=1, spot=True
        )
    )
    at = rc.guard_time(datetime.now(timezone.utc), 3600)
    autoscaling.put_scheduled_update_group_action(**rc.scheduled_guard_kwargs(RUN, at))

    [group] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[f"gpurun-{RUN}"])["AutoScalingGroups"]
    [machine] = group["Instances"]
    assert machine["InstanceType"] == "t3.micro"
    instance = ec2.describe_instances(InstanceIds=[machine["InstanceId"]])["Reservations"][0]["Instances"][0]
    assert rq.is_managed(instance["Tags"], RUN)
    [action] = autoscaling.describe_scheduled_actions(AutoScalingGroupName=f"gpurun-{RUN}")[
        "ScheduledUpdateGroupActions"
    ]
    assert action["ScheduledActionName"] == rc.GUARD_ACTION and action["DesiredCapacity"] == 0
    assert action["StartTime"].timestamp() == at.timestamp()
    [template] = ec2.describe_launch_templates(LaunchTemplateNames=[f"gpurun-{RUN}"])["LaunchTemplates"]
    version = ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])
    stored = version["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert stored["MetadataOptions"]["HttpTokens"] == "required"
    assert stored["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True


def _group_with_template(session) -> tuple[Any, Any, str]:
    """What a recovering launch leaves on AWS: the run's security group, launch template and group."""
    ec2, autoscaling = session.client("ec2"), session.client("autoscaling")
    subnets = [subnet["SubnetId"] for subnet in ec2.describe_subnets()["Subnets"]]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    group_id = ec2.create_security_group(GroupName=f"gpurun-{RUN}", Description="x")["GroupId"]
    data = _template(ami_id=image, security_group_id=group_id, instance_profile=None)
    data.pop("KeyName")
    ec2.create_launch_template(**rc.create_launch_template_kwargs(RUN, "alice", data))
    autoscaling.create_auto_scaling_group(
        **rc.auto_scaling_group_kwargs(
            run=RUN, owner="alice", instance_types=["t3.micro"], subnet_ids=subnets, nodes=1, spot=False
        )
    )
    return ec2, autoscaling, group_id


def test_teardown_removes_group_template_and_guard_and_orphans_finds_them(session) -> None:
    from gpurun.providers.aws.session import Aws
    from gpurun.providers.aws.teardown import Timing, find_orphans, remove_run

    ec2, autoscaling, group_id = _group_with_template(session)
    autoscaling.put_scheduled_update_group_action(**rc.scheduled_guard_kwargs(RUN, datetime.now(timezone.utc)))
    aws = Aws(session=session, region="us-east-1", profile=None)

    def no_placement_groups(**_: object) -> tuple:
        from botocore.awsrequest import AWSResponse

        # moto does not implement DescribePlacementGroups.
        return AWSResponse("http://moto", 200, {}, None), {"PlacementGroups": []}

    aws.ec2.meta.events.register("before-call.ec2.DescribePlacementGroups", no_placement_groups)
    kinds = {(item["kind"], item["run"]) for item in find_orphans(aws, set(), include_iam=False)}
    assert {("auto_scaling_group", RUN), ("launch_template", RUN)} <= kinds

    outcome = remove_run(
        aws, RUN, lambda _line: None, Timing(poll_interval=0.05), key_files=False, placement_groups=False
    )

    assert not outcome.failed, outcome.failed
    assert autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"] == []
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    live = [
        instance
        for reservation in ec2.describe_instances()["Reservations"]
        for instance in reservation["Instances"]
        if instance["State"]["Name"] != "terminated"
    ]
    assert live == []
    assert f"auto scaling group gpurun-{RUN}" in outcome.removed
    assert f"scheduled action {rc.GUARD_ACTION}" in outcome.removed


def test_scaling_activities_are_shown_once_and_failures_say_what_was_tried() -> None:
    seen = ScalingActivities(["g5.xlarge", "g6.xlarge"])
    spot = {
        "ActivityId": "b",
        "StatusCode": "Failed",
        "StatusMessage": "Could not launch Spot Instances. InsufficientInstanceCapacity - "
        "There is no Spot capacity available that matches your request.\x1b[2J",
        "Details": '{"Availability Zone":"eu-west-1b"}',
    }
    quota = {"ActivityId": "c", "StatusCode": "Failed", "StatusMessage": "You have requested more vCPU capacity"}
    started = {"ActivityId": "a", "StatusCode": "Successful", "Description": "Launching a new EC2 instance: i-1"}
    assert seen.feed([spot, started]) == [
        "Successful: Launching a new EC2 instance: i-1",
        "Failed (no capacity: eu-west-1b): Could not launch Spot Instances. InsufficientInstanceCapacity - "
        "There is no Spot capacity available that matches your request.\\x1b[2J",
    ]
    assert seen.feed([quota, spot, started]) == ["Failed: You have requested more vCPU capacity"]
    assert seen.feed([quota, spot, started]) == []
    assert seen.tried() == "2 failed launches tried type not named in eu-west-1b"
    assert ScalingActivities(["g5.xlarge"]).tried() == ""


def test_a_group_that_cannot_be_deleted_keeps_its_max_runtime_guard(session) -> None:
    """Teardown fails to delete the group (a scaling activity in progress, throttling, a denied call):
    the scheduled action must still be there, or the group's machine runs with no time limit at all
    (idle_timeout null) until someone runs teardown again."""
    from botocore.exceptions import ClientError

    from gpurun.providers.aws.session import Aws
    from gpurun.providers.aws.teardown import Timing, remove_run

    ec2, autoscaling, group_id = _group_with_template(session)
    later = datetime.now(timezone.utc) + timedelta(hours=12)
    autoscaling.put_scheduled_update_group_action(**rc.scheduled_guard_kwargs(RUN, later))

    def busy(**_: object) -> None:
        raise ClientError(
            {"Error": {"Code": "ScalingActivityInProgress", "Message": "Scaling activity is in progress"}},
            "DeleteAutoScalingGroup",
        )

    session.events.register("before-call.autoscaling.DeleteAutoScalingGroup", busy)  # gpurun's clients, made next
    aws = Aws(session=session, region="us-east-1", profile=None)
    aws.ec2.meta.events.register("before-call.ec2.DescribePlacementGroups", lambda **_: (None, {"PlacementGroups": []}))
    outcome = remove_run(
        aws, RUN, lambda _line: None, Timing(poll_interval=0.05), key_files=False, placement_groups=False
    )

    assert any("ScalingActivityInProgress" in line or "in progress" in line for line in outcome.failed), outcome.failed
    [group] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[f"gpurun-{RUN}"])["AutoScalingGroups"]
    actions = autoscaling.describe_scheduled_actions(AutoScalingGroupName=f"gpurun-{RUN}")[
        "ScheduledUpdateGroupActions"
    ]
    assert [action["ScheduledActionName"] for action in actions] == [rc.GUARD_ACTION], "the guard went first"
