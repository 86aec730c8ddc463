"""`python -m bench` / `mmserve bench`: serving throughput and latency against the model's own limit and a peer.

Modules: workload (models and request bodies), limit (in-process ceiling), servers (start/stop mmserve and
the LitServe peer), loadgen (async closed-loop client), report (JSON, Markdown, PNG), __main__ (the CLI).
"""
