"""Read-only advice: which tables to convert and with which params (advisor), and what storage costs before and
after partitioning and archiving (cost report)."""
