"""Executor with one worker process per rank (``--distributed-executor-backend mp``).

The engine core spawns ``ParallelConfig.world_size`` worker processes (the
``spawn`` start method: the core may hold CUDA state and threads); worker r
owns device ``cuda:r`` (NCCL) or runs on the CPU (gloo), joins the process
groups over a TCP rendezvous on 127.0.0.1 and loads only its shard of the
model. The core talks to each worker over its own pipe: every call is pickled
once and the same bytes go to every worker (plain data: a
:class:`SchedulerOutput`, ints), so all ranks run the same steps in the same
order.

Replies: start-up calls are answered by every worker; a step's
:meth:`launch` is answered by none (the core does not wait for the device);
its :meth:`collect` only by the output rank, the first tensor-parallel rank
of the last pipeline stage, whose sampled tokens the core then sends to the
ranks of the earlier stages (their next steps' inputs continue from them).
Every rank of the last stage samples the same
tokens from the same all-gathered logits with a generator seeded alike (the
seed is fixed here when the config leaves it open), so the tokens a step
samples are on every such rank without a broadcast, and asynchronous
scheduling feeds them to the next step on each rank's own device.

Several nodes (``--nnodes N``, torchrun-style): the engine runs on node 0,
which spawns ranks ``[0, world_size / N)`` and listens for control
connections on ``master_port + 1`` (the process groups meet on
``master_port``). Every other node runs ``ember worker --master-addr ADDR
--master-port PORT --node-rank n --nnodes N`` (:func:`run_worker_node`),
which fetches the engine config from node 0 and spawns its ranks; each of
them connects back to node 0 and from then on is driven exactly like a local
worker, over its TCP connection instead of a pipe. Connections are
authenticated with ``$EMBER_DIST_SECRET`` (the same on every node; HMAC
challenge of :mod:`multiprocessing.connection`): keep the ports on a private
network and set the secret. A remote worker that dies closes its connection,
which fails the engine as a local death does.

Failure: a worker that raises reports its traceback and exits; a worker that
dies (killed, crashed) closes its pipe and its process sentinel fires. Either
way the core's next wait raises :class:`WorkerDeadError` after terminating
the other workers, so nothing is left behind (the engine core then reports
itself dead, see :mod:`ember.engine.core_client`). Workers also die with the
process that spawned them (``PR_SET_PDEATHSIG`` on Linux) and exit when their
pipe closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import secrets
import signal
import socket
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ember.config import ConfigError, EngineConfig
from ember.core.sched_output import GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from ember.executor.base import Executor, WorkerDeadError
from ember.logger import init_logger

logger = init_logger(__name__)

# Seconds a worker gets to leave after SHUTDOWN before it is terminated.
_SHUTDOWN_TIMEOUT_S = 5.0

# Calls the workers do not answer when they succeed (see the module docstring).
_NO_REPLY = frozenset({"launch", "sample_with_bitmask", "collect_tokens"})

# Seconds node 0 waits for the other nodes' ranks, and a node for node 0.
NODE_JOIN_TIMEOUT_S = 600.0

Address = tuple[str, int]


def _authkey() -> bytes:
    """The control connections' shared secret (``$EMBER_DIST_SECRET``)."""
    secret = os.environ.get("EMBER_DIST_SECRET")
    if not secret:
        logger.warning("EMBER_DIST_SECRET is not set: the nodes' control connections are authenticated with a "
                       "default key; set the same secret on every node")
        secret = "ember-default-dist-secret"
    return secret.encode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _children_allowed():
    """Let a daemonic process (the engine core's) start worker processes.

    ``multiprocessing`` refuses children to daemonic processes because they are
    terminated without cleanup; here that cleanup is not needed: the workers
    die with their parent (``PR_SET_PDEATHSIG``) and exit when their pipe
    closes.
    """
    config = multiprocessing.current_process()._config
    daemon = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux), and
    exit now if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _set_cpu_threads(world_size: int) -> None:
    """On CPU, share the cores among the ranks (unless ``OMP_NUM_THREADS`` says):
    OpenMP teams that oversubscribe the cores stall at every barrier."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def _worker_main(config: EngineConfig, rank: int, init_method: str,
                 conn: multiprocessing.connection.Connection | None, parent_pid: int, reply_to_collect: bool,
                 connect_to: Address | None = None, authkey: bytes | None = None) -> None:
    """Entry point of worker ``rank``: build the :class:`Worker`, load the
    model, report ready, then run the calls that arrive until SHUTDOWN or
    until the pipe closes. A failure is reported (its traceback) before the
    process exits with status 1. A worker of another node has no pipe: it
    connects to node 0 at ``connect_to`` and introduces itself by rank."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's to handle
    if config.device_config.device == "cpu":
        _set_cpu_threads(config.parallel_config.local_world_size)
    if conn is None:
        conn = multiprocessing.connection.Client(connect_to, authkey=authkey)
        conn.send(("rank", rank))
    worker = None
    try:
        from ember.worker.worker import Worker

        worker = Worker(config, rank, init_method)
        worker.load_model()
        conn.send(("ok", None))
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine core is gone
                break
            if method == "shutdown":
                break
            result = getattr(worker, method)(*args)
            if method in _NO_REPLY or (method == "collect" and not reply_to_collect):
                continue
            conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - every failure goes to the engine core
        logger.exception(f"worker {rank} failed")
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", traceback.format_exc()))
        os._exit(1)
    finally:
        from ember.distributed.parallel_state import destroy_distributed_environment

        with contextlib.suppress(Exception):
            destroy_distributed_environment()


def _spawn_workers(config: EngineConfig, ranks: Sequence[int], init_method: str, output_rank: int,
                   connect_to: Address | None = None, authkey: bytes | None = None
                   ) -> tuple[list[multiprocessing.connection.Connection], list[multiprocessing.process.BaseProcess]]:
    """Start worker processes for ``ranks`` on this node; their pipes (none
    when they connect to ``connect_to`` instead) and processes, in order."""
    ctx = multiprocessing.get_context("spawn")
    conns: list[multiprocessing.connection.Connection] = []
    processes: list[multiprocessing.process.BaseProcess] = []
    env = {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned workers
    try:
        with _children_allowed():
            for rank in ranks:
                parent_conn, child_conn = ctx.Pipe() if connect_to is None else (None, None)
                proc = ctx.Process(target=_worker_main, name=f"ember-worker-{rank}", daemon=True,
                                   args=(config, rank, init_method, child_conn, os.getpid(), rank == output_rank,
                                         connect_to, authkey))
                proc.start()
                if child_conn is not None:
                    child_conn.close()
                    conns.append(parent_conn)
                processes.append(proc)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return conns, processes


def _serve_control(addr: Address) -> socket.socket:
    """Node 0's listening socket for the other nodes' control connections."""
    sock = socket.create_server(addr, reuse_port=False)
    sock.settimeout(1.0)
    return sock


def _accept(sock: socket.socket, authkey: bytes) -> multiprocessing.connection.Connection | None:
    """One authenticated connection, or None when none arrived within the
    socket's timeout or the peer failed the challenge."""
    try:
        peer, _ = sock.accept()
    except TimeoutError:
        return None
    peer.setblocking(True)
    conn = multiprocessing.connection.Connection(peer.detach())
    try:
        multiprocessing.connection.deliver_challenge(conn, authkey)
        multiprocessing.connection.answer_challenge(conn, authkey)
    except (multiprocessing.AuthenticationError, EOFError, OSError) as e:
        logger.warning(f"refused a control connection: {e}")
        conn.close()
        return None
    return conn


class MultiprocExecutor(Executor):
    """One worker process per rank (see the module docstring).

    Args:
        config: the engine config; its ``model_config.seed`` None is replaced
            by one random seed that every worker shares.

    Raises:
        WorkerDeadError: a worker failed to start (the others are stopped).
    """

    def __init__(self, config: EngineConfig) -> None:
        pc = config.parallel_config
        if config.model_config.seed is None:
            # NOTE: every rank samples; they must draw the same random numbers.
            config = dataclasses.replace(config, model_config=dataclasses.replace(
                config.model_config, seed=secrets.randbits(63)))
        self.config = config
        self.world_size = pc.world_size
        # The first tensor-parallel rank of the last pipeline stage returns the tokens.
        self.output_rank = self.world_size - pc.tensor_parallel_size
        self._num_in_flight = 0
        self._dead: str | None = None
        self._closed = False
        local = pc.local_world_size
        if pc.nnodes == 1:
            init_method = f"tcp://127.0.0.1:{pc.master_port or _free_port()}"
        else:
            init_method = f"tcp://{pc.master_addr}:{pc.master_port}"
            authkey = _authkey()
            # Listen before any worker starts: the other nodes may already be waiting.
            control = _serve_control((pc.master_addr, pc.master_port + 1))
        conns, processes = _spawn_workers(config, range(local), init_method, self.output_rank)
        # Rank r's connection and (on this node) process; other nodes' processes are theirs to watch.
        self.conns: list[multiprocessing.connection.Connection] = conns + [None] * (self.world_size - local)
        self.processes: list[multiprocessing.process.BaseProcess | None] = (
            processes + [None] * (self.world_size - local))
        logger.info(f"started {local} worker processes ({', '.join(str(p.pid) for p in processes)})")
        if pc.nnodes > 1:
            try:
                self._join_nodes(control, authkey, init_method)
            finally:
                control.close()
        self._wait_replies(range(self.world_size))

    def _join_nodes(self, control: socket.socket, authkey: bytes, init_method: str) -> None:
        """Wait for the other nodes: hand each node's ``ember worker`` the
        config, then take its ranks' connections.

        Raises:
            WorkerDeadError: a rank did not connect within
                :data:`NODE_JOIN_TIMEOUT_S`, a node's settings disagree, or a
                local worker died meanwhile (every worker is stopped).
        """
        pc = self.config.parallel_config
        missing = set(range(pc.local_world_size, self.world_size))
        deadline = time.monotonic() + NODE_JOIN_TIMEOUT_S
        logger.info(f"waiting for {pc.nnodes - 1} more node(s) on {pc.master_addr}:{pc.master_port + 1}")
        while missing:
            if time.monotonic() > deadline:
                self._fail(f"ranks {sorted(missing)} did not join within {NODE_JOIN_TIMEOUT_S:.0f} s: start "
                           f"`ember worker --master-addr {pc.master_addr} --master-port {pc.master_port} "
                           f"--nnodes {pc.nnodes} --node-rank N` on every other node")
            for rank, proc in enumerate(self.processes):
                if proc is not None and not proc.is_alive():
                    self._fail(f"worker {rank} (pid {proc.pid}) died (exit code {proc.exitcode})")
            conn = _accept(control, authkey)
            if conn is None:
                continue
            try:
                hello = conn.recv()
            except (EOFError, OSError):
                conn.close()
                continue
            if hello[0] == "node":
                _, node_rank, nnodes = hello
                if nnodes != pc.nnodes or not 0 < node_rank < pc.nnodes:
                    conn.send(("error", f"node 0 runs --nnodes {pc.nnodes}; a worker said --nnodes {nnodes} "
                                        f"--node-rank {node_rank}"))
                    self._fail(f"a node joined with --nnodes {nnodes} --node-rank {node_rank}; this engine "
                               f"runs --nnodes {pc.nnodes}")
                conn.send(("config", self.config, init_method, self.output_rank))
                conn.close()
            elif hello[0] == "rank" and hello[1] in missing:
                self.conns[hello[1]] = conn
                missing.discard(hello[1])
            else:
                conn.close()
                self._fail(f"unexpected control message {hello!r}")
        logger.info(f"all {self.world_size} ranks joined")

    def _who(self, rank: int) -> str:
        proc = self.processes[rank]
        if proc is None:
            nodes = self.config.parallel_config
            return f"worker {rank} (node {rank // nodes.local_world_size})"
        return f"worker {rank} (pid {proc.pid})"

    # ----------------------------------------------------------- transport
    def _send(self, method: str, *args: Any, ranks: range | None = None) -> None:
        """Send one call to ``ranks`` (default: every worker)."""
        if self._dead is not None:
            raise WorkerDeadError(self._dead)
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank in ranks if ranks is not None else range(self.world_size):
            try:
                self.conns[rank].send_bytes(data)
            except OSError:
                self._fail(f"{self._who(rank)} is gone{self._exit_code(rank)}")

    def _wait_replies(self, ranks: range | list[int]) -> list[Any]:
        """The replies of ``ranks`` (in that order) to the last call, while
        watching every worker: an error report or a dead process fails the
        executor."""
        replies: dict[int, Any] = {}
        conn_rank = {id(c): r for r, c in enumerate(self.conns)}
        sentinel_rank = {p.sentinel: r for r, p in enumerate(self.processes) if p is not None}
        while len(replies) < len(ranks):
            ready = multiprocessing.connection.wait(self.conns + list(sentinel_rank))
            for obj in ready:
                if isinstance(obj, int):
                    rank = sentinel_rank[obj]
                    # A reply or traceback may still wait in the pipe.
                    if self.conns[rank].poll():
                        obj = self.conns[rank]
                    else:
                        self._fail(f"{self._who(rank)} died{self._exit_code(rank)}")
                rank = conn_rank[id(obj)]
                value = self._read(rank)
                if rank not in ranks:
                    self._fail(f"worker {rank} sent an unexpected reply")
                replies[rank] = value
        return [replies[r] for r in ranks]

    def _read(self, rank: int) -> Any:
        """The next reply of worker ``rank``; its error report or a closed
        pipe fails the executor."""
        try:
            status, value = self.conns[rank].recv()
        except (EOFError, OSError):
            self._fail(f"{self._who(rank)} died{self._exit_code(rank)}")
        if status == "error":
            self._fail(f"worker {rank} failed:\n{value}")
        return value

    def _exit_code(self, rank: int) -> str:
        proc = self.processes[rank]
        return f" (exit code {proc.exitcode})" if proc is not None else " (its connection closed)"

    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run ``method`` on every worker; their results in rank order."""
        self._send(method, *args)
        return self._wait_replies(range(self.world_size))

    def _fail(self, message: str) -> None:
        """Stop every worker and raise :class:`WorkerDeadError`. Workers that
        have died are named first: the others' errors (a collective whose
        peer vanished) are their consequence."""
        dead = [f"worker {r} (pid {p.pid}) died (exit code {p.exitcode})"
                for r, p in enumerate(self.processes) if p is not None and not p.is_alive() and p.exitcode != 1]
        message = "; ".join([d for d in dead if d not in message] + [message])
        logger.error(f"stopping the engine's workers: {message}")
        self._dead = message
        self.shutdown()
        raise WorkerDeadError(message)

    # ------------------------------------------------------------ Executor
    def determine_num_blocks(self) -> int:
        return min(self._call("determine_num_blocks"))

    def kv_cache_bytes_per_block(self) -> int:
        return max(self._call("kv_cache_bytes_per_block"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_host_kv_cache", num_blocks)

    def rank_reports(self, num_tokens: int) -> list[dict]:
        return self._call("rank_report", num_tokens)

    def launch(self, sched: SchedulerOutput) -> None:
        self._send("launch", sched)
        self._num_in_flight += 1

    def collect(self) -> ModelRunnerOutput:
        if not self._num_in_flight:
            raise RuntimeError("collect() with no step in flight")
        self._num_in_flight -= 1
        if self.output_rank == 0:  # one pipeline stage
            self._send("collect")
            return self._wait_replies([self.output_rank])[0]
        # Earlier pipeline stages learn the sampled tokens from the last one.
        self._send("collect", ranks=range(self.output_rank, self.world_size))
        output = self._wait_replies([self.output_rank])[0]
        self._send("collect_tokens", output.sampled_token_ids, ranks=range(self.output_rank))
        return output

    def sample_with_bitmask(self, bitmask: GrammarBitmask) -> None:
        # Every rank of the last stage samples the same gathered logits, so each
        # needs the masks (earlier stages compute no logits).
        self._send("sample_with_bitmask", bitmask, ranks=range(self.output_rank, self.world_size))

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    def check_health(self) -> None:
        """Raises :class:`WorkerDeadError` once a worker process has exited or
        reported an error (and stops the others)."""
        if self._dead is not None:
            raise WorkerDeadError(self._dead)
        for rank, (proc, conn) in enumerate(zip(self.processes, self.conns)):
            if conn.poll():  # a worker only speaks unasked to report its failure (or closes)
                self._read(rank)
                self._fail(f"worker {rank} sent an unexpected reply")
            if proc is not None and not proc.is_alive():
                self._fail(f"{self._who(rank)} died{self._exit_code(rank)}")

    def shutdown(self) -> None:
        """Ask the workers to leave, terminate those that do not in time (and
        kill those that ignore that), then close the pipes. After a worker
        died the others are killed at once."""
        if self._closed:
            return
        self._closed = True
        if self._dead is not None:
            # A rank is gone: the others cannot finish a collective; stop them now.
            for proc in self.processes:
                if proc is not None and proc.is_alive():
                    proc.kill()
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                conn.send_bytes(pickle.dumps(("shutdown", ())))
        local = [p for p in self.processes if p is not None]
        for proc in local:
            proc.join(_SHUTDOWN_TIMEOUT_S)
        for proc in local:
            if proc.is_alive():
                proc.terminate()
                proc.join(_SHUTDOWN_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            if conn is not None:
                conn.close()


def run_worker_node(master_addr: str, master_port: int, node_rank: int, nnodes: int,
                    timeout_s: float = NODE_JOIN_TIMEOUT_S) -> int:
    """Run node ``node_rank``'s ranks of an engine whose node 0 listens on
    ``master_addr:master_port + 1`` (``ember worker``): fetch the engine
    config from node 0, spawn this node's ``world_size / nnodes`` workers
    (which connect back to node 0), and wait for them.

    Returns:
        The exit status: 0 when every worker left cleanly (the engine shut
        down), 1 when one failed (the others are then stopped; node 0 sees
        the closed connections and fails the engine).
    Raises:
        ConnectionError: node 0 could not be reached within ``timeout_s``, or
            refused this node (its message says why).
        ConfigError: ``node_rank`` is not in ``[1, nnodes)``.
    """
    if not 0 < node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} must be in [1, {nnodes}) (node 0 runs the engine)")
    address, authkey = (master_addr, master_port + 1), _authkey()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = multiprocessing.connection.Client(address, authkey=authkey)
            break
        except (ConnectionRefusedError, ConnectionResetError, TimeoutError, OSError) as e:
            if time.monotonic() > deadline:
                raise ConnectionError(f"node 0 at {master_addr}:{master_port + 1} did not answer within "
                                      f"{timeout_s:.0f} s ({e})") from e
            time.sleep(0.5)
    with conn:
        conn.send(("node", node_rank, nnodes))
        reply = conn.recv()
    if reply[0] != "config":
        raise ConnectionError(f"node 0 refused this node: {reply[1]}")
    _, config, init_method, output_rank = reply
    local = config.parallel_config.local_world_size
    ranks = range(node_rank * local, (node_rank + 1) * local)
    _, processes = _spawn_workers(config, ranks, init_method, output_rank, connect_to=address, authkey=authkey)
    logger.info(f"node {node_rank}: ranks {ranks.start}..{ranks.stop - 1} started "
                f"({', '.join(str(p.pid) for p in processes)})")

    def stop(signum, frame) -> None:
        for p in processes:
            if p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pending = list(processes)
    status = 0
    while pending:
        multiprocessing.connection.wait([p.sentinel for p in pending])
        for p in [p for p in pending if not p.is_alive()]:
            pending.remove(p)
            if p.exitcode != 0 and status == 0:
                status = 1
                logger.error(f"node {node_rank}: {p.name} exited with status {p.exitcode}; stopping the others")
                for other in pending:
                    other.kill()
    return status
