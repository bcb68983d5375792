"""How passes run: devices (``device``), precision (``precision``), compile (``compile``), the progress-bar policy
(``progress``) and the process-group primitives (``distributed``).

This layer (L1) imports nothing from gradguard above ``errors``.
"""
