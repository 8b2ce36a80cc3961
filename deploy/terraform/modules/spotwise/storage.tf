# The checkpoint bucket. Versioning stays off: checkpoints are written once, superseded every
# few minutes and deleted by the runtime beyond each job's keep count; versions would keep every
# deleted shard (and bill for it). A lifecycle rule expires what abandoned jobs leave behind.
# Every request to it is logged (server access logging) to a second, private bucket: who read or
# wrote which job's checkpoints is on record even for requests IAM refused.

resource "aws_s3_bucket" "checkpoints" {
  #checkov:skip=CKV_AWS_21:versioning would keep every deleted shard; manifests are create-only and fenced instead
  #checkov:skip=CKV_AWS_144:checkpoints are a restart point, not the only copy of anything; replication doubles the cost of every save
  #checkov:skip=CKV_AWS_145:SSE-S3; a KMS key would add a KMS call per shard read and written, at checkpoint rates
  #checkov:skip=CKV2_AWS_62:nothing consumes object events; commits are reported to the daemon by the agents
  bucket        = local.bucket_name
  force_destroy = var.force_destroy_bucket
  tags          = merge(local.tags, { Name = local.bucket_name })
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  versioning_configuration {
    status = "Disabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id

  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"

    filter {
      prefix = var.checkpoint_prefix
    }

    expiration {
      days = var.checkpoint_expiration_days
    }
  }

  # A node reclaimed mid-upload leaves parts that are billed until aborted, wherever they are.
  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "checkpoints_bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.checkpoints.arn,
      "${aws_s3_bucket.checkpoints.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "checkpoints" {
  bucket = aws_s3_bucket.checkpoints.id
  policy = data.aws_iam_policy_document.checkpoints_bucket.json

  # S3 refuses a bucket policy while the public access block is being applied.
  depends_on = [aws_s3_bucket_public_access_block.checkpoints]
}

# --- Access logs of the checkpoint bucket ---------------------------------------------------------

resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_18:this is the access log bucket; logging it would log its own log deliveries
  #checkov:skip=CKV_AWS_21:log objects are written once by S3 and never overwritten
  #checkov:skip=CKV_AWS_144:one region is enough for an audit trail that expires after access_log_days
  #checkov:skip=CKV_AWS_145:S3 server access logging delivers only to SSE-S3 buckets
  #checkov:skip=CKV2_AWS_62:nothing consumes log delivery events
  bucket        = "${local.bucket_name}-logs"
  force_destroy = var.force_destroy_bucket
  tags          = merge(local.tags, { Name = "${local.bucket_name}-logs" })
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"

    filter {
      prefix = ""
    }

    expiration {
      days = var.access_log_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# With BucketOwnerEnforced, the log delivery service is granted by bucket policy (not ACLs),
# for this account's checkpoint bucket only.
data "aws_iam_policy_document" "access_logs_bucket" {
  statement {
    sid       = "S3ServerAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/checkpoints/*"]

    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [aws_s3_bucket.checkpoints.arn]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.access_logs.arn,
      "${aws_s3_bucket.access_logs.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket     = aws_s3_bucket.access_logs.id
  policy     = data.aws_iam_policy_document.access_logs_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}

resource "aws_s3_bucket_logging" "checkpoints" {
  bucket        = aws_s3_bucket.checkpoints.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "checkpoints/"

  depends_on = [aws_s3_bucket_policy.access_logs]
}
