"""The database side every step shares: SQL composed from the key's model (sqlfiles, keysql), what the
catalog holds (target_state, catalog), the session's discipline (timeouts, run lock, lock retries), what sits
between us and the server (topology) and how many parallel workers a statement may use.
"""
