"""Moving instances: from the feed (or a list of IDs) to every target, the cursor behind them.

pipeline (instances in flight, the cursor, the ledger's rows), engines (the interface the
pipeline drives), local (transfer threads and this machine's decoding processes), cluster and
tasks (Dask workers move them; the coordinator keeps the ledger), remote (what a Dask worker
runs: `dask worker --preload bridge.engine.remote`), transfer (one instance: route, download,
decode, upload, verify, delete), budget (bytes in flight), inventory (reconcile's listing).

Imported by bridge.cli only. Imports every layer below: watch, ledger, peers, config, routing,
decoding and dicom (header and implicit only in the main process).
"""
