"""The gradient layer every algorithm family shares (layer L2: imports only ``errors``, ``threat``, ``checks``,
``runtime``).

- ``guard.py``: ``model_guard`` — the one model guard (eval mode, optionally frozen parameters, exact restore);
- ``gradient.py``: the ``Objective`` type and ``input_gradient``, the one input-gradient primitive (amp, EOT,
  ``create_graph`` for double backpropagation);
- ``logits.py``: where a model output's logits are (``select_logits``) and the checked forward passes
  (``check_logits``, ``forward_logits``, ``voted_logits``);
- ``ascent.py``: ``projected_ascent``, the one projected-ascent loop (PGD, TRADES' inner maximisation and the
  masking probe run on it).

Attacks, evaluation, diagnostics and training import these instead of each keeping its own copy.
"""
