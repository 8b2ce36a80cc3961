# Two instance roles and one role for training jobs, each with only what its process calls:
#   agents: the fence markers of every job (<prefix><job>/generations/*), their own SSM
#           parameters, and assuming the job role;
#   jobs:   the checkpoint prefix, always assumed by an agent with a session policy that
#           narrows it to the job's own folder (spotwise.worker.scoped_credentials), so a job
#           can reach its own checkpoints and no one else's; the job user cannot reach the
#           metadata service (cloud-init's firewall rule), so it never holds the agent's role;
#   head:   the same prefix (the daemon reads manifests and prunes), its own SSM parameters,
#           prices (pricing:GetProducts, ec2:DescribeSpotPriceHistory), and scaling the agents'
#           auto scaling group (the ec2 provider's desired-capacity path).
# Describe* and pricing calls do not support resource-level permissions, hence "*" there.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "checkpoints_access" {
  statement {
    sid       = "ListCheckpointPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.checkpoints.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.checkpoint_prefix}*"]
    }
  }

  statement {
    sid       = "LocateBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.checkpoints.arn]
  }

  statement {
    sid = "ReadWriteCheckpoints"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.checkpoints.arn}/${var.checkpoint_prefix}*"]
  }
}

# --- Agents -------------------------------------------------------------------------------------

data "aws_iam_policy_document" "agent" {
  statement {
    sid       = "ListCheckpointPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.checkpoints.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.checkpoint_prefix}*"]
    }
  }

  statement {
    sid       = "LocateBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.checkpoints.arn]
  }

  # The agent writes one thing in a job's folder: the fence marker of each generation it starts
  # (create-only). Data and manifests are the job's, written with the job's own credentials.
  statement {
    sid       = "WriteFenceMarkers"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${aws_s3_bucket.checkpoints.arn}/${var.checkpoint_prefix}*/generations/*"]
  }

  statement {
    sid       = "AssumeJobRole"
    actions   = ["sts:AssumeRole", "sts:TagSession"]
    resources = [aws_iam_role.job.arn]
  }

  statement {
    sid       = "AgentSecrets"
    actions   = ["ssm:GetParameter"]
    resources = ["arn:${local.partition}:ssm:${local.region}:${local.account_id}:parameter${local.parameter_path}/agent/*"]
  }

  statement {
    sid       = "DecryptSecrets"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.secrets.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "agent" {
  name_prefix        = "${var.name}-agent-"
  description        = "spotwise agents: fence markers, agent secrets, the job role"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "agent" {
  name   = "spotwise-agent"
  role   = aws_iam_role.agent.id
  policy = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_instance_profile" "agent" {
  name_prefix = "${var.name}-agent-"
  role        = aws_iam_role.agent.name
  tags        = local.tags
}

# --- Training jobs --------------------------------------------------------------------------------

data "aws_iam_policy_document" "job_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.agent.arn]
    }
  }
}

resource "aws_iam_role" "job" {
  name_prefix          = "${var.name}-job-"
  description          = "spotwise training jobs: assumed by agents, narrowed to one job's checkpoints"
  assume_role_policy   = data.aws_iam_policy_document.job_assume.json
  max_session_duration = 3600
  tags                 = local.tags
}

resource "aws_iam_role_policy" "job" {
  name   = "spotwise-job-checkpoints"
  role   = aws_iam_role.job.id
  policy = data.aws_iam_policy_document.checkpoints_access.json
}

# --- Head node ----------------------------------------------------------------------------------

data "aws_iam_policy_document" "head" {
  source_policy_documents = [data.aws_iam_policy_document.checkpoints_access.json]

  statement {
    sid       = "DaemonSecrets"
    actions   = ["ssm:GetParameter"]
    resources = ["arn:${local.partition}:ssm:${local.region}:${local.account_id}:parameter${local.parameter_path}/daemon/*"]
  }

  statement {
    sid       = "DecryptSecrets"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.secrets.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${local.region}.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadPrices"
    actions   = ["pricing:GetProducts", "ec2:DescribeSpotPriceHistory"]
    resources = ["*"]
  }

  statement {
    sid = "SeeFleet"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeScalingActivities",
    ]
    resources = ["*"]
  }

  statement {
    sid = "ScaleAgents"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = [aws_autoscaling_group.agents.arn]
  }
}

resource "aws_iam_role" "head" {
  name_prefix        = "${var.name}-head-"
  description        = "spotwise head node: checkpoints, daemon secrets, prices, agent scaling"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "head" {
  name   = "spotwise-daemon"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.head.json
}

resource "aws_iam_role_policy_attachment" "head_ssm" {
  count = var.enable_ssm_session_manager ? 1 : 0

  role       = aws_iam_role.head.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "head" {
  name_prefix = "${var.name}-head-"
  role        = aws_iam_role.head.name
  tags        = local.tags
}
