"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Callable

from google.protobuf import wrappers_pb2

from controller.csi.errors import csi_rpc
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

PLUGIN_NAME = "csi.shoal.io"
_DRIVER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
#: Topology keys start with this (``topology.shoal.io/node``); node labels are given as they are.
TOPOLOGY_NODE_KEY = "topology.shoal.io/node"


def vendor_version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "0.0.0+unknown"


def check_driver_name(name: str) -> str:
    """A CSI driver name as the spec wants it (GetPluginInfo): at most 63 characters, domain-name style,
    alphanumerics at both ends, dashes and dots between.  Raises ``ValueError`` otherwise."""
    if not _DRIVER_NAME.fullmatch(name):
        raise ValueError(f"CSI driver name {name!r}: at most 63 characters, letters, digits, '-' and '.', "
                         "beginning and ending with a letter or digit (e.g. csi.shoal.io)")
    return name


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """``controller``: whether this process serves the Controller service (the node agent's does not).

    ``ready`` says whether the plugin has finished starting (Probe answers ready=false until then);
    ``name`` is the driver name GetPluginInfo reports (``--csi-driver-name``; the CSIDriver object's name).
    """

    def __init__(self, *, controller: bool, ready: Callable[[], bool] = lambda: True, name: str = PLUGIN_NAME):
        self._controller = controller
        self._ready = ready
        self._name = check_driver_name(name)

    @csi_rpc()
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=vendor_version())

    @csi_rpc()
    def GetPluginCapabilities(self, request, context):
        Service = csi_pb2.PluginCapability.Service
        Expansion = csi_pb2.PluginCapability.VolumeExpansion
        types = ([Service.CONTROLLER_SERVICE] if self._controller else []) + [
            Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        capabilities = [csi_pb2.PluginCapability(service=Service(type=t)) for t in types]
        capabilities.append(csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)

    @csi_rpc()
    def Probe(self, request, context):
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=bool(self._ready())))
