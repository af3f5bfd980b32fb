"""The key model and its sources: the declared key (spec), the targets file that declares keys, the run
settings and their trigger form, the low-traffic window. Standard library (and jsonschema/PyYAML) only: the DAG
file imports these at parse time.
"""
