# The head node: one on-demand instance running spotwise-daemon.service. Its address lives on
# a network interface and its state (the daemon's SQLite database) on a separate volume, so the
# instance itself is disposable: a change of its user data (say, a renewed certificate)
# replaces it, and the new one mounts the same state and answers at the same address while the
# agents keep training and re-register (DESIGN.md, flow 9).

resource "aws_ebs_volume" "state" {
  #checkov:skip=CKV_AWS_189:encrypted with the account's EBS key; the secrets key's policy grants no EBS use
  availability_zone = data.aws_subnet.head.availability_zone
  size              = 20
  type              = "gp3"
  encrypted         = true
  tags              = merge(local.tags, { Name = "${var.name}-head-state" })
}

resource "aws_instance" "head" {
  ami                  = var.head_ami_id
  instance_type        = var.head_instance_type
  iam_instance_profile = aws_iam_instance_profile.head.name
  ebs_optimized        = true
  # One-minute metrics of the one machine every membership change waits for.
  monitoring = true

  primary_network_interface {
    network_interface_id = aws_network_interface.head.id
  }

  user_data_base64 = base64encode(templatefile("${path.module}/templates/head-cloud-init.yaml.tftpl", {
    region               = local.region
    spotwise_pip_spec    = var.spotwise_pip_spec
    daemon_unit_b64      = base64encode(local.daemon_unit)
    fetch_parameter_b64  = base64encode(local.fetch_parameter_script)
    ca_cert_b64          = base64encode(tls_self_signed_cert.ca.cert_pem)
    daemon_cert_b64      = base64encode(tls_locally_signed_cert.daemon.cert_pem)
    tokens_b64           = base64encode(local.tokens_file)
    daemon_key_parameter = aws_ssm_parameter.daemon_tls_key.name
    daemon_port          = var.daemon_port
    beat_port            = var.beat_port
    metrics_port         = var.metrics_port
    require_client_cert  = var.mutual_tls ? "true" : "false"
    checkpoint_uri       = local.checkpoint_uri
    state_volume_id      = aws_ebs_volume.state.id
    state_volume_serial  = replace(aws_ebs_volume.state.id, "-", "")
  }))
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_size = var.head_root_volume_gb
    volume_type = "gp3"
    encrypted   = true
  }

  tags = merge(local.tags, { Name = "${var.name}-head", "spotwise:role" = "head" })
}

resource "aws_volume_attachment" "state" {
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.state.id
  instance_id = aws_instance.head.id

  # Shut the daemon down cleanly (SQLite closed, volume unmounted) before detaching.
  stop_instance_before_detaching = true
}
