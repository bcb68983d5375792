"""gradguard.train"""
