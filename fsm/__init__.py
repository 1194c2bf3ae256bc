"""Protocol state machines (no I/O): one `transitions` machine per module, tables as data.

- ``base``: ProtocolMachine, FailureCause, InvalidEvent (shared by every machine).
- ``intents``: what a machine asks its adapter to do (SendTP, RunShard, SendResult, SendReady, Exit, ...).
- ``lifecycle``: the rank lifecycle per role (front, leader, worker, tp_rank0); ``make_lifecycle``.
- ``leader``: the leader's relay (validate, relay, infer, reply; warmup); ``LeaderRelayMachine``.
- ``worker``: the worker loop and its watchdog; ``WorkerLoopMachine``.
- ``chunk``, ``kv_cache``: the front's chunk loop and KV-cache schedule.
- ``diagrams``: Mermaid state diagrams of every machine (``all_diagrams``), for ``pp1 diagrams``.

Import the submodules directly (``from pp1.fsm.leader import LeaderRelayMachine``).
"""
