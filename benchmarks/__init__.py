"""Benchmarks of resnet_jax: step throughput, compile time, memory, input-pipeline throughput."""
