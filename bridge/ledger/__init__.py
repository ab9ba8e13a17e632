"""The durable state in `state_dir`: the cursor and the per-instance ledger (SQLite, WAL).

state (the cursor, each instance's outcome, all-time totals, a read-only reader for the
watchers), retention (prunes old finished rows in small batches).

Imported by the engines, the watchers and the commands. Imports bridge.outcomes (the states
and entries it stores) and bridge.errors.
"""
