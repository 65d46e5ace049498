"""The committed stubs in splitspec/v1 must be what protoc generates from proto/ today, up to the
version stamp of the grpcio-tools that generated them (a newer patch release installed by
`make test` stamps its own version and generates the same code)."""

from __future__ import annotations

import re
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
VERSION_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def unstamped(text: str) -> str:
    return VERSION_STAMP.sub("GRPC_GENERATED_VERSION = ''", text)


def test_committed_stubs_match_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos]
    assert protoc.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    stale = [str(p) for p in generated if unstamped((ROOT / p).read_text()) != unstamped((tmp_path / p).read_text())]
    assert not stale, f"run `make proto`: these stubs differ from proto/: {stale}"


def test_only_the_version_stamp_is_ignored():
    stub = "import grpc\nGRPC_GENERATED_VERSION = '1.85.1'\nGRPC_VERSION = grpc.__version__\n"
    assert unstamped(stub) == unstamped(stub.replace("1.85.1", "1.85.4"))
    assert unstamped(stub) != unstamped(stub.replace("GRPC_VERSION = grpc", "GRPC_VERSION = grpcx"))
