"""The controller's gRPC surface: AdminService (shoalctl, CSI) and RegistrationService (node agents).

Thin servicers over ``controller.domain.service.ControllerService``: the
``rpc`` decorator (``decorators.py``) checks required fields, logs and maps
errors through the one table in ``errors.py``; ``server.py`` puts both
services on one port, with TLS (and mutual TLS) when certificates are given.
"""
