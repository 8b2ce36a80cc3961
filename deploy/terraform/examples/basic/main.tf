# A spotwise cluster in an existing VPC: a head node with a public address reachable from your
# network only, and up to 4 spot GPU nodes. See docs/deploy.md for the whole walk-through.
#
#   terraform init
#   terraform apply -var 'vpc_id=vpc-...' -var 'head_subnet_id=subnet-...' \
#     -var 'agent_subnet_ids=["subnet-...","subnet-..."]' -var "admin_cidr=$(curl -s https://checkip.amazonaws.com)/32"

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.10, < 7.0"
    }
  }

  # The state holds the cluster's private keys and tokens: keep it in an encrypted bucket that
  # only operators can read, e.g.
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "spotwise/terraform.tfstate"
  #   region       = "us-east-1"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}

variable "region" {
  description = "AWS region of the cluster."
  type        = string
  default     = "us-east-1"
}

variable "vpc_id" {
  description = "VPC to deploy into."
  type        = string
}

variable "head_subnet_id" {
  description = "Public subnet for the head node."
  type        = string
}

variable "agent_subnet_ids" {
  description = "Subnets (with NAT) for the GPU nodes, ideally one per availability zone."
  type        = list(string)
}

variable "admin_cidr" {
  description = "Your laptop's or office's public address as a CIDR, e.g. 203.0.113.7/32."
  type        = string
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      project = "spotwise-example"
    }
  }
}

# Ubuntu 24.04 LTS for the head node (Canonical's account).
data "aws_ami" "ubuntu" {
  most_recent = true
  owners      = ["099720109477"]

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
  }
}

# The AWS Deep Learning Base GPU AMI (NVIDIA driver and CUDA, Ubuntu) for the GPU nodes.
data "aws_ami" "gpu" {
  most_recent = true
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*"]
  }
}

module "spotwise" {
  source = "../../modules/spotwise"

  name             = "spotwise-demo"
  vpc_id           = var.vpc_id
  head_subnet_id   = var.head_subnet_id
  agent_subnet_ids = var.agent_subnet_ids
  admin_cidrs      = [var.admin_cidr]
  head_public_ip   = true
  mutual_tls       = false

  head_ami_id  = data.aws_ami.ubuntu.id
  agent_ami_id = data.aws_ami.gpu.id

  # Single-GPU instances of similar size: capacity-optimized spot picks the deepest pools.
  gpu_instance_types = ["g5.xlarge", "g6.xlarge", "g4dn.xlarge", "g6e.xlarge"]
  agent_max_size     = 4

  spotwise_pip_spec = "spotwise==0.1.0"
  agent_setup_commands = [
    "install -d -o spotwise -g spotwise /var/lib/spotwise/work",
  ]

  tags = {
    owner = "ml-platform"
  }
}

output "daemon_public_address" {
  description = "Where your laptop reaches the daemon (SPOTWISE_ADDRESS)."
  value       = module.spotwise.daemon_public_address
}

output "ca_certificate_pem" {
  description = "Save as ~/.config/spotwise/ca.crt (SPOTWISE_CA_FILE)."
  value       = module.spotwise.ca_certificate_pem
}

output "client_token" {
  description = "Your client token (SPOTWISE_TOKEN); terraform output -raw client_token."
  value       = module.spotwise.client_token
  sensitive   = true
}

output "checkpoint_uri" {
  description = "Put your jobs' checkpoint.uri under this prefix."
  value       = module.spotwise.checkpoint_uri
}

output "agent_autoscaling_group_name" {
  description = "Scale the GPU fleet with this group's desired capacity."
  value       = module.spotwise.agent_autoscaling_group_name
}

output "metrics_url" {
  description = "Prometheus endpoint of the daemon."
  value       = module.spotwise.metrics_url
}
