"""NetworkForCompilers: where compiler containers run when a job has no VpcConfig.

User models are untrusted code, so the created VPC has only private isolated subnets: no
internet gateway, no NAT. The AWS APIs the containers need are reached through VPC endpoints.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from kiln_infra.config import KilnConfig
from kiln_infra.key import KilnKey
from kiln_infra.logs import encrypted_log_group

# Interface endpoints every compiler needs: image pull (ECR api + dkr, layers via the S3 gateway),
# awslogs, task-token callbacks (Step Functions) and assuming the job's role (STS).
COMPILER_ENDPOINTS = {
    "EcrApi": ec2.InterfaceVpcEndpointAwsService.ECR,
    "EcrDocker": ec2.InterfaceVpcEndpointAwsService.ECR_DOCKER,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
    "StepFunctions": ec2.InterfaceVpcEndpointAwsService.STEP_FUNCTIONS,
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
}
# AWS Batch runs GPU jobs on EC2 container instances: their ECS agent needs these too.
ECS_AGENT_ENDPOINTS = {
    "Ecs": ec2.InterfaceVpcEndpointAwsService.ECS,
    "EcsAgent": ec2.InterfaceVpcEndpointAwsService.ECS_AGENT,
    "EcsTelemetry": ec2.InterfaceVpcEndpointAwsService.ECS_TELEMETRY,
}


class NetworkForCompilers(Construct):
    """A VPC (created or imported), its isolated subnets and the compilers' security group."""

    def __init__(self, scope: Construct, construct_id: str, *, config: KilnConfig, key: KilnKey,
                 removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        self.subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)
        if config.vpc is not None:
            self.vpc: ec2.IVpc = ec2.Vpc.from_vpc_attributes(
                self, "Vpc", vpc_id=config.vpc.vpc_id, availability_zones=list(config.vpc.availability_zones),
                isolated_subnet_ids=list(config.vpc.subnet_ids))
        else:
            vpc = ec2.Vpc(
                self, "Vpc", max_azs=config.max_azs, nat_gateways=0,
                subnet_configuration=[ec2.SubnetConfiguration(
                    name="Compilers", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=20)],
                restrict_default_security_group=False,  # nothing uses it; avoids a custom-resource Lambda
                gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(
                    service=ec2.GatewayVpcEndpointAwsService.S3, subnets=[self.subnets])},
            )
            if config.vpc_flow_logs:
                flow_logs = encrypted_log_group(self, "FlowLogs", key=key.key, retention_days=config.log_retention_days,
                                                removal_policy=removal_policy)
                vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
                                 traffic_type=ec2.FlowLogTrafficType.ALL)
            self.vpc = vpc
        self.security_group = ec2.SecurityGroup(
            self, "CompilerSecurityGroup", vpc=self.vpc, allow_all_outbound=False,
            description="Kiln compilers: no inbound; HTTPS out (the subnets route only to VPC endpoints)")
        self.security_group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443),
                                            "HTTPS to VPC endpoints (no internet route exists)")
        if config.vpc is None:
            endpoints = dict(COMPILER_ENDPOINTS)
            if config.gpu_enabled:
                endpoints.update(ECS_AGENT_ENDPOINTS)
            for name, service in endpoints.items():
                # open=False: only the compilers (and Batch's GPU instances, same group) may connect.
                endpoint = self.vpc.add_interface_endpoint(name, service=service, subnets=self.subnets,
                                                           private_dns_enabled=True, open=False)
                endpoint.connections.allow_default_port_from(self.security_group, "Kiln compilers")

    @property
    def subnet_ids(self) -> list[str]:
        return self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED).subnet_ids
