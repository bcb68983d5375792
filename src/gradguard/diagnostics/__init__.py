"""gradguard.diagnostics"""
