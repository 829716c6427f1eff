"""Latent consistency distillation math as pure functions, and the step that composes them."""
