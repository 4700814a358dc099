"""Build hook: generate the gRPC/protobuf code from protos/ while the package is built.

`pip install .`, `pip wheel .`, `pip install -e .` and `python -m build` all run
setuptools' build_py, which runs grpc_tools.protoc here first (grpcio-tools is a
build requirement in pyproject.toml), so every wheel carries `refund.v1.refund_pb2`
and `refund_pb2_grpc` while git holds only the .proto files. Everything else about
the package is in pyproject.toml.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "gen"


def generate_protos() -> None:
    """protos/**/*.proto -> gen/**/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py (skipped when up to date)."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    for proto in sorted(PROTOS.rglob("*.proto")):
        relative = proto.relative_to(PROTOS)
        target = GENERATED / relative.with_name(relative.stem + "_pb2_grpc.py")
        if target.exists() and target.stat().st_mtime >= proto.stat().st_mtime:
            continue
        arguments = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={GENERATED}",
                     f"--pyi_out={GENERATED}", f"--grpc_python_out={GENERATED}", str(proto)]
        if protoc.main(arguments) != 0:
            sys.exit(f"protoc failed on {relative}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
