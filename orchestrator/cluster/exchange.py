"""Workers exchange gradients and parameters among themselves, every step, without the driver.

The step loop runs inside the workers (``TrainWorker.train_steps``); the driver only starts
chunks of steps. Each step, rank r

1. *reduce-scatter*: sends the gradients of the variables owner j owns straight to j (one
   message per peer: the arrays back to back, no packing copy) and receives, from every
   rank, the gradients of the variables it owns. The owner sums them **in rank order
   0..M-1**, so the result is bit-identical to the object-store path, to one process
   doing the whole batch (for M=1) and to any interrupted run;
2. *all-gather*: after the update, sends its owned parameters (plus its slice's loss sum)
   to every peer and receives every other owner's parameters straight into its own
   variables' memory.

Transport: ``SocketExchange``, a full mesh of TCP connections (the node network across
nodes), driven by one non-blocking ``selectors`` loop per phase, so sends and receives of
a step overlap and nothing busy-waits. When every rank is on one node the bulk bytes go
through shared memory instead (``_Shared``: peers read each other's gradients and
parameters in place) and the mesh carries only two tiny messages per peer per step. Waiting
is always a blocking ``select`` (on 2 cores a spinning barrier starves the peer it waits
for). Failure detection is the socket's: a peer that
dies closes its connections (EOF at once); a peer that hangs sends nothing and the
phase times out after ``timeout`` seconds (the job's ``step_timeout_s``). Either way
``PeerFailedError`` names the peer, and the driver turns it into the usual
``WorkerFailedError`` for that rank.

``NcclExchange`` does the same two phases with NCCL on GPUs (``collectives.NcclGroup``).
"""

from __future__ import annotations

import mmap
import os
import selectors
import socket
import struct
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.cluster.errors import ClusterError
from orchestrator.cluster.ownership import OwnershipMap

_HELLO = struct.Struct("!I")      # the connecting rank, sent once per connection
_LOSS = np.dtype(np.float64)      # each rank's slice loss sum rides along with its parameters
_SOCKET_BUFFER = 4 << 20
_STEP = np.dtype(np.int64)        # shared-memory mode: the tiny "my gradients are in place" message
SHM_DIR = "/dev/shm"


class PeerFailedError(ClusterError):
    """A peer died (its connection closed) or hung (sent nothing within the timeout)."""

    def __init__(self, rank: int, peer: int, cause: str, hung: bool, step: int):
        super().__init__(f"rank {rank}: peer rank {peer} {cause}")
        self.rank, self.peer, self.cause, self.hung, self.step = rank, peer, cause, hung, step

    def __reduce__(self):
        return (type(self), (self.rank, self.peer, self.cause, self.hung, self.step))


class SocketExchange:
    """Reduce-scatter of gradients and all-gather of parameters over a TCP mesh (see module doc).

    ``variables`` maps name -> Variable; the values of variables other ranks own are
    overwritten in place by ``share``. Use: ``address()`` on every rank, then ``connect``
    with the list of every rank's address.
    """

    def __init__(self, rank: int, world: int, variables: Mapping[str, Any], ownership: OwnershipMap,
                 timeout: float, host: str, node: str = "", shared_memory: bool = True):
        self.rank, self.world, self.timeout, self.node = rank, world, float(timeout), node
        self.variables = variables
        order = list(variables)  # the model's variable order: the same on every rank
        self.names_of = [[n for n in order if ownership.owner[n] == r] for r in range(world)]
        self.peers: dict[int, socket.socket] = {}
        self.seconds = 0.0  # wall time spent in the exchange, waiting for peers included
        self._listener = socket.create_server((host, 0), backlog=world)
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self._totals: dict[str, np.ndarray] = {}
        self._losses = {peer: np.zeros(1, _LOSS) for peer in range(world) if peer != rank}
        self._steps = {peer: np.zeros(1, _STEP) for peer in range(world) if peer != rank}
        self._segment = _Segment.create(self._layout(rank)) if shared_memory else None
        self.shared: "_Shared | None" = None  # set by connect when every rank is on this node

    def _layout(self, rank: int) -> dict[str, tuple[int, tuple, np.dtype]]:
        """Rank ``rank``'s segment: gradients of the variables others own, then the variables it owns."""
        layout, offset = {}, 0
        for kind, names in (("grad", [n for n in self.variables if n not in self.names_of[rank]]),
                            ("param", self.names_of[rank])):
            for name in names:
                value = self.variables[name].value
                layout[f"{kind}:{name}"] = (offset, tuple(value.shape), np.dtype(value.dtype))
                offset += -(-value.nbytes // 64) * 64  # 64-byte aligned
        return layout

    @property
    def mode(self) -> str:
        """``shared_memory`` (every rank on this node) or ``tcp``: how the bulk bytes move."""
        return "shared_memory" if self.shared is not None else "tcp"

    def address(self) -> dict:
        host, port = self._listener.getsockname()[:2]
        return {"host": host, "port": port, "node": self.node,
                "segment": None if self._segment is None else self._segment.path}

    def connect(self, addresses: Sequence[Mapping[str, Any]]) -> None:
        """Connect the mesh; on one node also map every peer's segment (then unlink ours: nothing leaks)."""
        self._connect_mesh([(a["host"], a["port"]) for a in addresses])
        same_node = all(a["node"] == self.node and a["segment"] for a in addresses)
        if same_node:
            self.shared = _Shared(self, [None if r == self.rank else _Segment.attach(a["segment"], self._layout(r))
                                         for r, a in enumerate(addresses)])
        else:
            self._received = {peer: {n: np.empty_like(_host(self.variables[n].value)) for n in self.names_of[self.rank]}
                              for peer in self.peers}
        self.share(-1, 0.0)  # everyone has mapped everything: our name can go
        if self._segment is not None:
            self._segment.unlink()
            if not same_node:
                self._segment.close()
                self._segment = None

    def _connect_mesh(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Connect to every lower rank, accept every higher one (the listen backlog keeps this deadlock-free)."""
        for peer in range(self.rank):
            try:
                conn = socket.create_connection(tuple(addresses[peer]), timeout=self.timeout)
                conn.sendall(_HELLO.pack(self.rank))
            except OSError as exc:
                raise PeerFailedError(self.rank, peer, f"cannot be reached at {addresses[peer]} ({exc})",
                                      False, -1) from None
            self._add(peer, conn)
        deadline = time.monotonic() + self.timeout
        while len(self.peers) < self.world - 1:
            missing = sorted(set(range(self.world)) - set(self.peers) - {self.rank})
            try:
                self._listener.settimeout(max(0.001, deadline - time.monotonic()))
                conn, _ = self._listener.accept()
                conn.settimeout(self.timeout)
                (peer,) = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
            except OSError as exc:
                raise PeerFailedError(self.rank, missing[0], f"did not connect in time ({exc})", True, -1) from None
            self._add(peer, conn)
        self._listener.close()

    def _add(self, peer: int, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        conn.setblocking(False)
        self.peers[peer] = conn

    # ------------------------------------------------------------------ the two phases of a step
    def reduce(self, step: int, grads: Mapping[str, Any], owned: Sequence[str]) -> dict[str, Any]:
        """The sums, in rank order, of every rank's gradients of the variables this rank owns."""
        if self.shared is not None:
            return self.shared.reduce(step, grads, owned)
        outgoing = {peer: [grads[n] for n in self.names_of[peer]] for peer in self.peers}
        incoming = {peer: [received[n] for n in self.names_of[self.rank]]
                    for peer, received in self._received.items()}
        self._transfer(outgoing, incoming, "gradients", step)
        return self.sum_in_rank_order(owned, lambda rank, name: grads[name] if rank == self.rank
                                      else self._received[rank][name])

    def sum_in_rank_order(self, owned: Sequence[str], part: Any) -> dict[str, np.ndarray]:
        """Each owned gradient summed over ranks 0..M-1 in that order (``part(rank, name)``), into
        buffers kept from step to step (no allocation, no page faults); the same bits as ``a + b + ...``."""
        totals = {}
        for name in owned:
            total = self._totals.get(name)
            if total is None:
                total = self._totals[name] = np.empty_like(_host(self.variables[name].value))
            np.add(part(0, name), part(1, name), out=total)
            for rank in range(2, self.world):
                np.add(total, part(rank, name), out=total)
            totals[name] = total
        return totals

    def share(self, step: int, loss_sum: float) -> list[float]:
        """Send this rank's parameters to every peer, receive theirs in place; every rank's loss sum."""
        if self.shared is not None:
            return self.shared.share(step, loss_sum)
        mine = np.array([loss_sum], _LOSS)
        own = [self._writable(n) for n in self.names_of[self.rank]]
        outgoing = {peer: [mine, *own] for peer in self.peers}
        incoming = {peer: [self._losses[peer], *(self._writable(n) for n in self.names_of[peer])]
                    for peer in self.peers}
        self._transfer(outgoing, incoming, "parameters", step)
        return [loss_sum if r == self.rank else float(self._losses[r][0]) for r in range(self.world)]

    def _writable(self, name: str) -> np.ndarray:
        """The variable's array, made a private C-contiguous one if it is not (a restored value may be read-only)."""
        variable = self.variables[name]
        value = variable.value
        if not (value.flags.c_contiguous and value.flags.writeable):
            variable.value = value = np.array(value, order="C")
        return value

    def _transfer(self, outgoing: dict[int, list], incoming: dict[int, list], what: str, step: int) -> None:
        began = time.perf_counter()
        sends = {peer: _Cursor(arrays) for peer, arrays in outgoing.items()}
        recvs = {peer: _Cursor(arrays) for peer, arrays in incoming.items()}
        selector = selectors.DefaultSelector()
        try:
            for peer, conn in self.peers.items():
                events = _interest(sends[peer], recvs[peer])
                if events:
                    selector.register(conn, events, peer)
            deadline = time.monotonic() + self.timeout
            while any(not c.done for c in sends.values()) or any(not c.done for c in recvs.values()):
                events = selector.select(max(0.0, deadline - time.monotonic()))
                if not events:
                    late = next(p for p in self.peers if not recvs[p].done or not sends[p].done)
                    raise PeerFailedError(self.rank, late, f"sent no {what} for step {step} within "
                                          f"{self.timeout:g} s (fault_tolerance.step_timeout_s)", True, step)
                for key, mask in events:
                    self._progress(key.data, key.fileobj, mask, sends[key.data], recvs[key.data], what, step)
                    self._update_interest(selector, key, sends[key.data], recvs[key.data])
        finally:
            selector.close()
            self.seconds += time.perf_counter() - began

    def _progress(self, peer: int, conn: socket.socket, mask: int, send: "_Cursor", recv: "_Cursor",
                  what: str, step: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and not send.done:
                send.advance(conn.send(send.view()))
            if mask & selectors.EVENT_READ and not recv.done:
                got = conn.recv_into(recv.view())
                if got == 0:
                    raise ConnectionResetError("connection closed")
                recv.advance(got)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise PeerFailedError(self.rank, peer, f"is gone ({exc}) while exchanging {what} of step {step}",
                                  False, step) from None

    @staticmethod
    def _update_interest(selector: selectors.BaseSelector, key: Any, send: "_Cursor", recv: "_Cursor") -> None:
        """Wait only for what is still due: a finished receive must not read the peer's next phase."""
        events = _interest(send, recv)
        if not events:
            selector.unregister(key.fileobj)
        elif events != key.events:
            selector.modify(key.fileobj, events, key.data)

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()
        self.peers = {}
        self._listener.close()
        if self._segment is not None:
            self._segment.unlink()  # our variables keep their (private) mapping: the memory lives on


class _Shared:
    """The bulk bytes of a one-node exchange, in shared memory; only tiny messages use the mesh.

    Each rank's segment holds the gradients it computed of the variables others own, and
    the variables it owns, *as those variables' memory* (the optimizer updates them in
    place there). Peers read both directly: no copy, no serialization. The mesh messages
    are the synchronisation: "my gradients of step s are in place" (an owner may sum them),
    then "my parameters of step s are updated" (with the loss sum; peers may read them).
    A rank writes its next gradients only after every owner said its update is done (so
    the sums have read the previous ones), and an owner updates only after every rank said
    its gradients are in place (so their forward and backward passes have read the old
    parameters): two messages per peer per step keep every read and write ordered.
    """

    def __init__(self, exchange: SocketExchange, peers: list["_Segment | None"]):
        self.x, self.peers = exchange, peers
        own = exchange._segment
        self.grads_out = {n: own.view(f"grad:{n}") for n in exchange.variables if n not in exchange.names_of[exchange.rank]}
        self.params = {n: own.view(f"param:{n}") for n in exchange.names_of[exchange.rank]}
        for name, view in self.params.items():
            view[...] = _host(exchange.variables[name].value)
        for rank, segment in enumerate(peers):
            for name in ([] if segment is None else exchange.names_of[rank]):
                exchange.variables[name].value = segment.view(f"param:{name}")
        self._bind_owned()

    def _bind_owned(self) -> None:
        """Owned variables live in our segment; a value replaced by someone (a restore, an optimizer that
        assigns) is copied back in."""
        for name, view in self.params.items():
            variable = self.x.variables[name]
            if variable.value is not view:
                view[...] = _host(variable.value)
                variable.value = view

    def reduce(self, step: int, grads: Mapping[str, Any], owned: Sequence[str]) -> dict[str, Any]:
        for name, view in self.grads_out.items():
            np.copyto(view, grads[name])
        mine = np.array([step], _STEP)
        self.x._transfer({p: [mine] for p in self.x.peers}, {p: [self.x._steps[p]] for p in self.x.peers},
                         "gradients", step)
        return self.x.sum_in_rank_order(owned, lambda rank, name: grads[name] if rank == self.x.rank
                                        else self.peers[rank].view(f"grad:{name}"))

    def share(self, step: int, loss_sum: float) -> list[float]:
        self._bind_owned()
        mine = np.array([loss_sum], _LOSS)
        self.x._transfer({p: [mine] for p in self.x.peers}, {p: [self.x._losses[p]] for p in self.x.peers},
                         "parameters", step)
        return [loss_sum if r == self.x.rank else float(self.x._losses[r][0]) for r in range(self.x.world)]


class _Segment:
    """A file in /dev/shm mapped into this process; views of it are numpy arrays."""

    def __init__(self, path: str, layout: Mapping[str, tuple[int, tuple, np.dtype]], buffer: mmap.mmap):
        self.path, self.layout, self.buffer = path, layout, buffer
        self._views: dict[str, np.ndarray] = {}

    @classmethod
    def create(cls, layout: Mapping[str, tuple[int, tuple, np.dtype]]) -> "_Segment | None":
        """A fresh segment, or None where there is no usable /dev/shm (then the bytes go over TCP)."""
        size = max([off + int(np.prod(shape)) * dtype.itemsize for off, shape, dtype in layout.values()] + [64])
        if not os.path.isdir(SHM_DIR):
            return None
        path = os.path.join(SHM_DIR, f"orchestrator-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # fails now, not with SIGBUS later, when /dev/shm is full
                buffer = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError:
            _unlink(path)
            return None
        return cls(path, layout, buffer)

    @classmethod
    def attach(cls, path: str, layout: Mapping[str, tuple[int, tuple, np.dtype]]) -> "_Segment":
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(path, layout, mmap.mmap(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)

    def view(self, key: str) -> np.ndarray:
        view = self._views.get(key)
        if view is None:
            offset, shape, dtype = self.layout[key]
            view = np.frombuffer(self.buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
            self._views[key] = view
        return view

    def unlink(self) -> None:
        _unlink(self.path)

    def close(self) -> None:
        self._views.clear()
        self.buffer.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Cursor:
    """Position in a sequence of arrays sent or received back to back."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.views = [memoryview(a).cast("B") for a in arrays if a.nbytes]
        self.index, self.offset = 0, 0

    @property
    def done(self) -> bool:
        return self.index == len(self.views)

    def view(self) -> memoryview:
        return self.views[self.index][self.offset:]

    def advance(self, count: int) -> None:
        self.offset += count
        if self.offset == len(self.views[self.index]):
            self.index, self.offset = self.index + 1, 0


def _interest(send: _Cursor, recv: _Cursor) -> int:
    return (0 if recv.done else selectors.EVENT_READ) | (0 if send.done else selectors.EVENT_WRITE)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("connection closed during the handshake")
        data += chunk
    return data


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)



class NcclExchange:
    """The same two phases with NCCL between GPU workers: ``ncclReduce`` of each gradient to its
    owner, ``ncclBcast`` of each parameter (and each rank's loss sum) from its owner.

    NCCL's reduction order is fixed for a given communicator and size, so results repeat
    for the same M (they are not bit-equal to the host path's rank-order sum).
    """

    def __init__(self, rank: int, world: int, variables: Mapping[str, Any], ownership: OwnershipMap):
        from orchestrator.cluster.collectives import NcclGroup  # cupy only where a GPU is used

        self.rank, self.world, self.variables, self.ownership = rank, world, variables, ownership
        self.names = list(variables)
        self.unique_id = NcclGroup.new_unique_id() if rank == 0 else None
        self.group: Any = None
        self.seconds = 0.0

    def address(self) -> Any:
        return self.unique_id

    def connect(self, addresses: Sequence[Any]) -> None:
        """Join the communicator, then take every owner's parameters."""
        from orchestrator.cluster.collectives import NcclGroup

        self.group = NcclGroup(self.world, addresses[0], self.rank)
        self.share(-1, 0.0)

    def reduce(self, step: int, grads: Mapping[str, Any], owned: Sequence[str]) -> dict[str, Any]:
        began = time.perf_counter()
        xp = _array_module(grads[self.names[0]])
        totals = {n: xp.empty_like(grads[n]) for n in self.names}
        self.group.reduce_to_owners([grads[n] for n in self.names], [self.ownership.owner[n] for n in self.names],
                                    [totals[n] for n in self.names])
        self.seconds += time.perf_counter() - began
        return {n: totals[n] for n in owned}

    def share(self, step: int, loss_sum: float) -> list[float]:
        began = time.perf_counter()
        values = [self.variables[n].value for n in self.names]
        xp = _array_module(values[0])
        losses = xp.zeros(self.world, dtype=np.float64)
        losses[self.rank] = loss_sum
        slots = [losses[r:r + 1] for r in range(self.world)]
        self.group.broadcast(values + slots, [self.ownership.owner[n] for n in self.names] + list(range(self.world)))
        self.seconds += time.perf_counter() - began
        return [float(v) for v in losses.get()]

    def close(self) -> None:
        self.group = None


def _array_module(array: Any):
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np
