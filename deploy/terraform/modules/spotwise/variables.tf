# --- Naming -----------------------------------------------------------------------------------

variable "name" {
  description = "Name of this spotwise cluster; prefixes every resource name and the SSM parameter path."
  type        = string
  default     = "spotwise"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.name))
    error_message = "name must be 3-24 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource the module creates (and to the instances the auto scaling group launches)."
  type        = map(string)
  default     = {}
}

# --- Network ----------------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC that holds the head node and the agents."
  type        = string
}

variable "head_subnet_id" {
  description = "Subnet of the head node. Must be a public subnet (with an internet gateway route) when head_public_ip is true."
  type        = string
}

variable "agent_subnet_ids" {
  description = "Subnets the auto scaling group launches agents into; one per availability zone widens the spot capacity pools. They need outbound internet (NAT) to install spotwise."
  type        = list(string)

  validation {
    condition     = length(var.agent_subnet_ids) > 0
    error_message = "agent_subnet_ids needs at least one subnet."
  }
}

variable "admin_cidrs" {
  description = "IPv4 CIDRs (your laptop's or office's) allowed to reach the daemon port and the metrics port. Never 0.0.0.0/0; leave empty to reach the daemon only through a VPN or SSM port forwarding."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for cidr in var.admin_cidrs : can(cidrhost(cidr, 0)) && !strcontains(cidr, ":") && try(tonumber(split("/", cidr)[1]) >= 8, false)
    ])
    error_message = "admin_cidrs must be IPv4 CIDRs no wider than /8: the daemon must never be open to the whole internet (0.0.0.0/0)."
  }
}

variable "beat_port" {
  description = "TCP port of the daemon's beat channel, where agents heartbeat (TLS)."
  type        = number
  default     = 7451

  validation {
    condition     = var.beat_port > 0 && var.beat_port < 65536
    error_message = "beat_port must be a TCP port number."
  }
}

variable "daemon_port" {
  description = "TCP port of the daemon's gRPC server (TLS)."
  type        = number
  default     = 7450

  validation {
    condition     = var.daemon_port > 0 && var.daemon_port < 65536
    error_message = "daemon_port must be a TCP port number."
  }
}

variable "metrics_port" {
  description = "TCP port of the daemon's Prometheus exporter (plain HTTP, admitted from admin_cidrs only)."
  type        = number
  default     = 9450

  validation {
    condition     = var.metrics_port > 0 && var.metrics_port < 65536
    error_message = "metrics_port must be a TCP port number."
  }
}

variable "head_public_ip" {
  description = "Give the head node an Elastic IP so that laptops in admin_cidrs can reach the daemon over the internet (TLS and a token are still required)."
  type        = bool
  default     = false
}

variable "daemon_dns_names" {
  description = "Extra DNS names for the daemon's TLS certificate (e.g. a Route 53 record you point at the head node)."
  type        = list(string)
  default     = []
}

# --- Security ---------------------------------------------------------------------------------

variable "mutual_tls" {
  description = "Require every caller (agents and laptops) to present a client certificate signed by the cluster CA, on top of its token."
  type        = bool
  default     = false
}

variable "certificate_validity_hours" {
  description = "Lifetime of the daemon and client certificates; re-apply before they expire (Terraform renews them in the last tenth of it)."
  type        = number
  default     = 8760
}

variable "enable_ssm_session_manager" {
  description = "Attach AmazonSSMManagedInstanceCore to the head node's role for shell access through SSM Session Manager (no SSH port is ever opened). That managed policy is broad (ssm:GetParameter on every parameter of the account); leave off where that matters."
  type        = bool
  default     = false
}

# --- Checkpoint storage -----------------------------------------------------------------------

variable "bucket_name" {
  description = "Name of the checkpoint bucket; null makes <name>-checkpoints-<account id>."
  type        = string
  default     = null
}

variable "checkpoint_prefix" {
  description = "Key prefix for checkpoints in the bucket; instances may read and write only under it, and jobs may checkpoint only under it."
  type        = string
  default     = "checkpoints/"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*/$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be a non-empty key prefix ending with '/', without a leading '/'."
  }
}

variable "checkpoint_expiration_days" {
  description = "Delete checkpoint objects this many days after they were written. A backstop for abandoned jobs (the runtime already deletes checkpoints beyond each job's keep count); make it longer than any job may sit idle."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_expiration_days >= 1
    error_message = "checkpoint_expiration_days must be at least 1."
  }
}

variable "access_log_days" {
  description = "Keep the checkpoint bucket's access logs (every request: who read or wrote which job's checkpoints) this many days."
  type        = number
  default     = 90

  validation {
    condition     = var.access_log_days >= 1
    error_message = "access_log_days must be at least 1."
  }
}

variable "force_destroy_bucket" {
  description = "Let terraform destroy delete the bucket with its checkpoints in it."
  type        = bool
  default     = false
}

# --- Software ---------------------------------------------------------------------------------

variable "spotwise_pip_spec" {
  description = "What cloud-init pip-installs into /opt/spotwise/.venv on every node: a requirement such as \"spotwise==0.1.0\" or a URL of a wheel or repository."
  type        = string
  default     = "spotwise==0.1.0"

  validation {
    condition     = length(var.spotwise_pip_spec) > 0 && !strcontains(var.spotwise_pip_spec, "'")
    error_message = "spotwise_pip_spec must be a non-empty pip requirement without single quotes."
  }
}

variable "agent_setup_commands" {
  description = "Shell commands run as root on each agent after spotwise is installed and before the agent starts (e.g. fetch your training code into /var/lib/spotwise/work)."
  type        = list(string)
  default     = []
}

# --- Head node --------------------------------------------------------------------------------

variable "head_ami_id" {
  description = "AMI of the head node: Ubuntu 22.04/24.04 or Debian 12 (cloud-init installs python3-venv with apt)."
  type        = string
}

variable "head_instance_type" {
  description = "Instance type of the head node (on-demand; the daemon needs little CPU and memory)."
  type        = string
  default     = "m7i.large"
}

variable "head_root_volume_gb" {
  description = "Root volume size of the head node in GiB (holds the SQLite state and logs)."
  type        = number
  default     = 30
}

# --- Agents -----------------------------------------------------------------------------------

variable "agent_ami_id" {
  description = "AMI of the training nodes: an Ubuntu-based GPU AMI with the NVIDIA driver (e.g. the AWS Deep Learning Base GPU AMI)."
  type        = string
}

variable "gpu_instance_types" {
  description = "GPU instance types the auto scaling group may launch, as overrides of its mixed instances policy; list several of similar size so capacity-optimized spot can pick the deepest pools."
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge", "g4dn.xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0
    error_message = "gpu_instance_types needs at least one instance type."
  }
}

variable "agent_min_size" {
  description = "Fewest agents the auto scaling group keeps."
  type        = number
  default     = 0
}

variable "agent_max_size" {
  description = "Most agents the auto scaling group may run (the ceiling for every job's nodes.max together)."
  type        = number
  default     = 8
}

variable "agent_desired_capacity" {
  description = "Agents to start with. Only set at creation: afterwards whoever scales the fleet (the daemon or `aws autoscaling set-desired-capacity`) owns it and Terraform leaves it alone."
  type        = number
  default     = 0
}

variable "on_demand_percentage_above_base_capacity" {
  description = "Percent of agents above the (zero) on-demand base that are on-demand rather than spot; 0 is all spot."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_percentage_above_base_capacity >= 0 && var.on_demand_percentage_above_base_capacity <= 100
    error_message = "on_demand_percentage_above_base_capacity must be between 0 and 100."
  }
}

variable "agent_root_volume_gb" {
  description = "Root volume size of each agent in GiB (the AMI, the Python environment, local caches)."
  type        = number
  default     = 200
}

variable "agent_grace_seconds" {
  description = "Seconds an agent waits between SIGTERM and SIGKILL when it stops training processes; must stay under the agent unit's TimeoutStopSec (100 s) and the 2-minute spot notice."
  type        = number
  default     = 30

  validation {
    condition     = var.agent_grace_seconds >= 5 && var.agent_grace_seconds <= 70
    error_message = "agent_grace_seconds must be between 5 and 70."
  }
}
