"""Protocol state machines (no I/O): one `transitions` machine per module, tables as data.

- ``base``: ProtocolMachine, FailureCause, InvalidEvent, Event, Intent: the one contract between machines
  and I/O (events in, intents out; Rule 1).
- ``events``, ``intents``: what an adapter feeds a machine, and what a machine asks its adapter to do.
- ``lifecycle``: the rank lifecycle per role (front, leader, worker, tp_rank0), ``make_lifecycle``, the
  drain bound, and the drift tripwires every mesh machine holds (``MeshTripwires``).
- ``front``: the front's loop (PING, READY, overlap, heartbeats, stop, failure); ``FrontMachine``.
- ``chunk``, ``kv_cache``: the front's chunk machine (ids, epochs, schedule, tripwires, deadline) and its
  model of the mesh's KV cache.
- ``leader``: the leader's relay (PING, warmup, validate, relay, infer, reply); ``LeaderRelayMachine``.
- ``worker``: the worker loop and its watchdog; ``WorkerLoopMachine``.
- ``liveness``: device collectives whose peer died or stalled; ``DeviceLivenessMachine``.
- ``blame``: the root cause of a failed job from every rank's cause; ``root_cause``.
- ``session``: the server's session slot; ``SessionMachine``.
- ``diagrams``: Mermaid state diagrams of every machine (``all_diagrams``), for ``pp1 diagrams``.

Import the submodules directly (``from pp1.fsm.leader import LeaderRelayMachine``).
"""
