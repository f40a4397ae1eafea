"""The `lowbit` command line: `lowbit quantize` and the artifact directory it writes."""
