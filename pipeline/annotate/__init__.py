"""Layer 5: configuration, the annotate job and its one per-case driver, rendering, segment, propagate,
quality."""
