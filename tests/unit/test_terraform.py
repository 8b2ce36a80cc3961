"""The Terraform module in deploy/terraform, read with python-hcl2 (no terraform plan here).

What a fleet operator relies on: user data base64-encoded, the spot allocation strategy spelled
as the Auto Scaling API expects, every agent pointed at the daemon's address, no ingress from
the whole internet to the daemon, a private bucket, least-privilege roles, documented
variables. The cloud-init templates are rendered here with the module's variable names and
parsed as YAML, their configs loaded with spotwise's own config models and their scripts
checked by `bash -n`. With terraform installed, the variables' validation rules are evaluated
by terraform itself.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from spotwise.common.uri import check_checkpoint_uri
from spotwise.config import AgentConfig, DaemonConfig
from spotwise.daemon.auth import check_listen

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "deploy" / "terraform"
MODULE = TERRAFORM / "modules" / "spotwise"
EXAMPLE = TERRAFORM / "examples" / "basic"
TEMPLATES = MODULE / "templates"

# The values the Auto Scaling API accepts for SpotAllocationStrategy.
SPOT_ALLOCATION_STRATEGIES = {
    "lowest-price",
    "capacity-optimized",
    "capacity-optimized-prioritized",
    "price-capacity-optimized",
}
USER_DATA_LIMIT_BYTES = 16 * 1024  # EC2's limit on user data before base64 encoding

OPTIONS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)


@dataclass
class Config:
    """One directory of .tf files, merged."""

    text: str = ""
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for (k, name), body in self.resources.items() if k == kind}


def load(directory: Path) -> Config:
    config = Config()
    files = sorted(directory.glob("*.tf"))
    assert files, directory
    for path in files:
        text = path.read_text()
        config.text += text + "\n"
        doc = hcl2.loads(text, serialization_options=OPTIONS)
        for kind_map in doc.get("resource", []):
            for kind, named in kind_map.items():
                for name, body in named.items():
                    assert (kind, name) not in config.resources, f"{kind}.{name} twice"
                    config.resources[(kind, name)] = body
        for kind_map in doc.get("data", []):
            for kind, named in kind_map.items():
                for name, body in named.items():
                    config.data[(kind, name)] = body
        for entry in doc.get("variable", []):
            config.variables.update(entry)
        for entry in doc.get("output", []):
            config.outputs.update(entry)
        for entry in doc.get("locals", []):
            for key, value in entry.items():
                assert key not in config.locals, f"local.{key} defined twice"
                config.locals[key] = value
        for entry in doc.get("module", []):
            config.modules.update(entry)
    return config


@pytest.fixture(scope="module")
def module() -> Config:
    return load(MODULE)


@pytest.fixture(scope="module")
def example() -> Config:
    return load(EXAMPLE)


def block(body: dict[str, Any], *path: str) -> dict[str, Any]:
    """The single nested block at `path` (hcl2 gives blocks as one-element lists)."""
    for key in path:
        value = body[key]
        assert isinstance(value, list) and len(value) == 1, (key, value)
        body = value[0]
    return body


def template_arguments(expression: str) -> set[str]:
    """The keys of the object literal passed to templatefile(...) in `expression`."""
    assert "templatefile(" in expression
    obj = expression[expression.index("{", expression.index("templatefile(")) :]
    return set(re.findall(r"[{,]\s*([a-z_0-9]+) = ", obj))


def template_path(expression: str) -> Path:
    match = re.search(r'templatefile\("\$\{path\.module\}/([^"]+)"', expression)
    assert match, expression
    return MODULE / match.group(1)


_INTERPOLATION = re.compile(r"(?<!\$)\$\{([^}]*)\}")


def template_names(text: str) -> set[str]:
    return set(_INTERPOLATION.findall(text))


def render(text: str, values: dict[str, object]) -> str:
    """Terraform's templatefile for templates that use plain ${name} interpolations only."""
    assert "%{" not in text, "directives are not used in these templates"

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        assert re.fullmatch(r"[a-z_0-9]+", name), f"not a plain variable: ${{{name}}}"
        return str(values[name])

    return _INTERPOLATION.sub(substitute, text).replace("$${", "${")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def b64gz(text: str) -> str:
    """Terraform's base64gzip."""
    return base64.b64encode(gzip.compress(text.encode())).decode()


FAKE_PEM = "-----BEGIN CERTIFICATE-----\n" + ("A" * 64 + "\n") * 11 + "-----END CERTIFICATE-----\n"
FAKE_DAEMON = "10.0.1.10:7450"


def agent_values(mutual_tls: bool = False) -> dict[str, object]:
    return {
        "region": "us-east-1",
        "spotwise_pip_spec": "spotwise==0.1.0",
        "daemon_address": FAKE_DAEMON,
        "grace_s": 30,
        "agent_unit_gz": b64gz((ROOT / "deploy/systemd/spotwise-agent.service").read_text()),
        "fetch_parameter_b64": b64((TEMPLATES / "fetch-parameter.py").read_text()),
        "ca_cert_b64": b64(FAKE_PEM),
        "token_parameter": "/spotwise/agent/token",
        "tls_key_parameter": "/spotwise/agent/tls-key" if mutual_tls else "",
        "agent_cert_b64": b64(FAKE_PEM) if mutual_tls else "",
        "agent_cert_file": "/etc/spotwise/tls/agent.crt" if mutual_tls else "",
        "agent_key_file": "/etc/spotwise/tls/agent.key" if mutual_tls else "",
        "setup_b64": b64("#!/bin/bash\nset -euo pipefail\necho setup\n"),
        "job_role_arn": "arn:aws:iam::123456789012:role/spotwise-job-1",
        "checkpoint_uri": "s3://spotwise-checkpoints-123456789012/checkpoints/",
        "job_firewall_gz": b64gz((TEMPLATES / "job-firewall.sh").read_text()),
    }


def head_values() -> dict[str, object]:
    return {
        "region": "us-east-1",
        "spotwise_pip_spec": "spotwise==0.1.0",
        "daemon_unit_b64": b64((ROOT / "deploy/systemd/spotwise-daemon.service").read_text()),
        "fetch_parameter_b64": b64((TEMPLATES / "fetch-parameter.py").read_text()),
        "ca_cert_b64": b64(FAKE_PEM),
        "daemon_cert_b64": b64(FAKE_PEM),
        "tokens_b64": b64("sha256:" + "0" * 64 + " agent agents\n"),
        "daemon_key_parameter": "/spotwise/daemon/tls-key",
        "daemon_port": 7450,
        "beat_port": 7451,
        "metrics_port": 9450,
        "require_client_cert": "false",
        "checkpoint_uri": "s3://spotwise-checkpoints-123456789012/checkpoints/",
        "state_volume_id": "vol-0123456789abcdef0",
        "state_volume_serial": "vol0123456789abcdef0",
    }


def write_files(cloud_config: dict[str, Any]) -> dict[str, str]:
    """{path: decoded content} of a cloud-config's write_files."""
    files = {}
    for entry in cloud_config["write_files"]:
        content = entry.get("content", "")
        if entry.get("encoding") == "b64":
            content = base64.b64decode(content).decode()
        elif entry.get("encoding") == "gz+b64":
            content = gzip.decompress(base64.b64decode(content)).decode()
        files[entry["path"]] = content
    return files


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [k for k in os.environ if k.startswith("SPOTWISE_")]:
        monkeypatch.delenv(var)


# --- documentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["module", "example"])
def test_every_variable_and_output_is_documented(
    where: str, request: pytest.FixtureRequest
) -> None:
    config: Config = request.getfixturevalue(where)
    assert config.variables
    for name, body in config.variables.items():
        assert len(body.get("description", "")) > 10, f"variable {name} lacks a description"
        assert "type" in body, f"variable {name} lacks a type"
    for name, body in config.outputs.items():
        assert len(body.get("description", "")) > 10, f"output {name} lacks a description"


def test_references_resolve(module: Config) -> None:
    """What `terraform validate` would catch first: references to things that do not exist."""
    text = "\n".join(line for line in module.text.splitlines() if not line.lstrip().startswith("#"))
    used_vars = set(re.findall(r"\bvar\.([a-z_0-9]+)", text))
    assert used_vars <= set(module.variables), used_vars - set(module.variables)
    unused = set(module.variables) - used_vars
    assert not unused, f"variables nobody uses: {unused}"
    used_locals = set(re.findall(r"\blocal\.([a-z_0-9]+)", text))
    assert used_locals <= set(module.locals), used_locals - set(module.locals)
    used_data = set(re.findall(r"\bdata\.([a-z_0-9]+)\.([a-z_0-9]+)", text))
    assert used_data <= set(module.data), used_data - set(module.data)
    used_resources = set(
        re.findall(r"(?<![.\w])((?:aws|tls|random)_[a-z_0-9]+)\.([a-z_0-9]+)", text)
    )
    missing = {r for r in used_resources if r not in module.resources}
    assert not missing, missing


def test_required_providers_are_pinned(module: Config) -> None:
    doc = hcl2.loads((MODULE / "versions.tf").read_text(), serialization_options=OPTIONS)
    providers = doc["terraform"][0]["required_providers"][0]
    assert set(providers) == {"aws", "tls", "random"}
    for spec in providers.values():
        assert "<" in spec["version"], "every provider needs an upper bound"


# --- user data and cloud-init ------------------------------------------------------------------


def test_user_data_is_base64_encoded_templatefile(module: Config) -> None:
    launch_template = module.resources[("aws_launch_template", "agent")]
    assert launch_template["user_data"].startswith("${base64encode(templatefile(")
    head = module.resources[("aws_instance", "head")]
    assert "user_data" not in head
    assert head["user_data_base64"].startswith("${base64encode(templatefile(")
    assert head["user_data_replace_on_change"] is True


@pytest.mark.parametrize(
    ("resource", "attribute"),
    [
        (("aws_launch_template", "agent"), "user_data"),
        (("aws_instance", "head"), "user_data_base64"),
    ],
)
def test_template_arguments_match_the_template(
    module: Config, resource: tuple[str, str], attribute: str
) -> None:
    expression = module.resources[resource][attribute]
    template = template_path(expression)
    names = template_names(template.read_text())
    assert template_arguments(expression) == names
    values = agent_values() if resource[0] == "aws_launch_template" else head_values()
    assert set(values) == names  # the test's renderer covers every variable too


def test_agents_are_pointed_at_the_daemon(module: Config, clean_env: None, tmp_path: Path) -> None:
    expression = module.resources[("aws_launch_template", "agent")]["user_data"]
    assert "daemon_address = local.daemon_private_address" in expression
    assert (
        module.locals["daemon_private_address"]
        == "${aws_network_interface.head.private_ip}:${var.daemon_port}"
    )
    # The daemon certificate names that same address.
    request = module.resources[("tls_cert_request", "daemon")]
    assert "aws_network_interface.head.private_ip" in request["ip_addresses"]

    rendered = render((TEMPLATES / "agent-cloud-init.yaml.tftpl").read_text(), agent_values())
    assert rendered.startswith("#cloud-config\n")
    cloud_config = yaml.safe_load(rendered)
    files = write_files(cloud_config)
    # The unit installed is the repository's unit, unchanged.
    unit = (ROOT / "deploy/systemd/spotwise-agent.service").read_text()
    assert files["/etc/systemd/system/spotwise-agent.service"] == unit
    assert module.locals["agent_unit"] == (
        '${file("${path.module}/../../../systemd/spotwise-agent.service")}'
    )
    assert (MODULE / "../../../systemd/spotwise-agent.service").resolve().is_file()
    # Its config names the daemon.
    agent_toml = files["/etc/spotwise/agent.toml"]
    assert tomllib.loads(agent_toml)["agent"]["daemon"] == FAKE_DAEMON
    # The bootstrap starts the agent after writing its config, and the config loads in the
    # agent's own model once the boot-time facts are appended.
    bootstrap = files["/opt/spotwise/bin/bootstrap"]
    assert cloud_config["runcmd"] == [["/opt/spotwise/bin/bootstrap"]]
    start = bootstrap.index("systemctl enable --now spotwise-agent.service")
    assert bootstrap.index("cat >> /etc/spotwise/agent.toml") < start
    assert bootstrap.index("/etc/spotwise/agent.token") < start
    facts = (
        'address = "10.0.2.33"\ninstance_id = "i-0abc"\ninstance_type = "g5.xlarge"\n'
        'zone = "us-east-1a"\nlifecycle = "spot"\ngpus = 1\nslots = 1\n'
    )
    path = tmp_path / "agent.toml"
    path.write_text(agent_toml + facts)
    config = AgentConfig.load(path)
    assert config.daemon == FAKE_DAEMON
    assert config.imds_endpoint == "http://169.254.169.254"
    assert config.lifecycle == "spot" and config.slots == 1


def test_head_runs_the_daemon_with_tls_and_prefixes(
    module: Config, clean_env: None, tmp_path: Path
) -> None:
    rendered = render((TEMPLATES / "head-cloud-init.yaml.tftpl").read_text(), head_values())
    cloud_config = yaml.safe_load(rendered)
    files = write_files(cloud_config)
    unit = (ROOT / "deploy/systemd/spotwise-daemon.service").read_text()
    assert files["/etc/systemd/system/spotwise-daemon.service"] == unit
    daemon = tomllib.loads(files["/etc/spotwise/daemon.toml"])["daemon"]
    # What spotwise.daemon.auth will make of it: TLS beyond loopback, checkpoints in the bucket.
    assert check_listen(
        daemon["listen"], tls_enabled=bool(daemon["tls_cert_file"]), insecure_flag=False,
        tokens_enabled=bool(daemon["tokens_file"]),
    )
    assert daemon["allow_insecure"] is False
    check_checkpoint_uri(
        "s3://spotwise-checkpoints-123456789012/checkpoints/job-1", daemon["checkpoint_prefixes"]
    )
    with pytest.raises(ValueError):
        check_checkpoint_uri("s3://somewhere-else/x", daemon["checkpoint_prefixes"])
    bootstrap = files["/opt/spotwise/bin/bootstrap"]
    start = bootstrap.index("systemctl enable --now spotwise-daemon.service")
    assert bootstrap.index("mount /var/lib/spotwise") < start
    assert bootstrap.index("/etc/spotwise/tls/daemon.key") < start
    path = tmp_path / "daemon.toml"
    path.write_text(files["/etc/spotwise/daemon.toml"])
    config = DaemonConfig.load(path)
    assert config.listen == "0.0.0.0:7450"
    assert config.lease_s > config.heartbeat_interval_s


def test_no_secret_in_user_data(module: Config) -> None:
    for resource, attribute in (
        (("aws_launch_template", "agent"), "user_data"),
        (("aws_instance", "head"), "user_data_base64"),
    ):
        expression = module.resources[resource][attribute]
        for secret in ("private_key_pem", "local.agent_token", "local.client_token", "random_"):
            assert secret not in expression, (resource, secret)
    for name, parameter in module.of_type("aws_ssm_parameter").items():
        assert parameter["type"] == "SecureString", name
        assert parameter["key_id"] == "${aws_kms_key.secrets.arn}", name


@pytest.mark.parametrize("mutual_tls", [False, True])
def test_rendered_user_data_fits_and_its_scripts_parse(mutual_tls: bool) -> None:
    for template, values in (
        ("agent-cloud-init.yaml.tftpl", agent_values(mutual_tls)),
        ("head-cloud-init.yaml.tftpl", head_values()),
    ):
        rendered = render((TEMPLATES / template).read_text(), values)
        assert len(rendered.encode()) < USER_DATA_LIMIT_BYTES, template
        files = write_files(yaml.safe_load(rendered))
        if shutil.which("bash"):
            for path in ("/opt/spotwise/bin/bootstrap", "/opt/spotwise/bin/setup"):
                if path in files:
                    result = subprocess.run(
                        ["bash", "-n"],
                        input=files[path],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                    assert result.returncode == 0, (template, path, result.stderr)
        compile(files["/opt/spotwise/bin/fetch-parameter"], "fetch-parameter", "exec")


# --- auto scaling group ------------------------------------------------------------------------


def test_auto_scaling_group_mixed_instances_policy(module: Config) -> None:
    asg = module.resources[("aws_autoscaling_group", "agents")]
    assert asg["capacity_rebalance"] is True
    distribution = block(asg, "mixed_instances_policy", "instances_distribution")
    assert distribution["spot_allocation_strategy"] == "capacity-optimized"
    assert distribution["spot_allocation_strategy"] in SPOT_ALLOCATION_STRATEGIES
    assert distribution["on_demand_base_capacity"] == 0
    launch = block(asg, "mixed_instances_policy", "launch_template")
    spec = block(launch, "launch_template_specification")
    assert spec["launch_template_id"] == "${aws_launch_template.agent.id}"
    overrides = launch["dynamic"][0]["override"]
    assert overrides["for_each"] == "${var.gpu_instance_types}"
    assert block(overrides, "content")["instance_type"] == "${override.value}"
    gpu_types = module.variables["gpu_instance_types"]
    assert gpu_types["type"] == "${list(string)}"
    assert all(t.startswith(("g", "p")) for t in gpu_types["default"])
    # Whoever scales the fleet owns the desired capacity afterwards.
    assert "desired_capacity" in block(asg, "lifecycle")["ignore_changes"][0]
    assert "AZRebalance" in asg["suspended_processes"]


def test_instances_require_imdsv2(module: Config) -> None:
    for resource in (("aws_launch_template", "agent"), ("aws_instance", "head")):
        metadata = block(module.resources[resource], "metadata_options")
        assert metadata["http_tokens"] == "required", resource
        assert metadata["http_endpoint"] == "enabled", resource


# --- network -----------------------------------------------------------------------------------


def test_daemon_and_beat_ports_admit_only_agents_and_admin_cidrs(module: Config) -> None:
    for name, sg in module.of_type("aws_security_group").items():
        assert "ingress" not in sg and "egress" not in sg, f"inline rules hide in {name}"
    assert not module.of_type("aws_security_group_rule"), "use the per-rule resources"
    head_rules = {
        name: rule
        for name, rule in module.of_type("aws_vpc_security_group_ingress_rule").items()
        if rule["security_group_id"] == "${aws_security_group.head.id}"
    }
    assert head_rules
    daemon_rules, beat_rules = {}, {}
    for name, rule in head_rules.items():
        assert rule.get("cidr_ipv4") != "0.0.0.0/0", name
        assert rule.get("cidr_ipv6") != "::/0", name
        assert "prefix_list_id" not in rule, name
        assert rule["ip_protocol"] == "tcp", f"{name} opens every protocol"
        if rule["from_port"] == "${var.daemon_port}":
            daemon_rules[name] = rule
        elif rule["from_port"] == "${var.beat_port}":
            beat_rules[name] = rule
        else:
            assert rule["from_port"] == "${var.metrics_port}", name
        assert rule["to_port"] == rule["from_port"], name
    sources = sorted(
        rule.get("referenced_security_group_id") or rule["cidr_ipv4"]
        for rule in daemon_rules.values()
    )
    assert sources == ["${aws_security_group.agents.id}", "${each.value}"]
    # The beat channel is for agents only.
    assert [r.get("referenced_security_group_id") for r in beat_rules.values()] == [
        "${aws_security_group.agents.id}"]
    admin = next(r for r in daemon_rules.values() if "cidr_ipv4" in r)
    assert admin["for_each"] == "${toset(var.admin_cidrs)}"
    admin_cidrs = module.variables["admin_cidrs"]
    assert admin_cidrs["default"] == []
    condition = block(admin_cidrs, "validation")["condition"]
    assert "cidrhost" in condition and ">= 8" in condition


# --- bucket -----------------------------------------------------------------------------------


def test_bucket_is_private_encrypted_and_expires_old_checkpoints(module: Config) -> None:
    pab = module.resources[("aws_s3_bucket_public_access_block", "checkpoints")]
    for key in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert pab[key] is True, key
    assert pab["bucket"] == "${aws_s3_bucket.checkpoints.id}"
    assert not module.of_type("aws_s3_bucket_acl"), "ACLs are disabled (BucketOwnerEnforced)"
    ownership = module.resources[("aws_s3_bucket_ownership_controls", "checkpoints")]
    assert block(ownership, "rule")["object_ownership"] == "BucketOwnerEnforced"
    versioning = module.resources[("aws_s3_bucket_versioning", "checkpoints")]
    assert block(versioning, "versioning_configuration")["status"] == "Disabled"
    sse = module.resources[("aws_s3_bucket_server_side_encryption_configuration", "checkpoints")]
    assert block(sse, "rule", "apply_server_side_encryption_by_default")["sse_algorithm"]
    lifecycle = module.resources[("aws_s3_bucket_lifecycle_configuration", "checkpoints")]
    expire, abort = lifecycle["rule"]
    assert expire["status"] == abort["status"] == "Enabled"
    assert block(expire, "filter")["prefix"] == "${var.checkpoint_prefix}"
    assert block(expire, "expiration")["days"] == "${var.checkpoint_expiration_days}"
    # Abandoned multipart uploads are aborted bucket-wide (an empty filter).
    assert not block(abort, "filter")
    assert block(abort, "abort_incomplete_multipart_upload")["days_after_initiation"] >= 1
    policy = module.data[("aws_iam_policy_document", "checkpoints_bucket")]
    for statement in policy["statement"]:
        assert statement["effect"] == "Deny", "the bucket policy only denies"


# --- IAM ---------------------------------------------------------------------------------------


def statements(module: Config, name: str) -> list[dict[str, Any]]:
    return module.data[("aws_iam_policy_document", name)]["statement"]


def actions_of(module: Config, name: str) -> set[str]:
    own = {a for s in statements(module, name) for a in s.get("actions", [])}
    sources = module.data[("aws_iam_policy_document", name)].get("source_policy_documents", [])
    if "${data.aws_iam_policy_document.checkpoints_access.json}" in sources:
        own |= {a for s in statements(module, "checkpoints_access") for a in s["actions"]}
    return own


def test_roles_have_least_privilege(module: Config) -> None:
    for name in ("checkpoints_access", "agent", "head", "job_assume"):
        for statement in statements(module, name):
            assert statement.get("effect", "Allow") == "Allow"
            for action in statement["actions"]:
                assert "*" not in action, f"{name}: wildcard action {action}"
            if statement.get("resources") == ["*"]:
                # Only calls without resource-level permissions may use "*".
                assert all(
                    a.split(":")[1].startswith(("Describe", "Get")) for a in statement["actions"]
                ), statement
                assert all(
                    a.split(":")[0] in ("ec2", "autoscaling", "pricing")
                    for a in statement["actions"]
                )
    # S3: the checkpoint prefix only.
    for statement in statements(module, "checkpoints_access"):
        if statement["sid"] == "ReadWriteCheckpoints":
            assert statement["resources"] == [
                "${aws_s3_bucket.checkpoints.arn}/${var.checkpoint_prefix}*"
            ]
        if statement["sid"] == "ListCheckpointPrefix":
            condition = block(statement, "condition")
            assert condition["variable"] == "s3:prefix"
            assert condition["values"] == ["${var.checkpoint_prefix}*"]
    head, agent = actions_of(module, "head"), actions_of(module, "agent")
    assert {"pricing:GetProducts", "ec2:DescribeSpotPriceHistory"} <= head
    assert {
        "autoscaling:SetDesiredCapacity",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    } <= head
    assert not any(a.startswith(("ec2:", "autoscaling:", "pricing:", "iam:")) for a in agent)
    assert not any(a.startswith("iam:") for a in head)
    scale = next(s for s in statements(module, "head") if s["sid"] == "ScaleAgents")
    assert scale["resources"] == ["${aws_autoscaling_group.agents.arn}"]
    # Each role reads its own secrets only.
    for name, path in (("agent", "/agent/*"), ("head", "/daemon/*")):
        secrets = next(s for s in statements(module, name) if "ssm:GetParameter" in s["actions"])
        assert all(r.endswith(path) for r in secrets["resources"]), (name, secrets["resources"])
    profiles = module.of_type("aws_iam_instance_profile")
    assert set(profiles) == {"agent", "head"}
    lt = module.resources[("aws_launch_template", "agent")]
    assert block(lt, "iam_instance_profile")["arn"] == "${aws_iam_instance_profile.agent.arn}"
    assert module.resources[("aws_instance", "head")]["iam_instance_profile"] == (
        "${aws_iam_instance_profile.head.name}"
    )


# --- the example -------------------------------------------------------------------------------


def test_example_uses_the_module_with_every_required_variable(
    example: Config, module: Config
) -> None:
    ((name, call),) = example.modules.items()
    assert (EXAMPLE / call["source"]).resolve() == MODULE.resolve()
    required = {n for n, v in module.variables.items() if "default" not in v}
    given = set(call) - {"source", "version", "providers", "depends_on", "count", "for_each"}
    assert required <= given, required - given
    assert given <= set(module.variables), given - set(module.variables)
    assert call["admin_cidrs"] != ["0.0.0.0/0"]
    referenced = set(re.findall(r"module\.spotwise\.([a-z_0-9]+)", example.text))
    assert referenced <= set(module.outputs), referenced - set(module.outputs)


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform not installed")
def test_terraform_fmt_accepts_the_files() -> None:
    """The real HCL parser and formatter (no providers needed): syntax and canonical layout."""
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- variable validations, evaluated by the real terraform when it is installed ----------------

# -var takes a string variable's value literally and parses any other type as HCL.
REQUIRED_VARS = {
    "vpc_id": "vpc-1",
    "head_subnet_id": "subnet-1",
    "agent_subnet_ids": '["subnet-2"]',
    "head_ami_id": "ami-1",
    "agent_ami_id": "ami-2",
}


@pytest.fixture(scope="module")
def variables_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root module holding only the module's variables: plannable without any provider."""
    if shutil.which("terraform") is None:
        pytest.skip("terraform not installed")
    directory = tmp_path_factory.mktemp("tfvars")
    shutil.copy(MODULE / "variables.tf", directory / "variables.tf")
    result = run_terraform(directory, "init", "-input=false", "-no-color", "-backend=false")
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


def run_terraform(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["terraform", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1"},
    )


def plan(directory: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    values = {**REQUIRED_VARS, **overrides}
    args = [arg for name, value in values.items() for arg in ("-var", f"{name}={value}")]
    return run_terraform(directory, "plan", "-input=false", "-no-color", "-refresh=false", *args)


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("admin_cidrs", "[]", True),
        ("admin_cidrs", '["203.0.113.7/32", "10.0.0.0/8"]', True),
        ("admin_cidrs", '["0.0.0.0/0"]', False),
        ("admin_cidrs", '["203.0.113.7/32", "0.0.0.0/0"]', False),
        ("admin_cidrs", '["::/0"]', False),
        ("admin_cidrs", '["10.0.0.0/4"]', False),
        ("admin_cidrs", '["my-laptop"]', False),
        ("checkpoint_prefix", "checkpoints/", True),
        ("checkpoint_prefix", "teams/ml/ckpt/", True),
        ("checkpoint_prefix", "/checkpoints/", False),
        ("checkpoint_prefix", "checkpoints", False),
        ("checkpoint_prefix", "", False),
        ("name", "spotwise-prod", True),
        ("name", "Spotwise_Prod", False),
        ("gpu_instance_types", "[]", False),
        ("agent_subnet_ids", "[]", False),
        ("agent_grace_seconds", "90", False),
        ("on_demand_percentage_above_base_capacity", "101", False),
        ("spotwise_pip_spec", "spotwise==0.1.0", True),
        ("spotwise_pip_spec", "spotwise'; rm -rf /; echo '", False),
        ("daemon_port", "0", False),
    ],
)
def test_variable_validations(variables_only: Path, name: str, value: str, accepted: bool) -> None:
    result = plan(variables_only, **{name: value})
    assert (result.returncode == 0) == accepted, result.stdout + result.stderr
    if not accepted:
        assert "Invalid value for variable" in result.stderr, result.stderr


# --- issue #10: keys, logs, the job role and the job user ---------------------------------------


def test_the_kms_key_has_a_policy_that_lets_nodes_only_decrypt_via_ssm(module: Config) -> None:
    key = module.resources[("aws_kms_key", "secrets")]
    assert key["policy"] == "${data.aws_iam_policy_document.secrets_key.json}"
    assert key["enable_key_rotation"] is True
    admin, nodes = statements(module, "secrets_key")
    assert block(admin, "principals")["identifiers"] == ["arn:${local.partition}:iam::${local.account_id}:root"]
    assert "kms:*" not in admin["actions"]
    assert nodes["actions"] == ["kms:Decrypt"]
    assert set(block(nodes, "principals")["identifiers"]) == {"${aws_iam_role.head.arn}", "${aws_iam_role.agent.arn}"}
    condition = block(nodes, "condition")
    assert (condition["variable"], condition["values"]) == ("kms:ViaService", ["ssm.${local.region}.amazonaws.com"])


def test_every_request_to_the_checkpoint_bucket_is_logged_to_a_private_bucket(module: Config) -> None:
    logging_ = module.resources[("aws_s3_bucket_logging", "checkpoints")]
    assert logging_["bucket"] == "${aws_s3_bucket.checkpoints.id}"
    assert logging_["target_bucket"] == "${aws_s3_bucket.access_logs.id}"
    pab = module.resources[("aws_s3_bucket_public_access_block", "access_logs")]
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))
    ownership = module.resources[("aws_s3_bucket_ownership_controls", "access_logs")]
    assert block(ownership, "rule")["object_ownership"] == "BucketOwnerEnforced"
    lifecycle = module.resources[("aws_s3_bucket_lifecycle_configuration", "access_logs")]
    assert block(block(lifecycle, "rule"), "expiration")["days"] == "${var.access_log_days}"
    grant, deny = statements(module, "access_logs_bucket")
    assert block(grant, "principals")["identifiers"] == ["logging.s3.amazonaws.com"]
    assert grant["actions"] == ["s3:PutObject"]
    assert {c["variable"] for c in grant["condition"]} == {"aws:SourceArn", "aws:SourceAccount"}
    assert deny["effect"] == "Deny"


def test_agents_write_only_fence_markers_and_jobs_get_the_prefix_through_a_narrowed_role(module: Config) -> None:
    agent = {s["sid"]: s for s in statements(module, "agent")}
    assert "source_policy_documents" not in module.data[("aws_iam_policy_document", "agent")]
    writes = [s for s in agent.values() if any(a.startswith("s3:") and a != "s3:ListBucket" and a != "s3:GetBucketLocation" for a in s["actions"])]
    assert [s["sid"] for s in writes] == ["WriteFenceMarkers"]
    assert writes[0]["resources"] == ["${aws_s3_bucket.checkpoints.arn}/${var.checkpoint_prefix}*/generations/*"]
    assert "s3:DeleteObject" not in writes[0]["actions"]
    assert agent["AssumeJobRole"]["resources"] == ["${aws_iam_role.job.arn}"]
    job = module.resources[("aws_iam_role", "job")]
    assert job["assume_role_policy"] == "${data.aws_iam_policy_document.job_assume.json}"
    assert block(statements(module, "job_assume")[0], "principals")["identifiers"] == ["${aws_iam_role.agent.arn}"]
    assert module.resources[("aws_iam_role_policy", "job")]["policy"] == "${data.aws_iam_policy_document.checkpoints_access.json}"


def test_agents_run_jobs_as_their_own_user_without_the_metadata_service(clean_env: None, tmp_path: Path) -> None:
    files = write_files(yaml.safe_load(render((TEMPLATES / "agent-cloud-init.yaml.tftpl").read_text(), agent_values())))
    agent = tomllib.loads(files["/etc/spotwise/agent.toml"])["agent"]
    assert agent["run_as"] == "spotwise-job"
    assert agent["log_dir"] == "/var/log/spotwise-jobs"
    assert agent["job_checkpoint_prefix"].startswith("s3://") and agent["job_role_arn"].startswith("arn:aws:iam::")
    bootstrap = files["/opt/spotwise/bin/bootstrap"]
    # The job user exists before the agent starts, outside group spotwise; the agent is in its group.
    start = bootstrap.index("systemctl enable --now spotwise-agent.service")
    assert bootstrap.index("useradd --system --gid spotwise-job") < start
    assert "usermod --append --groups spotwise-job spotwise" in bootstrap
    dropin = files["/etc/systemd/system/spotwise-agent.service.d/job-firewall.conf"]
    assert "ExecStartPre=+/opt/spotwise/bin/job-firewall spotwise-job" in dropin.splitlines()
    firewall = files["/opt/spotwise/bin/job-firewall"]
    assert firewall == (TEMPLATES / "job-firewall.sh").read_text()
    assert "--uid-owner" in firewall and "169.254.169.254" in firewall and "fd00:ec2::254" in firewall
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n"], input=firewall, text=True, timeout=30).returncode == 0
    facts = 'address = "10.0.2.33"\ngpus = 1\nslots = 1\n'
    (tmp_path / "agent.toml").write_text(files["/etc/spotwise/agent.toml"] + facts)
    config = AgentConfig.load(tmp_path / "agent.toml")
    assert config.run_as == "spotwise-job" and config.job_role_arn
