# The agents: an auto scaling group of spot GPU instances, each running spotwise-agent.service
# pointed at the head node's private address. Whoever scales the fleet (the daemon's ec2
# provider or an operator) sets the desired capacity; Terraform only creates the group.

data "aws_ami" "agent" {
  filter {
    name   = "image-id"
    values = [var.agent_ami_id]
  }
}

resource "aws_launch_template" "agent" {
  name_prefix            = "${var.name}-agent-"
  description            = "spotwise agent: a GPU node running spotwise-agent.service"
  image_id               = var.agent_ami_id
  update_default_version = true
  vpc_security_group_ids = [aws_security_group.agents.id]

  iam_instance_profile {
    arn = aws_iam_instance_profile.agent.arn
  }

  # Launch templates take user data base64-encoded. The unit and the firewall script go in
  # gzipped (cloud-init's gz+b64): user data may not exceed 16 KiB.
  user_data = base64encode(templatefile("${path.module}/templates/agent-cloud-init.yaml.tftpl", {
    region              = local.region
    spotwise_pip_spec   = var.spotwise_pip_spec
    daemon_address      = local.daemon_private_address
    grace_s             = var.agent_grace_seconds
    agent_unit_gz       = base64gzip(local.agent_unit)
    fetch_parameter_b64 = base64encode(local.fetch_parameter_script)
    ca_cert_b64         = base64encode(tls_self_signed_cert.ca.cert_pem)
    token_parameter     = aws_ssm_parameter.agent_token.name
    tls_key_parameter   = var.mutual_tls ? aws_ssm_parameter.agent_tls_key[0].name : ""
    agent_cert_b64      = var.mutual_tls ? base64encode(tls_locally_signed_cert.client["agent"].cert_pem) : ""
    agent_cert_file     = var.mutual_tls ? "/etc/spotwise/tls/agent.crt" : ""
    agent_key_file      = var.mutual_tls ? "/etc/spotwise/tls/agent.key" : ""
    setup_b64           = base64encode(join("\n", concat(["#!/bin/bash", "set -euo pipefail"], var.agent_setup_commands, [""])))
    job_role_arn        = aws_iam_role.job.arn
    checkpoint_uri      = local.checkpoint_uri
    job_firewall_gz     = base64gzip(file("${path.module}/templates/job-firewall.sh"))
  }))

  # IMDSv2 only; the agent polls it for spot/instance-action and rebalance notices.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = data.aws_ami.agent.root_device_name

    ebs {
      volume_size           = var.agent_root_volume_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${var.name}-agent", "spotwise:role" = "agent" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${var.name}-agent" })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "agents" {
  name_prefix         = "${var.name}-agents-"
  vpc_zone_identifier = var.agent_subnet_ids
  min_size            = var.agent_min_size
  max_size            = var.agent_max_size
  desired_capacity    = var.agent_desired_capacity

  # Launch a replacement as soon as EC2 signals that a spot instance is at elevated risk,
  # before the 2-minute interruption notice.
  capacity_rebalance = true

  health_check_type         = "EC2"
  health_check_grace_period = 600

  # Evening out zones would terminate healthy training nodes; spotwise rescales on its own terms.
  suspended_processes = ["AZRebalance"]

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = 0
      on_demand_percentage_above_base_capacity = var.on_demand_percentage_above_base_capacity
      spot_allocation_strategy                 = "capacity-optimized"
    }

    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.agent.id
        version            = aws_launch_template.agent.latest_version
      }

      dynamic "override" {
        for_each = var.gpu_instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${var.name}-agent", "spotwise:role" = "agent" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity]
  }
}
