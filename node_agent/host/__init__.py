"""Host attach: turn a volume's connection properties into a local block device.

``connector`` holds the interface and what every connector shares (typed
connection properties, errors, the identity check, per-target locks, the
session reference count); ``kernel`` drives open-iscsi, ``userspace`` uses
Shoal's own initiator through FUSE and a loop device.
"""
