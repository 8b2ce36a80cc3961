terraform {
  required_version = ">= 1.5.0"

  required_providers {
    # 6.10: aws_instance.primary_network_interface (6.10.0) and data.aws_region.region (6.0).
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.10, < 7.0"
    }
    # The cluster's private CA and certificates (kept in the Terraform state: use an encrypted,
    # access-controlled backend).
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0, < 5.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
  }
}
