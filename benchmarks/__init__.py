"""asv benchmarks and ratio reports of icemap (see benchmarks/README.md)."""
