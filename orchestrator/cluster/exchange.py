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

Transport: ``SocketExchange``, a full mesh of TCP connections (loopback on one node, the
node network across nodes), driven by one non-blocking ``selectors`` loop per phase, so
sends and receives of a step overlap and nothing busy-waits (on 2 cores a spinning
barrier starves the peer it waits for). Failure detection is the socket's: a peer that
dies closes its connections (EOF at once); a peer that hangs sends nothing and the
phase times out after ``timeout`` seconds (the job's ``step_timeout_s``). Either way
``PeerFailedError`` names the peer, and the driver turns it into the usual
``WorkerFailedError`` for that rank.

``NcclExchange`` does the same two phases with NCCL on GPUs (``collectives.NcclGroup``).
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from typing import Any, Mapping, Sequence

import numpy as np

from orchestrator.cluster.errors import ClusterError
from orchestrator.cluster.ownership import OwnershipMap

_HELLO = struct.Struct("!I")      # the connecting rank, sent once per connection
_LOSS = np.dtype(np.float64)      # each rank's slice loss sum rides along with its parameters
_SOCKET_BUFFER = 4 << 20


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
                 timeout: float, host: str):
        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.variables = variables
        order = list(variables)  # the model's variable order: the same on every rank
        self.names_of = [[n for n in order if ownership.owner[n] == r] for r in range(world)]
        self.peers: dict[int, socket.socket] = {}
        self.seconds = 0.0  # wall time spent in the exchange, waiting for peers included
        self._listener = socket.create_server((host, 0), backlog=world)
        self._received = {peer: {n: np.empty_like(_host(variables[n].value)) for n in self.names_of[rank]}
                          for peer in range(world) if peer != rank}
        self._losses = {peer: np.zeros(1, _LOSS) for peer in range(world) if peer != rank}

    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def connect(self, addresses: Sequence[tuple[str, int]]) -> None:
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
        outgoing = {peer: [grads[n] for n in self.names_of[peer]] for peer in self.peers}
        incoming = {peer: [received[n] for n in self.names_of[self.rank]]
                    for peer, received in self._received.items()}
        self._transfer(outgoing, incoming, "gradients", step)
        totals = {}
        for name in owned:
            parts = [grads[name] if r == self.rank else self._received[r][name] for r in range(self.world)]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            totals[name] = total
        return totals

    def share(self, step: int, loss_sum: float) -> list[float]:
        """Send this rank's parameters to every peer, receive theirs in place; every rank's loss sum."""
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
        from orchestrator.cluster.collectives import NcclGroup

        self.group = NcclGroup(self.world, addresses[0], self.rank)

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
