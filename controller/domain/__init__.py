"""The controller's domain: nodes, pools, volumes, attachments; placement; the lifecycle service.

Pure Python over two boundaries, both Protocols: the state store
(``controller.store.base.StateStore``) and the node agents
(``controller.domain.agents.AgentDirectory``).  Nothing here touches gRPC,
sockets or files.
"""
