"""Model builders the benchmarks share: real-shape random weights in the file layouts people download."""
