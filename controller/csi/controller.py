"""CSI Controller service over ``ControllerService``: thin translation, the spec's rules per RPC.

Ids: a CSI volume id is the domain's volume id (a UUID, stable and opaque); a
snapshot id is the domain's snapshot id.  CSI names (the idempotency keys) become
domain names as they are when they are valid domain names (Kubernetes'
``pvc-<uuid>`` and ``snapshot-<uuid>`` are), else ``csi-`` + a hash of the name,
so a repeat always lands on the same object.

Idempotency, per RPC (the spec's rules):

* CreateVolume: same name, compatible request (size within the range, same
  parameters and source, owner within the requisite topology) -> the same
  volume; incompatible -> ALREADY_EXISTS.  A repeat is judged before its
  source is looked up: a clone's repeat succeeds after its source is deleted.
  A clone still being copied -> ABORTED (retry with the same name).  A clone
  asked larger than its source is grown once copied, by the call that finds
  it copied: the size the first call asked for is recorded, so a repeat may
  find it still at its source's size (that is no difference), and asks the
  agent to grow it again, as an earlier grow may have failed.  A clone lives
  beside its source: one the request's topology, capacity range or the
  source's disk cannot take is refused before it is made, and one that fails
  for good before any call answered it is deleted (the CO has no id for it).
* DeleteVolume / DeleteSnapshot: an unknown id is OK.
* ControllerPublishVolume: the owner exports the volume to the node's initiator
  with the volume's CHAP secret, and the node's agent is told the target and the
  credentials (it logs in at NodeStageVolume, not now).  The publish context
  names the target, LUN, identity (NAA, serial) and the node's initiator IQN (the
  ACL admits only it), never the secret.  A repeat for the same node returns the
  same publish context (in the mode it was published in, whatever the node's
  connector label says now); a volume published elsewhere (to a node not fenced)
  -> FAILED_PRECONDITION unless the capability is MULTI_NODE_MULTI_WRITER raw block
  (published ``shared``: live migration) and every other node has it so too: a
  node holding it SINGLE_NODE_* keeps it alone, and the reverse.
* ControllerUnpublishVolume: the node's agent forgets the target (logging out if
  still logged in), then the owner drops the node's initiator.
  An unknown volume or node, or a repeat, is OK.
* ControllerExpandVolume: a size already recorded is asked of the agent again
  (a temporary failure leaves the new size recorded and the LUN as it was;
  the agent grows it, or answers at once when it is that size already).
* CreateSnapshot: same name and source -> the same snapshot; another source -> ALREADY_EXISTS.

A call on a volume (or snapshot, or volume-on-node for publish) while another
is under way on it in this process is ABORTED: the CO retries.

Pagination: ``starting_token`` is the decimal offset into the list sorted by id;
a token that is not one (or is past the end) -> ABORTED, as the spec says.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from google.protobuf import timestamp_pb2, wrappers_pb2

from controller.csi import capabilities as caps
from controller.csi.errors import Aborted, InFlight, OutOfRange, csi_rpc
from controller.domain import placement
from controller.domain import validation as check
from controller.domain.errors import (AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound,
                                      ResourceExhausted)
from controller.domain.model import AVAILABLE, ATTACHED, CREATING, ERROR, HEALTHY, MODES, READY, Disk, Snapshot, Volume
from controller.domain.service import ControllerService
from controller.domain.validation import human_bytes
from protos.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger("shoal.csi")

GiB = 1 << 30
RPC = csi_pb2.ControllerServiceCapability.RPC

#: What ControllerGetCapabilities reports.
CONTROLLER_CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
)

#: Parameters the CO adds on its own (external-provisioner's ``--extra-create-metadata``): accepted, unused.
_CO_PARAMETER_PREFIX = "csi.storage.k8s.io/"
#: The node label the agent announces its connector in (node_agent.host.connector.CONNECTOR_LABEL).
CONNECTOR_LABEL = "shoal.io/connector"
#: volume_context keys (immutable per volume id).
CONTEXT_NAME = "shoal.io/volume"
CONTEXT_POOL = "shoal.io/pool"


@dataclass(frozen=True)
class CsiSettings:
    """How the CSI Controller service maps CSI onto Shoal."""

    default_size_bytes: int = GiB
    """Size of a volume created without a capacity range (rounded to the volume size multiple)."""
    attach_mode: str = "auto"
    """How the node logs in after ControllerPublishVolume: "userspace", "kernel" (the domain's MODES), or
    "auto": what the node's agent announced in its ``shoal.io/connector`` label (kernel where ``iscsi_tcp``
    is there), userspace when it announced nothing."""
    topology_keys: tuple[str, ...] = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone",
                                      "region", "zone")
    """Node labels that make a volume's accessible topology (the owner's values); the Node service's
    NodeGetInfo must report the same keys.  No such label on the owner: the volume is reachable anywhere."""

    def __post_init__(self) -> None:
        if self.default_size_bytes <= 0:
            raise ValueError("default_size_bytes must be positive")
        if self.attach_mode not in MODES + ("auto",):
            raise ValueError(f"attach_mode must be auto or one of {', '.join(MODES)}")


def domain_name(csi_name: str) -> str:
    """The domain name for a CSI name: itself when valid, else a stable ``csi-<hash>``."""
    try:
        return check.name(csi_name)
    except InvalidArgument:
        return "csi-" + hashlib.sha256(csi_name.encode()).hexdigest()[:32]


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, service: ControllerService, settings: CsiSettings | None = None):
        self.service = service
        self.settings = settings or CsiSettings()
        self.busy = InFlight()

    # ---- capabilities --------------------------------------------------------------------------

    @csi_rpc()
    def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=RPC(type=t)) for t in CONTROLLER_CAPABILITIES])

    # ---- volumes -------------------------------------------------------------------------------

    @csi_rpc("name", "volume_capabilities")
    def CreateVolume(self, request, context):
        _require_supported(request.volume_capabilities)
        name = domain_name(request.name)
        pool, thin = self._parameters(request.parameters)
        wanted = _content_source(request)
        with self.busy.hold(f"volume/{name}", f"volume {request.name}"):
            volume = self._create_or_repeat(request, name, pool, thin, wanted)
        if volume.state != AVAILABLE and volume.state != ATTACHED:
            progress = self.service.clone_progress(volume)
            raise Aborted(f"volume {volume.name} is still being made ({volume.state}, {progress:.0%} copied): "
                          "retry CreateVolume with the same name")
        result = self._csi_volume(volume)
        if wanted[0]:
            # The source asked for, also once it is deleted: external-provisioner deletes a volume answered
            # without the content source its claim named.
            result.content_source.CopyFrom(request.volume_content_source)
        return csi_pb2.CreateVolumeResponse(volume=result)

    def _create_or_repeat(self, request, name: str, pool: str, thin: bool, wanted: tuple[str, str]) -> Volume:
        existing = self.service.store.get_volume(name)
        if existing is not None:  # first: a repeat needs no source that still exists
            return self._repeat_create(existing, request, pool, thin, wanted)
        if wanted[0]:
            return self._clone(name, self._source(*wanted), pool, request)
        size = self._size(request.capacity_range)
        return self._create(name, size, pool, thin, request.accessibility_requirements)

    def _create(self, name: str, size: int, pool: str, thin: bool,
                requirements: csi_pb2.TopologyRequirement) -> Volume:
        candidates = _constraints(requirements)
        if not candidates:
            return self.service.create_volume(name, size, pool=pool, thin=thin)
        last: ResourceExhausted | None = None
        for constraints in candidates:  # preferred first, then requisite
            try:
                return self.service.create_volume(name, size, pool=pool, thin=thin, constraints=constraints)
            except ResourceExhausted as exc:
                last = exc
        raise last  # type: ignore[misc]

    def _repeat_create(self, volume: Volume, request, pool: str, thin: bool, wanted: tuple[str, str]) -> Volume:
        required, limit = _range(request.capacity_range)
        problems = []
        same_source = self._same_source(volume, *wanted)
        # The size the first call asked for (a clone is made at its source's size and grown to it once copied).
        size = max(volume.size_bytes, volume.requested_bytes)
        # A clone recorded without that size and smaller than asked may not be grown yet: grown below.
        smaller = size < required and not (volume.source and same_source and not volume.requested_bytes)
        if smaller or (limit and size > limit):
            problems.append(f"its size is {size} bytes, asked {required or '-'}..{limit or '-'}")
        if not same_source:
            asked = " ".join(wanted) if wanted[0] else "none"
            problems.append(f"its source is {volume.source or 'none'}, asked {asked}")
        if volume.pool != pool:
            problems.append(f"its pool is {volume.pool}, asked {pool}")
        if not wanted[0] and volume.thin != thin:
            problems.append(f"it is {'thin' if volume.thin else 'thick'}")
        if not _within(self.service.store.get_node(volume.owner_node),
                       _constraints(request.accessibility_requirements)):
            problems.append(f"its node {volume.owner_node} is outside the requisite topology")
        if problems:
            raise AlreadyExists(f"volume {request.name} already exists and differs: " + "; ".join(problems))
        if not volume.source:
            return self.service.create_volume(volume.name, volume.size_bytes, pool=pool, thin=thin)
        # No CreateVolume answered a clone still being made, or below the size it was asked to have: one that
        # fails for good now is not left to the CO, which has no volume id to delete it by.
        unanswered = volume.state in (CREATING, ERROR) or volume.size_bytes < volume.requested_bytes
        with self._dropped_on_failure(volume.name, volume.source, unanswered):
            # A failed copy is the CO's answer (a final error; the clone is dropped), not restarted unseen.
            clone = self.service.clone_volume(volume.name, volume.source, pool, restart_failed=False)
            if not volume.requested_bytes:  # recorded before the size was: the repeat's own
                size = self._round(required, limit) if required > clone.size_bytes else clone.size_bytes
            return self._grow_clone(clone, size, again=bool(required))

    def _clone(self, name: str, source: str, pool: str, request) -> Volume:
        """A new clone of ``source``, beside it (a reflink or a local copy needs both on one filesystem).

        Whatever the request asks that the clone cannot be is refused before it is made (CSI CreateVolume: a
        call that fails leaves no volume; the CO has no id to delete it by): a source outside the requisite
        topology (RESOURCE_EXHAUSTED), a size outside the capacity range or larger than the largest volume
        (OUT_OF_RANGE), no room for that size on the source's disk (RESOURCE_EXHAUSTED).  A failure for good
        after it is made (the room taken meanwhile, the copy refused) deletes it.
        """
        required, limit = _range(request.capacity_range)
        origin = self._source_record(source)
        if limit and origin.size_bytes > limit:
            raise OutOfRange(f"the source is {origin.size_bytes} bytes, more than limit_bytes {limit}")
        owner = self.service.store.get_node(origin.owner_node)
        if not _within(owner, _constraints(request.accessibility_requirements)):
            raise ResourceExhausted(f"a clone lives beside its source, on node {origin.owner_node}, which is "
                                    "outside the requisite topology")
        size = self._round(required, limit) if required > origin.size_bytes else origin.size_bytes
        if size > origin.size_bytes:
            self._check_clone_room(name, origin, pool, size)
        with self._dropped_on_failure(name, source, True):
            volume = self.service.clone_volume(name, source, pool, requested_bytes=size, restart_failed=False)
            return self._grow_clone(volume, size, again=False)

    def _grow_clone(self, volume: Volume, size: int, *, again: bool) -> Volume:
        """A clone asked larger than its source, grown to ``size`` once it is copied (until then, ABORTED: the
        CO repeats).

        ``again``: a repeat of CreateVolume asks the agent even when the recorded size is reached already; a
        grow that failed for a while (an agent unreachable) left the size recorded and the LUN as it was.
        """
        if volume.state not in (AVAILABLE, ATTACHED):
            return volume
        if size > volume.size_bytes:
            return self.service.expand_volume(volume.name, size)
        if again:
            return self.service.expand_volume(volume.name, volume.size_bytes)
        return volume

    @contextmanager
    def _dropped_on_failure(self, name: str, source: str, unanswered: bool) -> Iterator[None]:
        """Delete clone ``name`` (of ``source``) when the block fails for good and no call answered it yet.

        A temporary failure keeps it: the CO repeats CreateVolume, which finishes it.
        """
        try:
            yield
        except DomainError as exc:
            volume = self.service.store.get_volume(name)
            if unanswered and not exc.temporary and volume is not None and volume.source == source:
                try:
                    self.service.delete_volume(name)
                except DomainError as failure:  # left "deleting": reconcile finishes the delete
                    log.warning("clone %s failed (%s) and deleting it failed: %s", name, exc, failure)
            raise

    def _check_clone_room(self, name: str, origin: Snapshot | Volume, pool_name: str, size: int) -> None:
        """``ResourceExhausted`` unless the source's disk has room for the clone at ``size``."""
        pool = self.service.get_pool(pool_name)
        node = self.service.store.get_node(origin.owner_node)
        if node is None or not pool.includes(origin.owner_node, origin.disk):
            return  # clone_volume refuses it, saying why
        if isinstance(origin, Volume):
            thin = origin.thin
        else:
            parent = self.service.store.get_volume(origin.volume)
            thin = parent.thin if parent is not None else True
        disk = node.disk(origin.disk) or Disk(origin.disk, "", 0, 0)
        room = placement.candidate(node, disk, self.service.store.list_volumes(), self.service._grown,
                                   self.service.store.list_snapshots()).headroom(pool, thin)  # thick growth unreported yet too
        if room < size:
            raise ResourceExhausted(f"pool {pool.name}: {node.id}/{disk.name}, where clone {name} must live "
                                    f"beside its source, has room for {human_bytes(room)}, not {human_bytes(size)}")

    def _source(self, kind: str, source_id: str) -> str:
        """The domain's source (``snapshot/NAME`` or ``volume/NAME``) of a CSI content source; NotFound when gone."""
        if kind == "snapshot":
            return f"snapshot/{self._snapshot_by_id(source_id).name}"
        return f"volume/{self._volume_by_id(source_id).name}"

    def _same_source(self, volume: Volume, kind: str, source_id: str) -> bool:
        """Whether ``volume`` was made from the CSI content source (kind, id) asked for, also once it is deleted.

        Its record keeps its source's id (``source_id``, the CSI id of a snapshot or volume): the same id is the
        same source, deleted since or not.  A clone recorded before that id was has only its source's name and
        times: a source of that name made after the clone is another one, and when the id asked for names
        nothing any more and the clone's source is gone too, they are taken to be the same.
        """
        if not volume.source or not kind:
            return not volume.source and not kind
        recorded_kind, recorded_name = volume.source.split("/", 1)
        if recorded_kind != kind:
            return False
        if volume.source_id:
            return volume.source_id == source_id
        store = self.service.store
        asked = self._find_snapshot(source_id) if kind == "snapshot" else self._find_volume(source_id)
        if asked is not None:
            return asked.name == recorded_name and asked.created_at <= volume.created_at
        recorded = store.get_snapshot(recorded_name) if kind == "snapshot" else store.get_volume(recorded_name)
        return recorded is None or recorded.created_at > volume.created_at

    def _source_record(self, source: str) -> Snapshot | Volume:
        kind, name = source.split("/", 1)
        if kind == "snapshot":
            return self.service.get_snapshot(name)
        return self.service.get_volume(name)

    def _parameters(self, parameters) -> tuple[str, bool]:
        pool = self.service.settings.default_pool or "default"
        thin = True
        for key, value in parameters.items():
            if key == "pool":
                pool = check.name(value, "parameter pool")
            elif key in ("thin", "thick"):
                if value.lower() not in ("true", "false"):
                    raise InvalidArgument(f"parameter {key} must be true or false, not {value!r}")
                thin = (value.lower() == "true") == (key == "thin")
            elif not key.startswith(_CO_PARAMETER_PREFIX):
                raise InvalidArgument(f"unknown parameter {key!r}: Shoal takes pool and thin (or thick)")
        return pool, thin

    def _size(self, rng: csi_pb2.CapacityRange) -> int:
        required, limit = _range(rng)
        wanted = required or (min(self.settings.default_size_bytes, limit) if limit else
                              self.settings.default_size_bytes)
        if not required and limit:
            multiple = self.service.settings.volume_size_multiple
            wanted = max(multiple, wanted - wanted % multiple)
        return self._round(wanted, limit)

    def _round(self, wanted: int, limit: int) -> int:
        multiple = self.service.settings.volume_size_multiple
        size = -(-wanted // multiple) * multiple
        if limit and size > limit:
            raise OutOfRange(f"the smallest size Shoal can make from {wanted} bytes is {size} bytes "
                             f"(a multiple of {multiple}), more than limit_bytes {limit}")
        if size > self.service.settings.max_volume_bytes:
            raise OutOfRange(f"{size} bytes is more than the largest volume, "
                             f"{self.service.settings.max_volume_bytes} bytes")
        return size

    @csi_rpc("volume_id")
    def DeleteVolume(self, request, context):
        volume = self._find_volume(request.volume_id)
        if volume is not None:
            with self.busy.hold(f"volume/{volume.name}", f"volume {volume.id}"):
                self.service.delete_volume(volume.name)
        return csi_pb2.DeleteVolumeResponse()

    @csi_rpc("volume_id", "node_id", "volume_capability")
    def ControllerPublishVolume(self, request, context):
        _require_supported([request.volume_capability])
        if request.readonly:
            # The spec: the CO MUST set readonly false when the plugin lacks PUBLISH_READONLY, which Shoal does
            # not offer (the owner's target exports a volume writable to every initiator it admits). Taken
            # silently, a read-only PV would be staged writable, its journal replayed.
            raise InvalidArgument("readonly publish is not offered (no PUBLISH_READONLY controller capability): "
                                  "use a READER_ONLY access mode or a read-only NodePublishVolume")
        volume = self._volume_by_id(request.volume_id)
        node = self.service.store.get_node(request.node_id)
        if node is None:
            raise NotFound(f"node {request.node_id} is not registered with the Shoal controller")
        shared = caps.is_multi_node_writer(request.volume_capability)  # raw block only (unsupported() says)
        if not shared:
            elsewhere = [a.node for a in self.service.store.list_attachments(volume=volume.name)
                         if a.node != node.id and a.writer]
            if elsewhere:
                raise FailedPrecondition(f"volume {volume.id} is published to {', '.join(elsewhere)} with a "
                                         "single-node access mode: unpublish it there first")
        with self.busy.hold(f"publish/{volume.name}/{node.id}", f"volume {volume.id} on node {node.id}"):
            # A repeat keeps the mode it was published in: the node's agent may have announced another
            # connector since, and the same request must get the same answer (CSI ControllerPublishVolume).
            existing = self.service.store.get_attachment(volume.name, node.id)
            if existing is not None and existing.shared != shared:  # "published but incompatible"
                raise AlreadyExists(f"volume {volume.id} is published to node {node.id} "
                                    f"{'with' if existing.shared else 'without'} a multi-node multi-writer "
                                    "access mode: unpublish it there first to publish it otherwise")
            mode = existing.mode if existing is not None else self._mode(node)
            # multi_writer: refused beside a node that has it as its single writer (checked under the volume's
            # lock, so a concurrent single-writer publish cannot slip in between).
            attachment = self.service.attach_volume(volume.name, node.id, mode=mode, login=False, shared=shared,
                                                    multi_writer=shared)
        export = self.service.store.get_export(volume.name, node.initiator_iqn)
        context_ = {"mode": attachment.mode}
        if export is not None:  # what the node needs to find and check the device; never the CHAP secret
            context_.update(target_iqn=export.target_iqn, portals=",".join(export.portals), lun=str(export.lun),
                            naa=export.naa, serial=export.serial, chap_user=export.chap_user,
                            initiator_iqn=node.initiator_iqn)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=context_)

    @csi_rpc("volume_id")
    def ControllerUnpublishVolume(self, request, context):
        volume = self._find_volume(request.volume_id)
        if volume is not None:
            if request.node_id:
                nodes = [request.node_id] if self.service.store.get_node(request.node_id) is not None else []
            else:
                nodes = [a.node for a in self.service.store.list_attachments(volume=volume.name)]
            for node_id in nodes:
                with self.busy.hold(f"publish/{volume.name}/{node_id}", f"volume {volume.id} on node {node_id}"):
                    self.service.detach_volume(volume.name, node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    @csi_rpc("volume_id", "volume_capabilities")
    def ValidateVolumeCapabilities(self, request, context):
        volume = self._volume_by_id(request.volume_id)
        reason = caps.first_unsupported(request.volume_capabilities)
        if not reason and request.volume_context and dict(request.volume_context) != _context(volume):
            reason = "volume_context does not match the volume's"
        if not reason and request.parameters:
            try:
                pool, thin = self._parameters(request.parameters)
            except InvalidArgument as exc:
                reason = str(exc)
            else:
                if pool != volume.pool or (not volume.source and thin != volume.thin):
                    reason = "the parameters do not match the volume's"
        if reason:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @csi_rpc()
    def ListVolumes(self, request, context):
        volumes = sorted(self.service.list_volumes(), key=lambda v: v.id)
        page, next_token = _page(volumes, request.max_entries, request.starting_token)
        published = _published(self.service.store.list_attachments())
        Entry = csi_pb2.ListVolumesResponse.Entry
        Status = csi_pb2.ListVolumesResponse.VolumeStatus
        entries = [Entry(volume=self._csi_volume(v),
                         status=Status(published_node_ids=published.get(v.name, []),
                                       volume_condition=self._condition(v))) for v in page]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @csi_rpc("volume_id")
    def ControllerGetVolume(self, request, context):
        volume = self._volume_by_id(request.volume_id)
        nodes = [a.node for a in self.service.store.list_attachments(volume=volume.name)]
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=nodes,
                                                                   volume_condition=self._condition(volume))
        return csi_pb2.ControllerGetVolumeResponse(volume=self._csi_volume(volume), status=status)

    @csi_rpc()
    def GetCapacity(self, request, context):
        reason = caps.first_unsupported(request.volume_capabilities)
        if reason:
            raise InvalidArgument(reason)
        pool_name, thin = self._parameters(request.parameters)
        pool = self.service.get_pool(pool_name)
        segments = dict(request.accessible_topology.segments) if request.HasField("accessible_topology") else {}
        nodes = [n for n in self.service.list_nodes() if placement.placeable(n) and placement.matches(n, segments)]
        volumes, snapshots = self.service.store.list_volumes(), self.service.store.list_snapshots()
        available = largest = 0
        for node, disk in placement.pool_disks(pool, nodes):
            room = max(0, placement.candidate(node, disk, volumes, self.service._grown, snapshots).headroom(pool, thin))
            available += room
            largest = max(largest, room)
        multiple = self.service.settings.volume_size_multiple
        largest = min(largest - largest % multiple, self.service.settings.max_volume_bytes)
        return csi_pb2.GetCapacityResponse(available_capacity=available,
                                           maximum_volume_size=wrappers_pb2.Int64Value(value=largest),
                                           minimum_volume_size=wrappers_pb2.Int64Value(value=multiple))

    @csi_rpc("volume_id", "capacity_range")
    def ControllerExpandVolume(self, request, context):
        if request.HasField("volume_capability"):
            _require_supported([request.volume_capability])
        required, limit = _range(request.capacity_range)
        if not required and not limit:
            raise InvalidArgument("capacity_range needs required_bytes or limit_bytes")
        volume = self._volume_by_id(request.volume_id)
        size = self._round(required or limit, limit)
        if limit and volume.size_bytes > limit:
            raise OutOfRange(f"volume {volume.id} is already {volume.size_bytes} bytes, more than limit_bytes "
                             f"{limit}; volumes only grow")
        if size > volume.size_bytes or volume.state in (AVAILABLE, ATTACHED):
            # A size already recorded is asked again: a temporary failure records it before the LUN grows.
            with self.busy.hold(f"volume/{volume.name}", f"volume {volume.id}"):
                volume = self.service.expand_volume(volume.name, max(size, volume.size_bytes))
        # Always: a block volume's node sees the new size only after NodeExpandVolume rescans its device (and
        # renews its read-only loop devices); the CO skips that call when this is false.
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=volume.size_bytes, node_expansion_required=True)

    # ---- snapshots -----------------------------------------------------------------------------

    @csi_rpc("source_volume_id", "name")
    def CreateSnapshot(self, request, context):
        for key in request.parameters:
            if not key.startswith(_CO_PARAMETER_PREFIX):
                raise InvalidArgument(f"unknown snapshot parameter {key!r}: Shoal takes none")
        volume = self._volume_by_id(request.source_volume_id)
        name = domain_name(request.name)
        with self.busy.hold(f"snapshot/{name}", f"snapshot {request.name}"):
            snapshot = self.service.create_snapshot(name, volume.name)
        return csi_pb2.CreateSnapshotResponse(snapshot=_csi_snapshot(snapshot))

    @csi_rpc("snapshot_id")
    def DeleteSnapshot(self, request, context):
        snapshot = self._find_snapshot(request.snapshot_id)
        if snapshot is not None:
            with self.busy.hold(f"snapshot/{snapshot.name}", f"snapshot {snapshot.id}"):
                self.service.delete_snapshot(snapshot.name)
        return csi_pb2.DeleteSnapshotResponse()

    @csi_rpc()
    def ListSnapshots(self, request, context):
        snapshots = self.service.list_snapshots()
        if request.snapshot_id:
            snapshots = [s for s in snapshots if s.id == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.volume_id == request.source_volume_id]
        page, next_token = _page(sorted(snapshots, key=lambda s: s.id), request.max_entries,
                                 request.starting_token)
        Entry = csi_pb2.ListSnapshotsResponse.Entry
        return csi_pb2.ListSnapshotsResponse(entries=[Entry(snapshot=_csi_snapshot(s)) for s in page],
                                             next_token=next_token)

    # ---- helpers -------------------------------------------------------------------------------

    def _mode(self, node) -> str:
        if self.settings.attach_mode != "auto":
            return self.settings.attach_mode
        announced = node.labels.get(CONNECTOR_LABEL, "")
        return announced if announced in MODES else "userspace"

    def _find_volume(self, volume_id: str) -> Volume | None:
        return next((v for v in self.service.store.list_volumes() if v.id == volume_id), None)

    def _volume_by_id(self, volume_id: str) -> Volume:
        volume = self._find_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return volume

    def _find_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return next((s for s in self.service.store.list_snapshots() if s.id == snapshot_id), None)

    def _snapshot_by_id(self, snapshot_id: str) -> Snapshot:
        snapshot = self._find_snapshot(snapshot_id)
        if snapshot is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return snapshot

    def _csi_volume(self, volume: Volume) -> csi_pb2.Volume:
        result = csi_pb2.Volume(capacity_bytes=volume.size_bytes, volume_id=volume.id, volume_context=_context(volume))
        if volume.source:
            kind, name = volume.source.split("/", 1)
            if kind == "snapshot":
                snapshot = self.service.store.get_snapshot(name)
                if snapshot is not None:
                    result.content_source.snapshot.snapshot_id = snapshot.id
            else:
                source = self.service.store.get_volume(name)
                if source is not None:
                    result.content_source.volume.volume_id = source.id
        owner = self.service.store.get_node(volume.owner_node)
        if owner is not None:
            segments = {k: owner.labels[k] for k in self.settings.topology_keys if k in owner.labels}
            if segments:
                result.accessible_topology.append(csi_pb2.Topology(segments=segments))
        return result

    def _condition(self, volume: Volume) -> csi_pb2.VolumeCondition:
        if volume.state == ERROR:
            return csi_pb2.VolumeCondition(abnormal=True, message=f"volume {volume.id} is in error: "
                                                                  "a repeat of the failed operation finishes it")
        owner = self.service.store.get_node(volume.owner_node)
        if owner is None:
            return csi_pb2.VolumeCondition(abnormal=True, message=f"node {volume.owner_node} is gone")
        effective = self.service.get_node(owner.id)
        if effective.health != HEALTHY:
            return csi_pb2.VolumeCondition(abnormal=True, message=f"node {owner.id}, which holds the data, "
                                                                  "is unhealthy")
        return csi_pb2.VolumeCondition(abnormal=False, message="healthy")


def _require_supported(capabilities: Sequence[csi_pb2.VolumeCapability]) -> None:
    reason = caps.first_unsupported(capabilities)
    if reason:
        raise InvalidArgument(reason)


def _range(rng: csi_pb2.CapacityRange) -> tuple[int, int]:
    required, limit = rng.required_bytes, rng.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"capacity_range: required_bytes {required} is more than limit_bytes {limit}")
    return required, limit


def _content_source(request) -> tuple[str, str]:
    """(kind, id) of a CreateVolume's ``volume_content_source``: ("snapshot", id), ("volume", id), or ("", "")."""
    if not request.HasField("volume_content_source"):
        return "", ""
    content = request.volume_content_source
    kind = content.WhichOneof("type")
    if kind == "snapshot":
        if not content.snapshot.snapshot_id:
            raise InvalidArgument("volume_content_source.snapshot.snapshot_id is required")
        return kind, content.snapshot.snapshot_id
    if kind == "volume":
        if not content.volume.volume_id:
            raise InvalidArgument("volume_content_source.volume.volume_id is required")
        return kind, content.volume.volume_id
    raise InvalidArgument("volume_content_source needs a snapshot or a volume")


def _within(node, candidates: list[dict[str, str]]) -> bool:
    """Whether ``node`` is in one of the topologies asked for (none asked: anywhere is)."""
    return not candidates or any(node is not None and placement.matches(node, c) for c in candidates)


def _constraints(requirements: csi_pb2.TopologyRequirement) -> list[dict[str, str]]:
    """Label constraints to try in order: preferred topologies first, then the requisite ones."""
    seen: list[dict[str, str]] = []
    for topology in list(requirements.preferred) + list(requirements.requisite):
        segments = check.labels(dict(topology.segments), "topology segments")
        if segments not in seen:
            seen.append(segments)
    return seen


def _context(volume: Volume) -> dict[str, str]:
    return {CONTEXT_NAME: volume.name, CONTEXT_POOL: volume.pool}


def _page(items: list, max_entries: int, token: str) -> tuple[list, str]:
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        # isdigit alone takes "²" and "①", which int() refuses
        if not (token.isascii() and token.isdigit()) or int(token) > len(items):
            raise Aborted(f"starting_token {token!r} is not valid (any more): list again from the start")
        start = int(token)
    end = start + max_entries if max_entries else len(items)
    return items[start:end], (str(end) if end < len(items) else "")


def _published(attachments: Iterable) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for attachment in attachments:
        result.setdefault(attachment.volume, []).append(attachment.node)
    return result


def _csi_snapshot(snapshot: Snapshot) -> csi_pb2.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(snapshot.created_at * 1e9))
    return csi_pb2.Snapshot(size_bytes=snapshot.size_bytes, snapshot_id=snapshot.id,
                            source_volume_id=snapshot.volume_id, creation_time=created,
                            ready_to_use=snapshot.state == READY)
