"""The checked-in generated code matches the .proto files, and the APIs import from the package."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is a test extra (make test installs it)")
    sys.path.insert(0, str(REPO / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert generate.check() == [], "run: python protos/generate.py"


def test_services_and_messages_import():
    from protos.shoal.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

    assert {m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods} >= {
        "CreateVolume", "AttachVolume", "DetachVolume", "DeleteVolume", "ListVolumes", "GetStatus"}
    assert "ExportVolume" in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name
    assert hasattr(agent_pb2_grpc, "RegistrationServiceStub") and hasattr(admin_pb2_grpc, "AdminServiceServicer")
    info = common_pb2.ExportInfo(volume_id="v", portals=["127.0.0.1:3260"], lun=0)
    assert common_pb2.ExportInfo.FromString(info.SerializeToString()) == info
