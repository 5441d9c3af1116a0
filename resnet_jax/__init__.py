"""resnet_jax: deep residual networks (He et al. 2015) in JAX and Flax NNX."""
