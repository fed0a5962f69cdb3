"""The fused ops of epban; each module holds its reference, its dispatch and its autograd."""
