"""The only data changes a run makes, recorded so they can be undone: the audit of nulled pointers, the
delete engine with its archive (cascade), the approval rule of large deletes, and restore of both.
"""
