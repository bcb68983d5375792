"""gradguard.viz: numbers -> figures (PNG bytes, or a PNG file where the caller asks for one).

Object-oriented matplotlib only: every figure sits on its own Agg canvas, so neither ``matplotlib.use`` nor
pyplot's global state is touched and a notebook's backend stays as the user set it. matplotlib is imported only
while drawing. ``viz`` sits below evaluation, diagnostics and report (it imports ``errors`` only), so each of them
can draw: anything they know (thresholds, the layers' depth order) comes in as an argument.

- ``robustness``: accuracy vs eps, per-attack and per-class bars, example grids, ``RobustnessCurve``'s curve
- ``training``: training curves, gradient flow of several runs, one run's gradient-health plots
- ``curvature``: Hessian eigenvalue density, input-curvature histogram
- ``certify``: certified accuracy vs L2 radius
"""
from ._figure import PALETTE, series_colours

__all__ = ["PALETTE", "series_colours"]
