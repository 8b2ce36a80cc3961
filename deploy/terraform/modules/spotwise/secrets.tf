# Private keys and the agent token reach the instances through SSM Parameter Store, never
# through user data (which any process on the instance can read from the metadata service, and
# anyone with ec2:DescribeInstanceAttribute from the API). Each role may read its own path only.

resource "aws_kms_key" "secrets" {
  description             = "${var.name}: spotwise keys and tokens in SSM Parameter Store"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.secrets_key.json
  tags                    = local.tags
}

# Who may use the key: the account's IAM principals as their IAM policies allow (Terraform
# writes and reads the parameters; without this statement nobody could ever manage the key
# again); the head node and the agents decrypt only through SSM, so only the parameters their
# roles name. Nobody outside the account, and no AWS service acting for another account.
data "aws_iam_policy_document" "secrets_key" {
  # A key policy, not an IAM policy: its Resource "*" is this key and nothing else.
  #checkov:skip=CKV_AWS_109:a key policy's "*" resource is the key itself
  #checkov:skip=CKV_AWS_111:a key policy's "*" resource is the key itself
  #checkov:skip=CKV_AWS_356:a key policy's "*" resource is the key itself
  statement {
    sid = "AccountManagesAndUsesTheKeyThroughIam"
    actions = [
      "kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
      "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource",
      "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion",
      "kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*",
    ]
    resources = ["*"] # in a key policy, "*" is this key

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "NodesDecryptTheirParametersViaSsm"
    actions   = ["kms:Decrypt"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.head.arn, aws_iam_role.agent.arn]
    }

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${local.region}.amazonaws.com"]
    }
  }
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
