"""The job spec: what a user submits, validated once at the edge by the same model everywhere.

The CLI loads it from YAML (`JobSpec.from_yaml`), the SDK sends it as the proto `JobSpec`, and
the daemon checks what arrives with `validate_spec_proto`, which reports every problem at once
as (field path, description) pairs: the daemon turns them into INVALID_ARGUMENT field
violations, the CLI into a one-line message.

Field paths are dotted, with list indices in brackets: `nodes.max`, `checkpoint.uri`,
`entrypoint[0]`, `env.MY_VAR`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spotwise.common.uri import check_uri

if TYPE_CHECKING:
    from spotwise.proto.v1 import jobs_pb2

UINT32_MAX = 2**32 - 1

MARKETS = ("spot", "on-demand", "spot-with-fallback")
Market = Literal["spot", "on-demand", "spot-with-fallback"]

# Variables the agent sets for every training process (see the runtime <-> agent contract); a
# spec that overrides one would break rendezvous or checkpointing, so it is refused.
RESERVED_ENV = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE",
    }
)
RESERVED_ENV_PREFIX = "SPOTWISE_"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SpecError(ValueError):
    """A job spec is invalid. `violations` holds one (field path, description) per problem.

    The field path is "" for a problem with the whole document (a missing file, bad YAML).
    """

    def __init__(self, violations: list[tuple[str, str]], *, source: str = "") -> None:
        if not violations:
            raise ValueError("SpecError needs at least one violation")
        self.violations = list(violations)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{field}: {desc}" if field else desc for field, desc in self.violations]
        prefix = f"{self.source}: " if self.source else ""
        noun = "problem" if len(parts) == 1 else "problems"
        if len(parts) == 1:
            if not self.violations[0][0]:
                return f"{prefix}{parts[0]}"
            return f"{prefix}invalid job spec: {parts[0]}"
        return f"{prefix}invalid job spec ({len(parts)} {noun}): " + "; ".join(parts)


def _check_env_name(key: str) -> str:
    if not _ENV_NAME.match(key):
        raise ValueError(f"{key!r} is not a valid environment variable name")
    if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(f"{key} is set by the agent for every process and cannot be overridden")
    return key


def _check_env_value(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


EnvName = Annotated[str, AfterValidator(_check_env_name)]
EnvValue = Annotated[str, AfterValidator(_check_env_value)]


class _Model(BaseModel):
    # Frozen: a validated spec is a value. Numbers in YAML string fields (env values, argv items)
    # are taken as their text, as a shell would.
    model_config = ConfigDict(
        extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False
    )


class NodeRange(_Model):
    """How many nodes the job may run on; the daemon picks a world size in between."""

    min: int = Field(1, ge=1, le=UINT32_MAX, description="Fewest nodes the job runs on.")
    max: int = Field(1, ge=1, le=UINT32_MAX, description="Most nodes the job grows to (>= min).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `nodes: 2` means exactly two; `nodes: {min: 2}` means max = min.
        if isinstance(data, int) and not isinstance(data, bool):
            return {"min": data, "max": data}
        if isinstance(data, dict) and "max" not in data and "min" in data:
            return {**data, "max": data["min"]}
        return data

    @field_validator("max")
    @classmethod
    def _max_at_least_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min")
        if low is not None and value < low:
            raise ValueError(f"must be >= nodes.min ({low})")
        return value


class CheckpointSpec(_Model):
    """Where and how often the job checkpoints."""

    uri: str = Field(
        description="Where checkpoints go: a local path (relative to working_dir), "
        "file:///path, or s3://bucket/prefix."
    )
    every_steps: int = Field(
        50, ge=1, le=UINT32_MAX, description="Save every N optimizer steps."
    )
    keep: int = Field(2, ge=1, le=UINT32_MAX, description="Keep the newest K committed checkpoints.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)


class JobSpec(_Model):
    """A training job as a user submits it (mirrors proto spotwise.v1.JobSpec)."""

    name: str = Field(
        "", max_length=128, description="A label for people; the daemon names jobs by id."
    )
    entrypoint: list[str] = Field(
        min_length=1,
        description="argv of one training process, e.g. [python, train.py, --steps, '200'].",
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, description="Extra environment variables for every process."
    )
    working_dir: str = Field(
        "", description="Directory each process starts in; empty = the agent's directory."
    )
    nodes: NodeRange = Field(
        default_factory=NodeRange, description="Fewest and most nodes: {min, max}."
    )
    nproc_per_node: int = Field(
        1, ge=1, le=UINT32_MAX, description="Training processes per node (one per GPU)."
    )
    checkpoint: CheckpointSpec = Field(description="Checkpoint location and cadence.")
    global_batch_size: int = Field(
        ge=1, le=UINT32_MAX, description="Samples per optimizer step over all ranks; fixed across rescales."
    )
    budget_usd: float = Field(
        0.0, ge=0, description="Spending cap in US dollars; 0 means no budget."
    )
    instance_types: list[str] = Field(
        default_factory=list, description="Allowed instance types; empty = the provider's default."
    )
    market: Market = Field(
        "spot", description="Where capacity comes from: spot, on-demand or spot-with-fallback."
    )
    max_failures: int = Field(
        3,
        ge=0,
        le=UINT32_MAX,
        description="Failed generations in a row tolerated before the job is FAILED.",
    )
    total_steps: int = Field(
        0,
        ge=0,
        le=2**64 - 1,
        description="The job's planned optimizer steps, for cost projection; 0 = unknown.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters or newlines")
        return value

    @field_validator("entrypoint", mode="before")
    @classmethod
    def _split_command_line(cls, value: Any) -> Any:
        # A single string is a command line, split as a POSIX shell would (no expansion).
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command line: {exc}") from None
        return value

    @field_validator("entrypoint")
    @classmethod
    def _program(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the program (first item) must not be empty")
        if any("\x00" in arg for arg in value):
            raise ValueError("arguments must not contain NUL characters")
        return value

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("global_batch_size")
    @classmethod
    def _batch_splits_over_processes(cls, value: int, info: ValidationInfo) -> int:
        # Every world size is a multiple of nproc_per_node, so a batch it does not divide can
        # never be split evenly over the ranks; other world sizes are the runtime's business.
        nproc = info.data.get("nproc_per_node")
        if nproc and value % nproc:
            raise ValueError(f"must be divisible by nproc_per_node ({nproc})")
        return value

    @field_validator("budget_usd")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("instance_types")
    @classmethod
    def _instance_types(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or item != item.strip() or any(c.isspace() for c in item):
                raise ValueError(f"{item!r} is not an instance type name")
        if len(set(value)) != len(value):
            raise ValueError("lists an instance type twice")
        return value

    # ---- conversions -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> JobSpec:
        """Load and validate a spec file. Raises SpecError (naming the file) for any problem.

        A relative `working_dir` is taken relative to the file's directory, so a spec next to
        the code it runs works from any current directory.
        """
        source = str(path)
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError([("", "no such file")], source=source) from None
        except IsADirectoryError:
            raise SpecError([("", "is a directory, not a spec file")], source=source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError([("", f"cannot read: {exc}")], source=source) from None
        data = parse_yaml(text, source=source)
        spec = validate_spec_dict(data, source=source)
        if spec.working_dir and not os.path.isabs(spec.working_dir):
            resolved = os.path.normpath(file.resolve().parent / spec.working_dir)
            spec = spec.model_copy(update={"working_dir": resolved})
        return spec

    def to_yaml(self) -> str:
        """The spec as YAML that `from_yaml` reads back to an equal spec."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_proto(self) -> jobs_pb2.JobSpec:
        """The spec as the proto message the daemon receives."""
        from spotwise.proto.v1 import jobs_pb2

        return jobs_pb2.JobSpec(
            name=self.name,
            entrypoint=list(self.entrypoint),
            env=dict(self.env),
            working_dir=self.working_dir,
            nodes=jobs_pb2.NodeRange(min=self.nodes.min, max=self.nodes.max),
            nproc_per_node=self.nproc_per_node,
            checkpoint=jobs_pb2.CheckpointSpec(
                uri=self.checkpoint.uri,
                every_steps=self.checkpoint.every_steps,
                keep=self.checkpoint.keep,
            ),
            global_batch_size=self.global_batch_size,
            budget_usd=self.budget_usd,
            instance_types=list(self.instance_types),
            market=self.market,
            max_failures=self.max_failures,
            total_steps=self.total_steps,
        )

    @classmethod
    def from_proto(cls, msg: jobs_pb2.JobSpec) -> JobSpec:
        """Validate a proto spec; raises SpecError listing every problem."""
        return validate_spec_proto(msg)


def proto_to_dict(msg: jobs_pb2.JobSpec) -> dict[str, Any]:
    """The proto's fields as the model's input.

    proto3 cannot tell an unset scalar from zero, so zeros are passed through and validated as
    given (nproc_per_node = 0 is an error), except where the empty value has no other meaning:
    an unset `market` or unset `nodes`/`checkpoint` message takes the model's default (a
    missing checkpoint is then reported as missing).
    """
    data: dict[str, Any] = {
        "name": msg.name,
        "entrypoint": list(msg.entrypoint),
        "env": dict(msg.env),
        "working_dir": msg.working_dir,
        "nproc_per_node": msg.nproc_per_node,
        "global_batch_size": msg.global_batch_size,
        "budget_usd": msg.budget_usd,
        "instance_types": list(msg.instance_types),
        "max_failures": msg.max_failures,
        "total_steps": msg.total_steps,
    }
    if msg.market:
        data["market"] = msg.market
    if msg.HasField("nodes"):
        data["nodes"] = {"min": msg.nodes.min, "max": msg.nodes.max}
    if msg.HasField("checkpoint"):
        data["checkpoint"] = {
            "uri": msg.checkpoint.uri,
            "every_steps": msg.checkpoint.every_steps,
            "keep": msg.checkpoint.keep,
        }
    return data


def validate_spec_proto(msg: jobs_pb2.JobSpec) -> JobSpec:
    """What the daemon calls on SubmitJob: the validated spec, or SpecError with every violation."""
    return validate_spec_dict(proto_to_dict(msg))


def validate_spec_dict(data: Any, *, source: str = "") -> JobSpec:
    """Validate plain data (parsed YAML, a dict); raises SpecError listing every problem."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError([("", f"a job spec must be a mapping of fields, got {kind}")], source=source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(violations_from(exc), source=source) from None


def violations_from(exc: ValidationError) -> list[tuple[str, str]]:
    """One (field path, description) per pydantic error, in document order."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = [part for part in err["loc"] if not _is_internal_loc(part)]
        out.append((_field_path(loc), _describe(err, loc)))
    return out


def _is_internal_loc(part: Any) -> bool:
    # pydantic marks a failed dict key with a trailing "[key]" and names function validators.
    return isinstance(part, str) and (part == "[key]" or part.startswith("function-"))


def _field_path(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_for(loc: list[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _describe(err: Any, loc: list[Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_for(loc)
        if model is not None and loc and isinstance(loc[-1], str):
            known = list(model.model_fields)
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            return f"unknown field{hint}"
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    ctx = err.get("ctx") or {}
    if kind in _MESSAGES:
        return _MESSAGES[kind].format(**{k: _plain(v) for k, v in ctx.items()})
    msg = str(err["msg"])
    # Our own checks raise ValueError; pydantic prefixes them with "Value error, ".
    return msg.removeprefix("Value error, ")


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_long": "must be at most {max_length} characters",
    "literal_error": "must be one of {expected}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _plain(value: Any) -> Any:
    # 0.0 -> 0: float bounds of float fields read better as the number the user would type.
    return int(value) if isinstance(value, float) and value.is_integer() else value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, *, source: str = "") -> Any:
    """Parse one YAML document; raises SpecError with the line and column of a syntax error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise SpecError([("", f"invalid YAML: {where}{problem}")], source=source) from None
    except yaml.YAMLError as exc:
        raise SpecError([("", f"invalid YAML: {exc}")], source=source) from None
