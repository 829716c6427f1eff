"""Triton kernels for the LCD step (one op per file), each beside a torch reference; dispatch picks one."""
