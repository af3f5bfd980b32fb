"""The pipeline's steps, each a function of a connection, a spec and the run settings (registry lists them
in order with what each changes and locks), and the run's report.
"""
