"""Layer 1: value types, errors, geometry and orientation, intensity, metrics, boxes, provenance, atomic
writes."""
