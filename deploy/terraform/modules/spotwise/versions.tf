terraform {
  required_version = ">= 1.5.0"

  required_providers {
    # 6.x: aws_instance.primary_network_interface and data.aws_region.region.
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
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
