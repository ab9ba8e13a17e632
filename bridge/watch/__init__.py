"""Being watched: what people and monitors see of a running bridge.

web (the HTTP server: /metrics, /livez, /readyz, the status page), statuspage (renders it),
snapshot (what the engine tells the page), health (liveness and readiness), progress (the
terminal's progress bar), logs (text or JSON lines), sdnotify (systemd's readiness and watchdog).

Imported by the engines (they feed health and make snapshots) and by bridge.cli. Imports
bridge.ledger's reader, bridge.peers' clients (to probe them), bridge.config and below; never
the engines.
"""
