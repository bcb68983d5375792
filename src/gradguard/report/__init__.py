"""gradguard.report"""
