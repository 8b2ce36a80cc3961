"""Rebuild the committed Python code in proto/v1/ from the sources in proto/spotwise/v1/.

`make proto` runs `python -m spotwise.proto.build`. protoc derives a generated module's imports
from the source's path under the include root: compiled from `spotwise/v1/agent.proto`, the code
would say `from spotwise.v1 import jobs_pb2`, a package that does not exist. So the sources are
copied into a temporary include root laid out as `spotwise/proto/v1/` (with their `import
"spotwise/v1/..."` lines rewritten to match), compiled there, and the results copied into
proto/v1/, where the imports read `from spotwise.proto.v1 import jobs_pb2`.

The output is a pure function of the sources and the grpcio-tools version, so
tests/unit/test_proto_drift.py regenerates into a temporary directory and compares.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "spotwise" / "v1"
"""Where the .proto sources live (the path follows the proto package spotwise.v1)."""
OUTPUT_DIR = Path(__file__).resolve().parent / "v1"
"""Where the generated modules are committed (the package spotwise.proto.v1)."""
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
"""What protoc writes for each source."""

_IMPORT = re.compile(r'^(\s*import\s+(?:public\s+|weak\s+)?")spotwise/v1/', re.MULTILINE)


class ProtoBuildError(RuntimeError):
    """protoc refused the sources."""


def generated_names(source_dir: Path = SOURCE_DIR) -> list[str]:
    """File names the build produces for the sources in `source_dir`, sorted."""
    stems = sorted(p.stem for p in source_dir.glob("*.proto"))
    return sorted(f"{stem}{suffix}" for stem in stems for suffix in GENERATED_SUFFIXES)


def generate(out_dir: Path, source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Compile every .proto in `source_dir` and write the generated files into `out_dir`.

    Returns the written paths. Raises ProtoBuildError with protoc's exit code if it fails.
    """
    from grpc_tools import protoc  # dev dependency: imported only when building

    sources = sorted(source_dir.glob("*.proto"))
    if not sources:
        raise ProtoBuildError(f"no .proto files in {source_dir}")
    wkt_include = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spotwise-proto-") as tmp:
        root = Path(tmp) / "include"
        package_dir = root / "spotwise" / "proto" / "v1"
        package_dir.mkdir(parents=True)
        gen_dir = Path(tmp) / "out"
        gen_dir.mkdir()
        for src in sources:
            text = _IMPORT.sub(r"\1spotwise/proto/v1/", src.read_text(encoding="utf-8"))
            (package_dir / src.name).write_text(text, encoding="utf-8")
        rel_sources = [f"spotwise/proto/v1/{src.name}" for src in sources]
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{wkt_include}",
            f"--python_out={gen_dir}",
            f"--pyi_out={gen_dir}",
            f"--grpc_python_out={gen_dir}",
            *rel_sources,
        ]
        code = protoc.main(args)
        if code != 0:
            raise ProtoBuildError(f"protoc exited with {code} for {', '.join(rel_sources)}")
        written = []
        for name in generated_names(source_dir):
            produced = gen_dir / "spotwise" / "proto" / "v1" / name
            if not produced.exists():
                raise ProtoBuildError(f"protoc did not produce {name}")
            target = out_dir / name
            shutil.copyfile(produced, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUTPUT_DIR, help="where to write (default: proto/v1/)"
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out)
    except ProtoBuildError as exc:
        print(f"proto build failed: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
