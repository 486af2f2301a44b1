"""Drop-in nn.Modules."""
