"""Shoal node agent: SCSI device model, iSCSI target and initiator, host attach."""
