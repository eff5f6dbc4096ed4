"""papers/rml"""
