"""Triton kernels for the LCD step (one op per file), each beside a torch reference; dispatch picks one.

* :func:`consistency_loss` — L2 / pseudo-Huber loss, forward and backward fused (``loss.py``);
* :func:`boundary_output` — f = c_skip·z + c_out·x̂0, the student f_θ and the target f⁻ (``boundary.py``);
* :func:`solver_step` — guided DDIM step from the teacher's [2B] output to z_s (``solver.py``).

``FASTLCM_KERNELS`` = ``auto`` (default: Triton for CUDA tensors, torch otherwise) | ``triton`` (CPU tensors run
under the Triton interpreter) | ``torch``; :func:`select_backend` says which one an op would use.
The ``*_reference`` functions are the torch compositions of :mod:`fastlcm.lcd.math` the kernels are tested against.
"""

from .boundary import boundary_output, boundary_output_reference
from .dispatch import KERNEL_MODES, KERNELS_ENV, forced_kernels, kernel_mode, select_backend, triton_available
from .loss import consistency_loss, consistency_loss_reference
from .solver import solver_step, solver_step_reference

__all__ = [
    "consistency_loss",
    "boundary_output",
    "solver_step",
    "select_backend",
    "forced_kernels",
    "kernel_mode",
    "triton_available",
    "KERNELS_ENV",
    "KERNEL_MODES",
    "consistency_loss_reference",
    "boundary_output_reference",
    "solver_step_reference",
]
