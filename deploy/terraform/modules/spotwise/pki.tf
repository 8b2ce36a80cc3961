# The cluster's own CA, the daemon's server certificate, client certificates for mutual TLS,
# and the two bearer tokens. Private keys and tokens end up in the Terraform state (sensitive):
# keep the state in an encrypted backend that only operators can read. The daemon only ever
# holds hashes of the tokens.

resource "tls_private_key" "ca" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  private_key_pem = tls_private_key.ca.private_key_pem

  subject {
    common_name  = "${var.name} spotwise CA"
    organization = "spotwise"
  }

  is_ca_certificate     = true
  validity_period_hours = 87600
  allowed_uses          = ["cert_signing", "crl_signing", "digital_signature"]
}

resource "tls_private_key" "daemon" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "daemon" {
  private_key_pem = tls_private_key.daemon.private_key_pem

  subject {
    common_name  = "spotwise-daemon"
    organization = "spotwise"
  }

  dns_names    = concat(["spotwise-daemon"], var.daemon_dns_names)
  ip_addresses = concat([aws_network_interface.head.private_ip], aws_eip.head[*].public_ip)
}

resource "tls_locally_signed_cert" "daemon" {
  cert_request_pem   = tls_cert_request.daemon.cert_request_pem
  ca_private_key_pem = tls_private_key.ca.private_key_pem
  ca_cert_pem        = tls_self_signed_cert.ca.cert_pem

  validity_period_hours = var.certificate_validity_hours
  early_renewal_hours   = floor(var.certificate_validity_hours / 10)
  allowed_uses          = ["digital_signature", "key_encipherment", "server_auth"]
}

locals {
  # "agent" is shared by every agent; "admin" is for laptops (terraform output).
  client_cert_names = var.mutual_tls ? toset(["agent", "admin"]) : toset([])
}

resource "tls_private_key" "client" {
  for_each = local.client_cert_names

  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "client" {
  for_each = local.client_cert_names

  private_key_pem = tls_private_key.client[each.key].private_key_pem

  subject {
    common_name  = "spotwise-${each.key}"
    organization = "spotwise"
  }
}

resource "tls_locally_signed_cert" "client" {
  for_each = local.client_cert_names

  cert_request_pem   = tls_cert_request.client[each.key].cert_request_pem
  ca_private_key_pem = tls_private_key.ca.private_key_pem
  ca_cert_pem        = tls_self_signed_cert.ca.cert_pem

  validity_period_hours = var.certificate_validity_hours
  early_renewal_hours   = floor(var.certificate_validity_hours / 10)
  allowed_uses          = ["digital_signature", "client_auth"]
}

# 43 characters of [A-Za-z0-9] carry 256 bits, like `spotwise.daemon.auth.mint_token`.
resource "random_password" "agent_token" {
  length  = 43
  special = false
}

resource "random_password" "client_token" {
  length  = 43
  special = false
}

locals {
  agent_token  = "swt_${random_password.agent_token.result}"
  client_token = "swt_${random_password.client_token.result}"

  # The daemon's tokens file: hashes only, in spotwise.daemon.auth's format.
  tokens_file = join("\n", [
    "# spotwise tokens: sha256 hashes only. Add one with",
    "#   /opt/spotwise/.venv/bin/python -m spotwise.daemon.auth mint --role client --name NAME --append /etc/spotwise/tokens",
    "sha256:${sha256(local.agent_token)} agent agents",
    "sha256:${sha256(local.client_token)} client admin",
    "",
  ])
}
