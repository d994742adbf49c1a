"""`make bench`: Sluice's throughput, latency and drain measured beside its ceilings."""
