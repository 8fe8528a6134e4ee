"""Layer 4: exports of a store, one module per format (FORMATS in pipeline.export.formats)."""
