"""gradguard.evaluation"""
