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


def test_csi_services_import_with_the_spec_field_numbers():
    from protos.csi.v1 import csi_pb2, csi_pb2_grpc

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert set(csi_pb2.DESCRIPTOR.services_by_name) >= {"Identity", "Controller", "Node"}
    assert {m.name for m in csi_pb2.DESCRIPTOR.services_by_name["Controller"].methods} >= {
        "CreateVolume", "DeleteVolume", "ControllerPublishVolume", "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities", "ListVolumes", "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot",
        "DeleteSnapshot", "ListSnapshots", "ControllerExpandVolume", "ControllerGetVolume"}
    assert hasattr(csi_pb2_grpc, "IdentityServicer") and hasattr(csi_pb2_grpc, "ControllerStub")
    numbers = {f.name: f.number for f in csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields}
    assert numbers == {"name": 1, "capacity_range": 2, "volume_capabilities": 3, "parameters": 4, "secrets": 5,
                       "volume_content_source": 6, "accessibility_requirements": 7, "mutable_parameters": 8}
    secrets = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert secrets.GetOptions().Extensions[csi_pb2.csi_secret]
    Mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert (Mode.MULTI_NODE_MULTI_WRITER, Mode.SINGLE_NODE_MULTI_WRITER) == (5, 7)
