"""metactr.serve"""
