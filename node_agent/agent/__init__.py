"""The node agent (``shoal agent``): volumes on this node's disks, their iSCSI exports, attachments here.

- ``volumes`` — backing files on the node's disks (create, clone, expand, delete);
- ``exports`` — one iSCSI target per exported volume, its ACL and CHAP, and the record
  that brings the exports back after a restart;
- ``attachments`` — volumes served elsewhere attached here through the host connectors;
- ``servicer`` — the thin ``AgentService`` gRPC servicer; ``errors`` — the one error table;
- ``registration`` — register with the controller and heartbeat;
- ``daemon`` — wires them together; ``settings`` — what an operator configures.
"""
