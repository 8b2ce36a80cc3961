"""Typed configuration of the daemon and the node agent, validated once at the edge.

Each is a pydantic-settings model read, in order of precedence, from: keyword arguments, the
environment (`SPOTWISE_DAEMON_<FIELD>` / `SPOTWISE_AGENT_<FIELD>`), a TOML file, the defaults.
A TOML file may hold both, as `[daemon]` and `[agent]` tables; a file with neither table is
taken as the one section asked for:

    [daemon]
    listen = "127.0.0.1:7450"
    lease_s = 2.0

    [daemon.pricing]          # where node prices come from (PricingSettings)
    offline = true

    [daemon.ec2]              # provider = "ec2" (Ec2Settings)
    launch_template = "lt-0123456789abcdef0"

    [agent]
    daemon = "127.0.0.1:7450"
    slots = 2

`DaemonConfig.load(path)` / `AgentConfig.load(path)` raise ConfigError naming the file and every
bad field.
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from typing_extensions import Self

from spotwise.cloud_config import Ec2Settings, PricingSettings, RaySettings
from spotwise.common.address import check_host_port

__all__ = ["AgentConfig", "ConfigError", "DaemonConfig", "Ec2Settings", "PricingSettings",
           "RaySettings", "default_state_dir"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

DEFAULT_DAEMON_ADDRESS = "127.0.0.1:7450"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the fields."""


def default_state_dir() -> Path:
    """$SPOTWISE_STATE_DIR, else ~/.local/state/spotwise."""
    env = os.environ.get("SPOTWISE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "state" / "spotwise"


# The file being loaded, seen by the settings source below; a ContextVar rather than a class
# attribute so that concurrent loads (threads, tasks) do not see each other's file.
_toml_file: ContextVar[Path | None] = ContextVar("spotwise_config_file", default=None)


class _TomlSection(PydanticBaseSettingsSource):
    """Values from the `[section]` table of the TOML file being loaded (or the whole file)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        path = _toml_file.get()
        if path is None:
            return
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        if isinstance(data.get(section), dict):
            self._values = data[section]
        elif any(isinstance(data.get(s), dict) for s in ("daemon", "agent")):
            self._values = {}  # the file configures the other part only
        else:
            self._values = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class _Config(BaseSettings):
    _section: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSection(settings_cls, cls._section))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Self:
        """Read the config: overrides, then the environment, then `path` (TOML), then defaults.

        Raises ConfigError naming the file (or the environment) and each invalid field.
        """
        token = _toml_file.set(Path(path) if path is not None else None)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            where = str(path) if path is not None else "configuration"
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: "
                f"{str(err['msg']).removeprefix('Value error, ')}"
                for err in exc.errors(include_url=False)
            )
            raise ConfigError(f"{where}: invalid {cls._section} config: {problems}") from None
        finally:
            _toml_file.reset(token)


class DaemonConfig(_Config):
    """How the coordinator daemon runs."""

    model_config = SettingsConfigDict(env_prefix="SPOTWISE_DAEMON_", extra="forbid")
    _section: ClassVar[str] = "daemon"

    listen: str = Field(
        DEFAULT_DAEMON_ADDRESS,
        description="host:port the gRPC server binds; port 0 picks a free port.",
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Directory of the SQLite database (spotwise.db) and the local logs.",
    )
    beat_listen: str = Field(
        "",
        description="host:port of the beat channel, where agents heartbeat with TLS frames "
        "far cheaper than gRPC messages (open it to the agents beside listen's port); empty = "
        "listen's host and a free port; \"off\" = agents heartbeat on the gRPC stream.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="The daemon's event loop: uvloop (its TLS and sockets cost about a tenth "
        "less CPU per heartbeat), asyncio (the standard library's), or auto = uvloop when it "
        "is installed (it is a dependency on Linux).",
    )
    advertise_address: str = Field(
        "",
        description="host:port that agents on launched machines dial (the ec2 provider writes "
        "it into their user data); empty = the listen address.",
    )
    heartbeat_interval_s: float = Field(
        0.5, gt=0, description="How often agents heartbeat (told to them at Register)."
    )
    lease_s: float = Field(
        2.0, gt=0, description="A node silent for this long is LOST; a few heartbeat intervals."
    )
    failure_lease_s: float | None = Field(
        None,
        gt=0,
        description="Lease of a member silent since its generation reported a failed rank; "
        "default 2.5 heartbeat intervals (at most lease_s).",
    )
    settle_s: float = Field(
        1.0, ge=0, description="Joins are batched: nodes that join within this window rescale once."
    )
    grow_checkpoint_timeout_s: float = Field(
        20.0,
        ge=0,
        description="Before growing a job, ask for a checkpoint and wait this long for it "
        "(0: grow at once, replaying the steps since the last commit).",
    )
    restart_grace_s: float = Field(
        15.0,
        gt=0,
        description="After a daemon restart, how long known nodes have to call again before "
        "they count as LOST (covers the agents' reconnect backoff).",
    )
    tick_s: float = Field(
        0.1, gt=0, le=5, description="How often the control loop runs the controller."
    )
    accounting_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often jobs are charged and budgets checked (a job never overspends by "
        "more than one interval's cost).",
    )
    budget_teardown_s: float = Field(
        35.0,
        ge=0,
        description="What a stopped job still costs, in seconds of its nodes: the final "
        "checkpoint (the agents' 30 s grace at most), the fleet's next pass and the provider "
        "terminating the machines (each is charged until the provider confirms it gone). A "
        "budget stop leaves this margin; the daemon raises it to the longest teardown it has "
        "measured.",
    )
    drain_timeout_s: float = Field(
        90.0,
        gt=0,
        description="Longest wait for a drain checkpoint when a notice gives no deadline.",
    )
    drain_margin_s: float = Field(
        10.0,
        ge=0,
        description="Leave a draining node this long before its notice's deadline.",
    )
    provider: Literal["none", "local", "ec2", "ray"] = Field(
        "none",
        description="Who launches nodes: none (agents start themselves), local (agent "
        "subprocesses), ec2 (spot instances, [daemon.ec2]) or ray (agent actors on a Ray "
        "cluster, [daemon.ray]).",
    )
    ec2: Ec2Settings = Field(
        default_factory=Ec2Settings, description="The EC2 provider's settings ([daemon.ec2])."
    )
    ray: RaySettings = Field(
        default_factory=RaySettings, description="The Ray provider's settings ([daemon.ray])."
    )
    pricing: PricingSettings = Field(
        default_factory=PricingSettings,
        description="Where node prices come from ([daemon.pricing]); an agent's non-zero "
        "price_per_hour overrides them.",
    )
    max_watchers_per_principal: int = Field(
        64, ge=1, description="WatchJob streams one principal may hold open at once."
    )
    agent_prices: bool = Field(
        False,
        description="Charge each node the price_per_hour its agent reports (only for fleets "
        "whose agents the operator controls); off: the price book prices every node.",
    )
    local_max_nodes: int = Field(
        3, ge=0, description="local provider: the most agent subprocesses it runs at once."
    )
    local_instance_type: str = Field(
        "local", description="local provider: the instance type its nodes report (priced by "
        "the price book unless local_price_per_hour is set)."
    )
    local_price_per_hour: float = Field(
        0.0, ge=0, description="local provider: what each of its nodes costs per hour (0: the "
        "price book's price for local_instance_type, or the unpriced upper bound)."
    )
    fleet_interval_s: float = Field(
        2.0, gt=0, description="How often the fleet reconciler compares wanted and existing nodes."
    )
    provider_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for one provider call (launch, terminate, list)."
    )
    log_dir: Path | None = Field(
        None, description="Where local agents keep process logs; default <state_dir>/logs."
    )
    grace_s: float = Field(
        30.0, gt=0, description="local provider: agents' SIGTERM-to-SIGKILL grace period."
    )
    tls_cert_file: str = Field("", description="The daemon's TLS certificate (PEM); empty = no TLS.")
    tls_key_file: str = Field("", description="The private key of tls_cert_file (PEM).")
    tls_client_ca_file: str = Field(
        "", description="CA that signs client certificates (for mutual TLS)."
    )
    tls_require_client_cert: bool = Field(
        False, description="Mutual TLS: refuse callers without a certificate from that CA."
    )
    tokens_file: str = Field(
        "", description="Hashes of the client and agent tokens; empty = no token check."
    )
    allow_insecure: bool = Field(
        False, description="Allow plaintext beyond loopback (never on an untrusted network)."
    )
    checkpoint_prefixes: list[str] = Field(
        default_factory=list, description="Jobs may checkpoint only under these (empty: anywhere)."
    )
    notice_queue_url: str = Field(
        "", description="SQS queue of EventBridge spot interruption events; empty = none."
    )
    notice_queue_region: str = Field("us-east-1", description="Region of notice_queue_url.")
    notice_queue_endpoint_url: str = Field(
        "", description="SQS endpoint override (a local test server); empty = AWS."
    )
    notice_queue_wait_s: int = Field(
        10, ge=0, le=20, description="Long-poll wait of each read of the notice queue."
    )
    metrics_listen: str = Field(
        "", description="host:port of the Prometheus exporter; empty = no exporter."
    )

    @model_validator(mode="after")
    def _check(self) -> DaemonConfig:
        check_host_port(self.listen, "listen")
        if self.metrics_listen:
            check_host_port(self.metrics_listen, "metrics_listen")
        if self.advertise_address:
            check_host_port(self.advertise_address, "advertise_address")
        if self.failure_lease_s is not None and self.failure_lease_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"failure_lease_s ({self.failure_lease_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_require_client_cert and not self.tls_client_ca_file:
            raise ValueError("tls_require_client_cert needs tls_client_ca_file")
        if self.provider == "ec2":
            self.ec2.ec2_config()  # ValueError (a field violation) if it cannot launch
        if self.provider == "ray":
            self.ray.ray_config()  # ValueError if no node could be held
        if self.lease_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or every node looks lost"
            )
        return self

    @property
    def effective_failure_lease_s(self) -> float:
        """failure_lease_s, or 2.5 heartbeat intervals, never more than lease_s."""
        value = self.failure_lease_s or 2.5 * self.heartbeat_interval_s
        return min(value, self.lease_s)

    @property
    def pricing_offline(self) -> bool:
        """pricing.offline, or: offline unless the provider is ec2."""
        return self.pricing.offline if self.pricing.offline is not None else self.provider != "ec2"

    @property
    def db_path(self) -> Path:
        """The daemon's SQLite database."""
        return self.state_dir / "spotwise.db"

    @property
    def effective_log_dir(self) -> Path:
        """log_dir, or <state_dir>/logs."""
        return self.log_dir if self.log_dir is not None else self.state_dir / "logs"


class AgentConfig(_Config):
    """How a node agent runs."""

    model_config = SettingsConfigDict(env_prefix="SPOTWISE_AGENT_", extra="forbid")
    _section: ClassVar[str] = "agent"

    daemon: str = Field(DEFAULT_DAEMON_ADDRESS, description="host:port of the daemon.")
    node_id: str = Field("", description="This node's id; empty = the daemon assigns one.")
    address: str = Field(
        "127.0.0.1", description="Host the node's peers reach it on (rendezvous, collectives)."
    )
    slots: int = Field(1, ge=1, description="Training processes this node can run at once.")
    gpus: int = Field(0, ge=0, description="GPUs on this node (0 on a CPU machine).")
    instance_id: str = Field("", description="Cloud instance id; empty = read from IMDS or none.")
    instance_type: str = Field("", description="Cloud instance type, for pricing and placement.")
    zone: str = Field("", description="Availability zone.")
    lifecycle: Literal["spot", "on-demand"] = Field("spot", description="spot or on-demand.")
    price_per_hour: float = Field(0.0, ge=0, description="What this node costs, USD per hour.")
    provider_node: str = Field("", description="The provider's handle for this node, e.g. local-3.")
    state_dir: Path = Field(
        default_factory=default_state_dir, description="Where the agent keeps its state."
    )
    log_dir: Path | None = Field(
        None, description="Process logs: <log_dir>/<job>/g<gen>/rank<r>.log; default <state_dir>/logs."
    )
    grace_s: float = Field(
        30.0, gt=0, description="SIGTERM-to-SIGKILL grace period when stopping a generation."
    )
    rpc_timeout_s: float = Field(5.0, gt=0, description="Timeout of each call to the daemon.")
    reconnect_max_backoff_s: float = Field(
        5.0, gt=0, description="Longest wait between retries while the daemon is unreachable."
    )
    imds_endpoint: str = Field(
        "", description="Instance metadata service URL to poll for notices; empty = none."
    )
    imds_poll_s: float = Field(2.0, gt=0, description="How often to poll the metadata service.")
    token_file: str = Field(
        "", description="File holding this agent's token (role agent); empty = send none."
    )
    tls_ca_file: str = Field("", description="CA to verify the daemon's certificate; empty = no TLS.")
    tls_cert_file: str = Field("", description="Client certificate, when the daemon wants mTLS.")
    tls_key_file: str = Field("", description="The private key of tls_cert_file.")
    metrics_listen: str = Field(
        "", description="host:port of the agent's Prometheus exporter; empty = no exporter."
    )
    run_as: str = Field(
        "", description="Unprivileged user the training processes run as; empty = the agent's own."
    )
    job_role_arn: str = Field(
        "",
        description="IAM role assumed for each job's S3 credentials, narrowed to its checkpoint "
        "folder; empty = jobs get no AWS credentials from the agent.",
    )
    job_checkpoint_prefix: str = Field(
        "",
        description="s3://bucket/prefix holding each job's checkpoints at <prefix>/<job id> "
        "(the scope of job_role_arn's credentials).",
    )

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        check_host_port(self.daemon, "daemon")
        if bool(self.job_role_arn) != bool(self.job_checkpoint_prefix):
            raise ValueError("job_role_arn and job_checkpoint_prefix are set together or not at all")
        if self.job_checkpoint_prefix and not self.job_checkpoint_prefix.startswith("s3://"):
            raise ValueError(f"job_checkpoint_prefix must be s3://bucket/prefix, got {self.job_checkpoint_prefix!r}")
        if self.metrics_listen:
            check_host_port(self.metrics_listen, "metrics_listen")
        return self

    @property
    def effective_log_dir(self) -> Path:
        """log_dir, or <state_dir>/logs."""
        return self.log_dir if self.log_dir is not None else self.state_dir / "logs"
