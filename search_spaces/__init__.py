"""Search spaces shipped with kd-orchestrator: one YAML per method, loadable by method name."""
