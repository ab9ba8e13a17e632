"""Talking to the servers: Orthanc's REST API, one client with timeouts, TLS, auth, retries.

orthanc (the only HTTP client: every failure translated into bridge.errors), retry (the one
retry policy, with tenacity), feed (follows the source's /changes and yields new instances).

Imported by the engines, the watchers and the commands. Imports bridge.config, bridge.metrics,
bridge.outcomes and bridge.errors.
"""
