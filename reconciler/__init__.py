"""The reconciler: the sweep (reconciler.sweep) that re-sends what the store says is owed and Redis no longer
carries, and its Prometheus metrics (reconciler.metrics).

It reads and marks requests through models/ and talks to Redis through contract/, so it sits above both: the
producer (`producer reconcile`, `retry`, `submit --resume`) and the workers (workers.reconcile.FleetReconciler)
import it; it imports no module of producer/ or workers/, and never torch (docs/architecture.md, "Who may import
whom").
"""
