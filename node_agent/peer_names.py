"""Who may call which gRPC service: the client certificate's name, checked per service (mutual TLS).

Mutual TLS proves that a caller holds a certificate the CA signed; by itself it says nothing about what the
caller may do. With one CA for the controller, the nodes and the admins (as the Helm chart and the test PKI
make them), a node's certificate used to pass everywhere: as the controller's on every other agent
(``ExportVolume`` of any volume to an initiator name and CHAP secret it chose, then read the data over iSCSI)
and as an admin's on the controller (``GetPublishSecret``, ``DeleteVolume``, fencing). So each service admits
only client certificates whose subject common name, or one of whose DNS subject alternative names, is on its
list (``node_agent.peer_check.PeerNames``; this module holds the names and
loads no gRPC, as ``shoal target`` must not):

- ``shoal.agent.v1.AgentService`` (on every agent) is called by the controller: ``shoal-controller``
  (agent ``--tls-controller-names``);
- ``shoal.admin.v1.AdminService`` (controller) by shoalctl, or from inside the controller's pod with its own
  certificate: ``shoal-admin`` and ``shoal-controller`` (controller ``--tls-admin-names``);
- ``shoal.agent.v1.RegistrationService`` (controller) by the agents: ``shoal-node`` (controller
  ``--tls-node-names``).

A refused call ends with PERMISSION_DENIED naming the certificate and the service; nothing runs. The check is
made only where the port asks for client certificates (``--tls-client-ca``): without them a caller has no name
to check, which is what TLS without a client CA (or plaintext, for a loopback port) means.

Registration does not tie a certificate to a node id yet: with the chart's shared ``node.crt`` a node can still
register as another node id (and receive the export calls meant for it).
"""

from __future__ import annotations

CONTROLLER_NAMES = ("shoal-controller",)
ADMIN_NAMES = ("shoal-admin", "shoal-controller")
NODE_NAMES = ("shoal-node",)

AGENT_SERVICE = "shoal.agent.v1.AgentService"
ADMIN_SERVICE = "shoal.admin.v1.AdminService"
REGISTRATION_SERVICE = "shoal.agent.v1.RegistrationService"


def parse_names(text: str) -> tuple[str, ...]:
    """``--tls-*-names``: a comma-separated list of certificate names; at least one."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("give at least one certificate name")
    return names


def exposure_warning(listen: str, tls: bool, client_ca: bool, service: str, flags: str) -> str:
    """What to warn about when ``service`` listens on ``listen`` beyond loopback without mutual TLS ("" when it
    does not): without client certificates anyone who reaches the port may call it."""
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: where it points is not known here
    if loopback or (tls and client_ca):
        return ""
    what = "plaintext" if not tls else "TLS without client certificates"
    return (f"{service} listens on {listen} ({what}): anyone who reaches that address may call it; give {flags} "
            "(mutual TLS) unless the network is trusted")
