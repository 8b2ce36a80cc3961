"""The job spec model: YAML and proto round trips, and every problem reported by field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from spotwise.common.uri import check_uri
from spotwise.proto.v1 import jobs_pb2
from spotwise.spec import (
    CheckpointSpec,
    JobSpec,
    NodeRange,
    SpecError,
    validate_spec_dict,
    validate_spec_proto,
)

REPO = Path(__file__).resolve().parents[2]

FULL_YAML = """\
name: lm-test
entrypoint: [python, train.py, --steps, 200, --lr, 3e-3]
env:
  OMP_NUM_THREADS: 2
  HF_HOME: /tmp/hf
working_dir: /srv/job
nodes: {min: 2, max: 4}
nproc_per_node: 2
checkpoint:
  uri: s3://my-bucket/spotwise/lm
  every_steps: 25
  keep: 3
global_batch_size: 64
budget_usd: 12.5
instance_types: [g5.xlarge, g6.xlarge]
market: spot-with-fallback
max_failures: 5
"""


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _minimal(**extra: object) -> dict[str, object]:
    data: dict[str, object] = {
        "entrypoint": ["python", "train.py"],
        "checkpoint": {"uri": "runs/ckpt"},
        "global_batch_size": 8,
    }
    data.update(extra)
    return data


def _paths(err: SpecError) -> list[str]:
    return [field for field, _ in err.violations]


def test_yaml_to_model_to_proto_to_model_round_trip(tmp_path: Path) -> None:
    spec = JobSpec.from_yaml(_write(tmp_path, FULL_YAML))
    # YAML numbers in argv and env become their text, as a shell would pass them.
    assert spec.entrypoint == ["python", "train.py", "--steps", "200", "--lr", "3e-3"]
    assert spec.env == {"OMP_NUM_THREADS": "2", "HF_HOME": "/tmp/hf"}
    assert spec.nodes == NodeRange(min=2, max=4)
    assert spec.checkpoint == CheckpointSpec(uri="s3://my-bucket/spotwise/lm", every_steps=25, keep=3)

    msg = spec.to_proto()
    assert isinstance(msg, jobs_pb2.JobSpec)
    assert list(msg.entrypoint) == spec.entrypoint
    assert (msg.nodes.min, msg.nodes.max, msg.checkpoint.keep) == (2, 4, 3)
    assert msg.market == "spot-with-fallback" and msg.budget_usd == 12.5

    # Through the wire format too, as the daemon receives it.
    wire = jobs_pb2.JobSpec.FromString(msg.SerializeToString())
    assert JobSpec.from_proto(wire) == spec
    assert validate_spec_proto(wire) == spec

    # And back through YAML.
    again = JobSpec.from_yaml(_write(tmp_path, spec.to_yaml(), "again.yaml"))
    assert again == spec


def test_defaults_and_shorthands() -> None:
    spec = validate_spec_dict(
        {
            "entrypoint": "python train.py --name 'two words'",
            "nodes": 3,
            "checkpoint": {"uri": "/tmp/ckpt"},
            "global_batch_size": 6,
        }
    )
    assert spec.entrypoint == ["python", "train.py", "--name", "two words"]
    assert spec.nodes == NodeRange(min=3, max=3)
    assert (spec.nproc_per_node, spec.market, spec.budget_usd) == (1, "spot", 0.0)
    assert (spec.checkpoint.every_steps, spec.checkpoint.keep) == (50, 2)
    assert validate_spec_dict(_minimal(nodes={"min": 2})).nodes == NodeRange(min=2, max=2)
    # Unset proto messages and an empty market take the model's defaults.
    msg = validate_spec_dict(_minimal()).to_proto()
    msg.ClearField("nodes")
    msg.market = ""
    spec = validate_spec_proto(msg)
    assert spec.nodes == NodeRange(min=1, max=1) and spec.market == "spot"


def test_several_errors_each_reported_by_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
entrypoint: []
env: {RANK: "3", SPOTWISE_JOB_ID: x, 9LIVES: y, OK_VAR: fine}
nodes: {min: 3, max: 2}
nproc_per_node: 4
checkpoint: {uri: "gs://bucket/x", every_steps: 0, keep: 0}
global_batch_size: 6
budget_usd: -1
market: cheapest
max_failures: -2
instance_types: ["g5.xlarge", ""]
""",
    )
    with pytest.raises(SpecError) as info:
        JobSpec.from_yaml(path)
    err = info.value
    assert sorted(_paths(err)) == sorted(
        [
            "entrypoint",
            "env.RANK",
            "env.SPOTWISE_JOB_ID",
            "env.9LIVES",
            "nodes.max",
            "checkpoint.uri",
            "checkpoint.every_steps",
            "checkpoint.keep",
            "global_batch_size",
            "budget_usd",
            "instance_types",
            "market",
            "max_failures",
        ]
    )
    by_field = dict(err.violations)
    assert "nodes.min (3)" in by_field["nodes.max"]
    assert "nproc_per_node (4)" in by_field["global_batch_size"]
    assert "unsupported URI scheme 'gs'" in by_field["checkpoint.uri"]
    assert "cannot be overridden" in by_field["env.RANK"]
    assert by_field["budget_usd"] == "must be >= 0"
    # The message is one line that names the file and every problem.
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}: invalid job spec (13 problems)")


def test_proto_with_several_errors_lists_each_field() -> None:
    msg = jobs_pb2.JobSpec(
        entrypoint=[],
        nodes=jobs_pb2.NodeRange(min=0, max=0),
        nproc_per_node=0,
        checkpoint=jobs_pb2.CheckpointSpec(uri="file://relative/x", every_steps=0, keep=1),
        global_batch_size=0,
        market="auction",
    )
    with pytest.raises(SpecError) as info:
        validate_spec_proto(msg)
    assert sorted(_paths(info.value)) == sorted(
        [
            "entrypoint",
            "nodes.min",
            "nodes.max",
            "nproc_per_node",
            "checkpoint.uri",
            "checkpoint.every_steps",
            "global_batch_size",
            "market",
        ]
    )
    # A spec without a checkpoint section says the section is missing.
    with pytest.raises(SpecError) as info:
        validate_spec_proto(
            jobs_pb2.JobSpec(entrypoint=["python"], nproc_per_node=1, global_batch_size=1)
        )
    assert info.value.violations == [("checkpoint", "required field is missing")]


def test_values_beyond_uint32_are_field_errors_not_proto_errors() -> None:
    with pytest.raises(SpecError) as info:
        validate_spec_dict(_minimal(nproc_per_node=2**32, max_failures=2**40))
    assert sorted(_paths(info.value)) == ["max_failures", "nproc_per_node"]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://My_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3://bucket/a//b", "empty or relative segment"),
        ("s3://bucket/../b", "empty or relative segment"),
        ("s3:/bucket/x", "a scheme needs '://'"),
        ("s3:bucket", "a scheme needs '://'"),
        ("file://tmp/ckpt", "file:// takes no host"),
        ("file://", "no path"),
        ("gs://bucket/x", "unsupported URI scheme"),
        ("https://example.com/x", "unsupported URI scheme"),
        ("s3://bucket/x?versionId=1", "'?' and '#' are not allowed"),
        ("runs/ckpt#1", "'?' and '#' are not allowed"),
        (" /tmp/x", "whitespace"),
        ("/tmp/a\nb", "control characters"),
    ],
)
def test_malformed_checkpoint_uri_is_a_field_error(uri: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec_dict(_minimal(checkpoint={"uri": uri}))
    [(field, desc)] = info.value.violations
    assert field == "checkpoint.uri"
    assert reason in desc


GOOD_URIS = [
    "runs/ckpt",
    "/tmp/spotwise/ckpt",
    "~/ckpt",
    "file:///tmp/ckpt",
    "file://localhost/tmp/ckpt",
    "file:/tmp/ckpt",
    "s3://my-bucket",
    "s3://my-bucket/",
    "s3://my.bucket-1/spotwise/lm",
    "S3://my-bucket/x",
]


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_good_checkpoint_uris_are_accepted_by_the_spec_and_the_runtime(uri: str) -> None:
    from spotwise.worker.runtime.storage import parse_uri

    assert validate_spec_dict(_minimal(checkpoint={"uri": uri})).checkpoint.uri == uri
    # What the spec accepts, the runtime's storage layer must accept too (checked at submit
    # time rather than at the job's first checkpoint).
    parse_uri(uri)


def test_spec_never_accepts_a_uri_the_runtime_refuses() -> None:
    from spotwise.worker.runtime.storage import parse_uri

    candidates = ["C:/x", "ckpt:v1", "s3a://bucket/x", "hdfs://nn/x", "file:", "s3://b", "a?b"]
    for uri in candidates:
        try:
            check_uri(uri)
        except ValueError:
            continue
        parse_uri(uri)  # raises if the spec was more lenient than the runtime


def test_unknown_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
entrypoint: [python, train.py]
nprocs_per_node: 2
checkpoint: {uri: runs/ckpt, evry_steps: 10}
nodes: {min: 1, maximum: 3}
global_batch_size: 8
colour: blue
""",
    )
    with pytest.raises(SpecError) as info:
        JobSpec.from_yaml(path)
    by_field = dict(info.value.violations)
    assert set(by_field) == {"nprocs_per_node", "checkpoint.evry_steps", "nodes.maximum", "colour"}
    assert "did you mean 'nproc_per_node'" in by_field["nprocs_per_node"]
    assert "did you mean 'every_steps'" in by_field["checkpoint.evry_steps"]
    assert "did you mean 'max'" in by_field["nodes.maximum"]
    assert by_field["colour"].startswith("unknown field")


def test_file_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"missing\.yaml: no such file$"):
        JobSpec.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        JobSpec.from_yaml(tmp_path)
    bad = _write(tmp_path, "entrypoint: [python\nnodes: {min: 1\n", "bad.yaml")
    with pytest.raises(SpecError, match=r"bad\.yaml: invalid YAML: line \d+, column \d+"):
        JobSpec.from_yaml(bad)
    dup = _write(tmp_path, "global_batch_size: 8\nglobal_batch_size: 16\n", "dup.yaml")
    with pytest.raises(SpecError, match="duplicate key 'global_batch_size'"):
        JobSpec.from_yaml(dup)
    empty = _write(tmp_path, "", "empty.yaml")
    with pytest.raises(SpecError, match="must be a mapping of fields, got empty"):
        JobSpec.from_yaml(empty)
    listing = _write(tmp_path, "- python\n- train.py\n", "list.yaml")
    with pytest.raises(SpecError, match="got a list"):
        JobSpec.from_yaml(listing)


def test_relative_working_dir_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    path = _write(tmp_path / "jobs", FULL_YAML.replace("/srv/job", ".."))
    assert JobSpec.from_yaml(path).working_dir == str(tmp_path)
    absolute = _write(tmp_path, FULL_YAML, "abs.yaml")
    assert JobSpec.from_yaml(absolute).working_dir == "/srv/job"


@pytest.mark.parametrize("name", ["lm.yaml", "tiny.yaml"])
def test_example_specs_load_and_agree_with_their_arguments(name: str) -> None:
    spec = JobSpec.from_yaml(REPO / "examples" / "jobs" / name)
    assert spec.working_dir == str(REPO)
    argv = spec.entrypoint
    # The script's own --global-batch-size must match the spec's (the runtime reads both).
    assert int(argv[argv.index("--global-batch-size") + 1]) == spec.global_batch_size
    micro = int(argv[argv.index("--micro-batch-size") + 1])
    # The runtime needs global = micro x accumulation x world at every world size it may get.
    for nodes in range(spec.nodes.min, spec.nodes.max + 1):
        assert spec.global_batch_size % (micro * nodes * spec.nproc_per_node) == 0
    assert (REPO / argv[1]).is_file()


def test_every_field_has_a_description() -> None:
    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation)

    walk(JobSpec)


def test_spec_is_immutable() -> None:
    spec = validate_spec_dict(_minimal())
    with pytest.raises(ValueError):
        spec.nproc_per_node = 4  # type: ignore[misc]
