"""`python -m bench` / `mmserve bench`: serving throughput and latency against the model's own limit and a peer.

Modules: workload (models and request bodies), limit (in-process ceiling), servers (start/stop mmserve and
the LitServe peer), cores (server / client cores, CPU accounting), loadgen (async closed-loop client), report (JSON,
Markdown, PNG), __main__ (the CLI). Beside it: frontend (`python -m bench.frontend`: the front-end ceiling,
MMSERVE_WORKERS 1 to 8 on the no-op model of noop), protocols, overload (with openloop, the multi-process load
generator), profile, training.
"""
