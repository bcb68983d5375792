"""How passes run: progress bars today; device, precision, compile and process groups as they move here.

This layer (L1) imports nothing from gradguard above ``errors``.
"""
