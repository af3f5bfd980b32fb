"""Development kit shared by the demo, the tests and the benchmarks: an embedded PostgreSQL, the app's
table and a generator of KPI hierarchies. Not part of the shipped pipeline."""
