"""`ember bench`: latency and throughput benchmarks with a measured roofline."""
