"""Many methods compared: the study spec, planning and running through `search/`, `StudyResults` (every
statistic), the analysis functions, plots, the report and the console tables.

Imports `search/`, `experiment/`, `methods/` and `orchestrator.errors`; never the CLI.
"""
