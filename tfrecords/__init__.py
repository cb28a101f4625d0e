"""HAM10000 → lesion-aware, sharded TFRecords."""
