"""The probabilistic program: the model p(x, z), the guides q(z|x), their networks and sites."""
