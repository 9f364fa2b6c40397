"""Shoal's CSI driver (spec v1.x, protos/csi/v1/csi.proto): Identity and Controller services over the domain."""
