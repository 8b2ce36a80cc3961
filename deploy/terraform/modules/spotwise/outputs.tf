output "daemon_address" {
  description = "host:port of the daemon inside the VPC (what the agents use)."
  value       = local.daemon_private_address
}

output "daemon_public_address" {
  description = "host:port of the daemon from the admin CIDRs (null unless head_public_ip is true)."
  value       = var.head_public_ip ? "${aws_eip.head[0].public_ip}:${var.daemon_port}" : null
}

output "metrics_url" {
  description = "The daemon's Prometheus endpoint (reachable from the admin CIDRs)."
  value       = "http://${var.head_public_ip ? aws_eip.head[0].public_ip : aws_network_interface.head.private_ip}:${var.metrics_port}/metrics"
}

output "ca_certificate_pem" {
  description = "The cluster CA certificate: save it as the CA file your spotwise client verifies the daemon with."
  value       = tls_self_signed_cert.ca.cert_pem
}

output "client_token" {
  description = "Bearer token with the client role (submit, cancel, read jobs). Sensitive: read it with `terraform output -raw client_token`."
  value       = local.client_token
  sensitive   = true
}

output "admin_client_certificate_pem" {
  description = "Client certificate for laptops when mutual_tls is true (null otherwise)."
  value       = var.mutual_tls ? tls_locally_signed_cert.client["admin"].cert_pem : null
}

output "admin_client_private_key_pem" {
  description = "Private key of the admin client certificate when mutual_tls is true (null otherwise). Sensitive."
  value       = var.mutual_tls ? tls_private_key.client["admin"].private_key_pem : null
  sensitive   = true
}

output "checkpoint_bucket" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.checkpoints.bucket
}

output "checkpoint_uri" {
  description = "The URI prefix jobs must checkpoint under (the daemon refuses others)."
  value       = local.checkpoint_uri
}

output "agent_autoscaling_group_name" {
  description = "Name of the agents' auto scaling group (scale it with its desired capacity)."
  value       = aws_autoscaling_group.agents.name
}

output "head_instance_id" {
  description = "Instance id of the head node."
  value       = aws_instance.head.id
}

output "head_security_group_id" {
  description = "Security group of the head node."
  value       = aws_security_group.head.id
}

output "agent_security_group_id" {
  description = "Security group of the agents."
  value       = aws_security_group.agents.id
}

output "head_role_arn" {
  description = "IAM role of the head node."
  value       = aws_iam_role.head.arn
}

output "agent_role_arn" {
  description = "IAM role of the agents."
  value       = aws_iam_role.agent.arn
}

output "job_role_arn" {
  description = "The role agents assume for each job's S3 credentials (narrowed to the job's folder per session)."
  value       = aws_iam_role.job.arn
}

output "access_log_bucket" {
  description = "The bucket holding the checkpoint bucket's server access logs."
  value       = aws_s3_bucket.access_logs.bucket
}
