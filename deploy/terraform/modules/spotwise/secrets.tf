# Private keys and the agent token reach the instances through SSM Parameter Store, never
# through user data (which any process on the instance can read from the metadata service, and
# anyone with ec2:DescribeInstanceAttribute from the API). Each role may read its own path only.

resource "aws_kms_key" "secrets" {
  description             = "${var.name}: spotwise keys and tokens in SSM Parameter Store"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  tags                    = local.tags
}

resource "aws_kms_alias" "secrets" {
  name          = "alias/${var.name}-secrets"
  target_key_id = aws_kms_key.secrets.key_id
}

resource "aws_ssm_parameter" "daemon_tls_key" {
  name        = "${local.parameter_path}/daemon/tls-key"
  description = "spotwise daemon TLS private key (PEM)"
  type        = "SecureString"
  key_id      = aws_kms_key.secrets.arn
  value       = tls_private_key.daemon.private_key_pem
  tags        = local.tags
}

resource "aws_ssm_parameter" "agent_token" {
  name        = "${local.parameter_path}/agent/token"
  description = "spotwise agent bearer token (role agent)"
  type        = "SecureString"
  key_id      = aws_kms_key.secrets.arn
  value       = local.agent_token
  tags        = local.tags
}

resource "aws_ssm_parameter" "agent_tls_key" {
  count = var.mutual_tls ? 1 : 0

  name        = "${local.parameter_path}/agent/tls-key"
  description = "spotwise agent TLS client private key (PEM)"
  type        = "SecureString"
  key_id      = aws_kms_key.secrets.arn
  value       = tls_private_key.client["agent"].private_key_pem
  tags        = local.tags
}
