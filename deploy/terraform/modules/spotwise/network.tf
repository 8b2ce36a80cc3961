# Who may reach what. The daemon port admits the agents' security group and the admin CIDRs
# only (never 0.0.0.0/0: variables.tf refuses it); agents admit each other on every port, since
# the rendezvous store and NCCL pick their ports at run time. No SSH anywhere.

resource "aws_security_group" "head" {
  name_prefix = "${var.name}-head-"
  description = "spotwise head node: daemon gRPC from agents and admins only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-head" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "agents" {
  name_prefix = "${var.name}-agents-"
  description = "spotwise agents: training traffic between agents only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-agents" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "daemon_from_agents" {
  security_group_id            = aws_security_group.head.id
  description                  = "spotwise daemon gRPC from agents"
  ip_protocol                  = "tcp"
  from_port                    = var.daemon_port
  to_port                      = var.daemon_port
  referenced_security_group_id = aws_security_group.agents.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "beats_from_agents" {
  security_group_id            = aws_security_group.head.id
  description                  = "spotwise daemon beat channel from agents"
  ip_protocol                  = "tcp"
  from_port                    = var.beat_port
  to_port                      = var.beat_port
  referenced_security_group_id = aws_security_group.agents.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "daemon_from_admins" {
  for_each = toset(var.admin_cidrs)

  security_group_id = aws_security_group.head.id
  description       = "spotwise daemon gRPC from admin network ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.daemon_port
  to_port           = var.daemon_port
  cidr_ipv4         = each.value
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "metrics_from_admins" {
  for_each = toset(var.admin_cidrs)

  security_group_id = aws_security_group.head.id
  description       = "spotwise Prometheus metrics from admin network ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = each.value
  tags              = local.tags
}

# Outbound: package installs, S3, SSM and the AWS APIs the daemon calls.
resource "aws_vpc_security_group_egress_rule" "head_out" {
  security_group_id = aws_security_group.head.id
  description       = "head node outbound (packages, S3, SSM, EC2 and Pricing APIs)"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "agents_from_agents" {
  security_group_id            = aws_security_group.agents.id
  description                  = "rendezvous store and collectives between agents"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.agents.id
  tags                         = local.tags
}

# EFA needs the outbound rule to the group itself spelled out, besides the catch-all.
resource "aws_vpc_security_group_egress_rule" "agents_to_agents" {
  security_group_id            = aws_security_group.agents.id
  description                  = "rendezvous store and collectives between agents"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.agents.id
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "agents_out" {
  security_group_id = aws_security_group.agents.id
  description       = "agents outbound (daemon, packages, S3, SSM)"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

# The head node's address, fixed before the instance exists: the daemon certificate names it,
# every agent's config points at it, and a replaced head node gets it back.
resource "aws_network_interface" "head" {
  subnet_id       = var.head_subnet_id
  security_groups = [aws_security_group.head.id]
  description     = "spotwise head node (daemon address)"
  tags            = merge(local.tags, { Name = "${var.name}-head" })
}

resource "aws_eip" "head" {
  #checkov:skip=CKV2_AWS_19:attached to the head's network interface (aws_eip_association.head), which outlives the instance
  count = var.head_public_ip ? 1 : 0

  domain = "vpc"
  tags   = merge(local.tags, { Name = "${var.name}-head" })
}

resource "aws_eip_association" "head" {
  count = var.head_public_ip ? 1 : 0

  allocation_id        = aws_eip.head[0].id
  network_interface_id = aws_network_interface.head.id

  depends_on = [aws_instance.head]
}
