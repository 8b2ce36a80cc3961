# spotwise on AWS: a head node running spotwise-daemon.service, an auto scaling group of spot
# GPU nodes running spotwise-agent.service, and the S3 bucket their checkpoints go to.
#
#   storage.tf   the checkpoint bucket (private, encrypted, TLS-only, expiring old objects)
#   network.tf   security groups and the head node's fixed network interface
#   pki.tf       the cluster CA, the daemon certificate, client certificates and tokens
#   secrets.tf   private keys and tokens in SSM Parameter Store, encrypted with a cluster key
#   iam.tf       least-privilege instance roles for the head node and the agents
#   head.tf      the head node and its state volume
#   agents.tf    the launch template and the auto scaling group of agents

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

data "aws_subnet" "head" {
  id = var.head_subnet_id
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.region

  bucket_name    = coalesce(var.bucket_name, "${var.name}-checkpoints-${local.account_id}")
  checkpoint_uri = "s3://${local.bucket_name}/${var.checkpoint_prefix}"

  # SSM parameters live under /<name>/daemon/* (head only) and /<name>/agent/* (agents only).
  parameter_path = "/${var.name}"

  # The head node keeps this private address for its whole life (it belongs to a network
  # interface that outlives instance replacements): agents are configured with it at boot and
  # the daemon certificate names it.
  daemon_private_address = "${aws_network_interface.head.private_ip}:${var.daemon_port}"

  # The unit files are the ones in deploy/systemd, installed as they are.
  daemon_unit = file("${path.module}/../../../systemd/spotwise-daemon.service")
  agent_unit  = file("${path.module}/../../../systemd/spotwise-agent.service")

  fetch_parameter_script = file("${path.module}/templates/fetch-parameter.py")

  tags = merge(
    {
      "spotwise:cluster" = var.name
      "managed-by"       = "terraform"
    },
    var.tags,
  )
}
