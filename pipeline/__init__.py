"""MedSAM Data Engine: the layer packages of docs/architecture.md (core, io, store, model, annotate, export,
report, distributed, flywheel, cli)."""
