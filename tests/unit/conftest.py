"""Unit tests: our own pure code, no peers.

Fakes stand only at our own boundaries: the kernel connector's tests
(test_host_kernel.py) drive it through ``RecordingRunner`` (our command-runner
interface, answering as open-iscsi and blockdev would), a temporary sysfs and
/dev tree (the connector's injectable roots) and ``KernelSettings.write`` (its
sysfs writer), because open-iscsi cannot run on this host's kernel; the same
connector runs for real in a Debian guest in tests/peer/test_kernel_connector.py.
SCSI unit tests use ``MemoryBackingStore`` beside the file store; the FUSE
export's tests serve ``FileBlockDevice`` (see tests/conftest.py).

Fault injection at the same boundary: a few CSI node tests script one command
of the real ones failing through the plugin's ``Runner`` (``blkid`` exiting 2,
``mount -o remount,ro`` refused: test_csi_node.py) or patch one of our own
helpers (``mounts.reads_blank``), because a real tool cannot be made to fail
that way on demand; every other step of those tests runs the real tools on
real loop devices.  Tests that need the backing store to fail (out of space,
EIO) patch the store's methods, our own code, for the same reason.
"""
